"""Process-wide XLA settings, made before JAX starts its backends.

XLA:CPU (jaxlib 0.10-0.11) hands convolutions, dots, elementwise ops and reductions to YNNPACK.
YNNPACK's forward convolution is fast, but the kernel gradient of a convolution (a
"batch-as-feature" convolution with a whole-image window, fed by layout transposes) runs at
about half its speed, while XLA's own (Eigen) convolutions take every direction at the same rate.
Measured here (2-core AMD EPYC with AVX-512, float32, 3x3, 32x32, 128 -> 128 channels, batch 16,
experiments/conv_bench.py): YNNPACK forward 253.7, input gradient 396.6, kernel gradient 219.2
GFLOP/s; Eigen 335.4, 333.9 and 336.5. The DDPM CIFAR-10 U-Net's whole train step at batch 16 went
from 6.0-6.6 to 7.0-7.9 images/s (README, "Performance").

``configure_cpu_convolutions("eigen")`` therefore adds
``--xla_cpu_experimental_ynn_fusion_type=-individual_convolution`` to ``XLA_FLAGS`` (YNNPACK keeps
dots, elementwise ops and reductions, where it is faster). ``python -m diffusion_jax.main`` and
``python -m diffusion_jax.benchmark`` call it with ``config.cpu_conv_library``; a notebook or
script calls it before its first JAX computation. GPUs and TPUs are not affected.
"""

from __future__ import annotations

import importlib.metadata
import os

from absl import logging

YNN_FUSION_FLAG = "--xla_cpu_experimental_ynn_fusion_type"
CPU_CONV_LIBRARIES = {"eigen": f"{YNN_FUSION_FLAG}=-individual_convolution", "ynnpack": None}
# jaxlib versions whose XLA knows the flag (an unknown flag in XLA_FLAGS aborts the process).
TESTED_JAXLIB = ((0, 10), (0, 11))


def _jaxlib_minor() -> tuple[int, int]:
    major, minor = importlib.metadata.version("jaxlib").split(".")[:2]
    return int(major), int(minor)


def _backends_started() -> bool:
    try:
        from jax._src import xla_bridge
    except ImportError:  # pragma: no cover - a JAX without this module: assume not yet started
        return False
    return bool(xla_bridge.backends_are_initialized())


def configure_cpu_convolutions(library: str = "eigen") -> str | None:
    """Pick the library XLA:CPU runs convolutions with: "eigen" (XLA's own) or "ynnpack".

    Returns the flag added to ``XLA_FLAGS``, or None when nothing was changed: "ynnpack" (XLA's
    default), a ``--xla_cpu_experimental_ynn_fusion_type`` the user set already (theirs wins), a
    jaxlib outside the tested versions, or backends that have started (then too late: a warning).
    """
    if library not in CPU_CONV_LIBRARIES:
        raise ValueError(
            f"config.cpu_conv_library={library!r}; allowed: {tuple(CPU_CONV_LIBRARIES)}."
        )
    flag = CPU_CONV_LIBRARIES[library]
    current = os.environ.get("XLA_FLAGS", "")
    if flag is None or YNN_FUSION_FLAG in current:
        return None
    if _jaxlib_minor() not in TESTED_JAXLIB:
        logging.info("jaxlib %s: leaving XLA:CPU's convolutions as they are.", _jaxlib_minor())
        return None
    if _backends_started():
        logging.warning(
            "JAX's backends have started: cpu_conv_library=%r takes effect only if set before "
            "the first JAX computation (or put %s in XLA_FLAGS).",
            library,
            flag,
        )
        return None
    os.environ["XLA_FLAGS"] = f"{current} {flag}".strip()
    return flag
