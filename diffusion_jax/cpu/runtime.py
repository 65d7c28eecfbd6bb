"""Process-wide settings, made before JAX starts its backends: XLA:CPU's convolution library
and glibc's allocator.

XLA:CPU hands convolutions, dots, elementwise ops and reductions to YNNPACK. YNNPACK's forward
convolution is fast, but the kernel gradient of a convolution (a "batch-as-feature" convolution
with a whole-image window, fed by layout transposes) runs at about half its speed, while XLA's own
(Eigen) convolutions take every direction at the same rate (experiments/perf/README.md;
``experiments/perf/conv_bench.py``).

``configure_cpu_convolutions("eigen")`` therefore adds
``--xla_cpu_experimental_ynn_fusion_type=-individual_convolution`` to ``XLA_FLAGS`` (YNNPACK keeps
dots, elementwise ops and reductions). The choice belongs to the process, not to a run: ``python
-m diffusion_jax.main`` and ``python -m diffusion_jax.benchmark`` take ``--cpu_conv_library``,
whose default is ``$DIFFUSION_JAX_CPU_CONV_LIBRARY`` or "eigen" (``default_library``); a notebook
or script calls ``configure_cpu_convolutions`` before its first JAX computation. GPUs and TPUs
are not affected.

Which jaxlibs. An XLA flag that XLA does not know aborts the process when the backends start
(``Unknown flag in XLA_FLAGS``), and the flag is experimental: a later XLA may rename or drop it.
So the flag is added only for a jaxlib from ``TESTED_JAXLIB[0]`` to ``TESTED_JAXLIB[1]`` (major,
minor; inclusive), the range whose XLA was seen to accept it and to take convolutions from YNNPACK
with it (tests/test_runtime.py, run by CI on Python 3.11 and 3.12). A jaxlib outside the range
keeps XLA's default (YNNPACK), with one warning line saying that it is untested; a user who wants
Eigen there puts the flag in ``XLA_FLAGS``. A range rather than a list of versions, so that a
patch release or a minor version between tested ones needs no change here.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import importlib.metadata
import os
import platform

from absl import logging

YNN_FUSION_FLAG = "--xla_cpu_experimental_ynn_fusion_type"
CPU_CONV_LIBRARIES = {"eigen": f"{YNN_FUSION_FLAG}=-individual_convolution", "ynnpack": None}
CPU_CONV_ENV = "DIFFUSION_JAX_CPU_CONV_LIBRARY"
CPU_CONV_HELP = (
    f"XLA:CPU's library for convolutions: eigen (faster training) | ynnpack (XLA's default); "
    f"default ${CPU_CONV_ENV} or eigen. No effect on GPU/TPU."
)
# The oldest and newest (major, minor) of jaxlib whose XLA knows the flag, inclusive (an unknown
# flag in XLA_FLAGS aborts the process; see the module docstring).
TESTED_JAXLIB = ((0, 10), (0, 12))


def _jaxlib_minor() -> tuple[int, int]:
    major, minor = importlib.metadata.version("jaxlib").split(".")[:2]
    return int(major), int(minor)


def _backends_started() -> bool:
    try:
        from jax._src import xla_bridge
    except ImportError:  # pragma: no cover - a JAX without this module: assume not yet started
        return False
    return bool(xla_bridge.backends_are_initialized())


def default_library() -> str:
    """``$DIFFUSION_JAX_CPU_CONV_LIBRARY`` when set, else "eigen"."""
    return os.environ.get(CPU_CONV_ENV) or "eigen"


def configure_cpu_convolutions(library: str = "eigen") -> str | None:
    """Pick the library XLA:CPU runs convolutions with: "eigen" (XLA's own) or "ynnpack".

    Returns the flag added to ``XLA_FLAGS``, or None when nothing was changed: "ynnpack" (XLA's
    default), a ``--xla_cpu_experimental_ynn_fusion_type`` the user set already (theirs wins), a
    jaxlib outside ``TESTED_JAXLIB`` or backends that have started (either: a warning).
    """
    if library not in CPU_CONV_LIBRARIES:
        raise ValueError(f"cpu_conv_library={library!r}; allowed: {tuple(CPU_CONV_LIBRARIES)}.")
    flag = CPU_CONV_LIBRARIES[library]
    current = os.environ.get("XLA_FLAGS", "")
    if flag is None or YNN_FUSION_FLAG in current:
        return None
    version = _jaxlib_minor()
    if not TESTED_JAXLIB[0] <= version <= TESTED_JAXLIB[1]:
        logging.warning(
            "jaxlib %s is untested with cpu_conv_library=%r (tested: %s to %s): leaving XLA:CPU's "
            "convolutions as they are (XLA's default); put %s in XLA_FLAGS to try it.",
            ".".join(map(str, version)),
            library,
            ".".join(map(str, TESTED_JAXLIB[0])),
            ".".join(map(str, TESTED_JAXLIB[1])),
            flag,
        )
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


# glibc's malloc (mallopt(3)). By default a block of 128 KiB or more (a threshold that adapts up to
# 32 MiB) is its own mmap, returned to the system when freed, and free memory above 128 KiB at
# the top of the heap is trimmed: each call of a compiled XLA:CPU program then maps its large
# temporaries afresh and pays a page fault per 4 KiB on first touch, every step. With blocks up to
# 32 MiB kept in the heap and the heap not trimmed, the second call reuses the first one's memory
# (the measured gain on the CIFAR-10 U-Net's train and denoiser steps: experiments/perf/README.md,
# "The allocator"). The price: freed memory stays with the process.
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3
MALLOC_SETTINGS = {
    M_MMAP_THRESHOLD: 32 * 2**20,  # glibc's largest on 64-bit
    M_TRIM_THRESHOLD: 2**31 - 1,
    M_TOP_PAD: 256 * 2**20,
}
MALLOC_ENV = "DIFFUSION_JAX_MALLOC"  # "default": leave glibc's malloc as it is
_GLIBC_MALLOC_ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")


def configure_allocator() -> bool:
    """Tune glibc's malloc for XLA's large per-call temporaries (see MALLOC_SETTINGS); True when
    done. Left alone: not glibc (macOS, musl), ``$DIFFUSION_JAX_MALLOC=default``, or the user's
    own ``MALLOC_*_`` variables (theirs win). Affects speed only, never results."""
    if os.environ.get(MALLOC_ENV) == "default" or any(k in os.environ for k in _GLIBC_MALLOC_ENV):
        return False
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    return all(libc.mallopt(param, value) == 1 for param, value in MALLOC_SETTINGS.items())
