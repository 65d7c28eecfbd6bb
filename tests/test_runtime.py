"""Tests of diffusion_jax.cpu.runtime: the XLA:CPU convolution library is chosen through XLA_FLAGS,
before JAX starts, without overriding a user's own setting, and it takes effect."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from helpers import ROOT

from diffusion_jax.cpu import runtime

FLAG = "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution"
REAL_JAXLIB_MINOR = runtime._jaxlib_minor
OLDEST, NEWEST = runtime.TESTED_JAXLIB
UNTESTED = {  # really outside the tested range: the next minor and major, and an older minor
    "newer": [(NEWEST[0], NEWEST[1] + 1), (NEWEST[0] + 1, 0)],
    "older": [(OLDEST[0], OLDEST[1] - 1)],
}


@pytest.fixture
def fresh(monkeypatch):
    """A process whose backends have not started, on a tested jaxlib, with one XLA flag set."""
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
    monkeypatch.setattr(runtime, "_backends_started", lambda: False)
    monkeypatch.setattr(runtime, "_jaxlib_minor", lambda: (0, 10))
    return monkeypatch


def test_eigen_appends_the_flag(fresh):
    assert runtime.configure_cpu_convolutions("eigen") == FLAG
    assert os.environ["XLA_FLAGS"] == f"--xla_force_host_platform_device_count=2 {FLAG}"
    assert runtime.configure_cpu_convolutions("eigen") is None  # set once only
    assert os.environ["XLA_FLAGS"].count("ynn_fusion_type") == 1


@pytest.mark.parametrize("version", ["0.10.2", "0.11.0", "0.12.0.1"])
def test_every_tested_jaxlib_gets_the_flag(fresh, version):
    fresh.setattr(runtime, "_jaxlib_minor", REAL_JAXLIB_MINOR)
    fresh.setattr(runtime.importlib.metadata, "version", lambda name: version)
    assert runtime.configure_cpu_convolutions("eigen") == FLAG


@pytest.mark.parametrize("version", UNTESTED["newer"] + UNTESTED["older"])
def test_an_untested_jaxlib_changes_nothing_and_says_so(fresh, caplog, version):
    assert version > NEWEST or version < OLDEST
    before = os.environ["XLA_FLAGS"]
    fresh.setattr(runtime, "_jaxlib_minor", lambda: version)
    with caplog.at_level("WARNING"):
        assert runtime.configure_cpu_convolutions("eigen") is None
    assert os.environ["XLA_FLAGS"] == before
    warned = [r.getMessage() for r in caplog.records if "untested" in r.getMessage()]
    assert len(warned) == 1, caplog.text
    assert warned[0].startswith(f"jaxlib {version[0]}.{version[1]} is untested"), warned[0]
    assert f"tested: {OLDEST[0]}.{OLDEST[1]} to {NEWEST[0]}.{NEWEST[1]}" in warned[0]


def test_cases_that_change_nothing(fresh):
    before = os.environ["XLA_FLAGS"]
    assert runtime.configure_cpu_convolutions("ynnpack") is None
    fresh.setattr(runtime, "_jaxlib_minor", lambda: UNTESTED["newer"][0])  # a newer jaxlib
    assert runtime.configure_cpu_convolutions("eigen") is None
    fresh.setattr(runtime, "_jaxlib_minor", lambda: (0, 10))
    fresh.setattr(runtime, "_backends_started", lambda: True)  # too late
    assert runtime.configure_cpu_convolutions("eigen") is None
    assert os.environ["XLA_FLAGS"] == before
    fresh.setattr(runtime, "_backends_started", lambda: False)
    own = "--xla_cpu_experimental_ynn_fusion_type=invalid"  # the user's own choice wins
    fresh.setenv("XLA_FLAGS", own)
    assert runtime.configure_cpu_convolutions("eigen") is None
    assert os.environ["XLA_FLAGS"] == own


def test_bad_library_is_named():
    with pytest.raises(ValueError, match="cpu_conv_library='mkl'.*'eigen', 'ynnpack'"):
        runtime.configure_cpu_convolutions("mkl")


PROBE = r"""
import json, re, sys
import numpy as np
from diffusion_jax.cpu import runtime
flag = runtime.configure_cpu_convolutions(sys.argv[1])
import jax, jax.numpy as jnp
from jax import lax
def conv(x, w):
    dn = ("NHWC", "HWIO", "NHWC")
    return lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=dn)
loss = jax.jit(jax.value_and_grad(lambda x, w: jnp.sum(conv(x, w) ** 2), argnums=(0, 1)))
x = jax.random.normal(jax.random.key(0), (8, 32, 32, 128))
w = jax.random.normal(jax.random.key(1), (3, 3, 128, 128)) / 34.0
hlo = loss.lower(x, w).compile().as_text()
bodies = {block.split()[0].lstrip("%"): block for block in re.split(r"\n(?=\S)", hlo)}
callees = re.findall(r'calls=%([\w.-]+).*"__ynn_fusion"', hlo)
value, (dx, dw) = loss(x, w)
np.savez(sys.argv[2], value=value, dx=dx, dw=dw)
print(json.dumps({"flag": flag, "convolutions": hlo.count(" convolution("),
                  "ynn_convolutions": sum(" convolution(" in bodies[c] for c in callees)}))
"""


def test_eigen_takes_convolutions_from_ynnpack_with_the_same_results(tmp_path):
    """Compiled in fresh processes: with "eigen" no convolution sits in a YNNPACK fusion, with
    "ynnpack" (XLA's default on this jaxlib) they do; values and gradients agree."""
    env = dict(os.environ, PYTHONPATH=ROOT, XLA_FLAGS="--xla_force_host_platform_device_count=1")
    out = {}
    for library in ("eigen", "ynnpack"):
        path = tmp_path / f"{library}.npz"
        proc = subprocess.run(
            [sys.executable, "-c", PROBE, library, str(path)],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        with np.load(path) as arrays:
            out[library] = json.loads(proc.stdout.strip().splitlines()[-1]), dict(arrays)
    (eigen, eigen_arrays), (ynn, ynn_arrays) = out["eigen"], out["ynnpack"]
    assert eigen["flag"] == FLAG and ynn["flag"] is None
    assert eigen["convolutions"] >= 3 and ynn["convolutions"] >= 3  # forward, dx, dw
    assert eigen["ynn_convolutions"] == 0 and ynn["ynn_convolutions"] >= 3
    for name in ("value", "dx", "dw"):
        a, b = eigen_arrays[name], ynn_arrays[name]
        scale = float(abs(b).max())
        assert float(abs(a - b).max()) <= 1e-5 * scale, name


def test_the_library_is_the_processs(monkeypatch):
    monkeypatch.delenv(runtime.CPU_CONV_ENV, raising=False)
    assert runtime.default_library() == "eigen"
    monkeypatch.setenv(runtime.CPU_CONV_ENV, "ynnpack")
    assert runtime.default_library() == "ynnpack"


_HEAP_PROBE = """
import ctypes, ctypes.util, json
from diffusion_jax.cpu import runtime
tuned = runtime.configure_allocator()
libc = ctypes.CDLL(ctypes.util.find_library("c"))
libc.malloc.restype = ctypes.c_void_p
p = libc.malloc(16 * 2**20)  # 16 MiB: an mmap of its own by default, in the heap once tuned
heap = [l.split()[0].split("-") for l in open("/proc/self/maps") if l.rstrip().endswith("[heap]")]
in_heap = any(int(a, 16) <= p < int(b, 16) for a, b in heap)
print(json.dumps({"tuned": tuned, "in_heap": in_heap}))
"""


@pytest.mark.parametrize(
    "env, want",
    [
        ({}, {"tuned": True, "in_heap": True}),
        ({runtime.MALLOC_ENV: "default"}, {"tuned": False, "in_heap": False}),
        ({"MALLOC_TOP_PAD_": "0"}, {"tuned": False, "in_heap": False}),  # the user's own setting
    ],
)
def test_the_allocator_keeps_large_blocks_in_the_heap(env, want):
    """configure_allocator: a 16 MiB block comes from the heap (reused call to call) instead of
    an mmap of its own (fresh pages, faulted in on every call), unless the user opted out."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    clean.pop(runtime.MALLOC_ENV, None)
    out = subprocess.run(
        [sys.executable, "-c", _HEAP_PROBE],
        env={**clean, **env},
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=True,
    )
    assert json.loads(out.stdout.strip().splitlines()[-1]) == want
