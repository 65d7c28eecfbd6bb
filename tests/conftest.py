"""Test set-up: two host-platform CPU devices for every test, so sharded code paths run."""

import os
import sys

# LLVM's cheapest code generation (helpers.FAST_COMPILE) in-process too: the suite is mostly
# compilation of programs that then run a few steps (on 2 cores, -n 2: 1,526 s -> 844 s).
os.environ.setdefault(
    "XLA_FLAGS", "--xla_force_host_platform_device_count=2 --xla_backend_optimization_level=0"
)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")  # TensorFlow must not take a GPU
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)  # `from configs import ...` without installing
# One persistent XLA compilation cache for all tests and their subprocesses: the tiny configs
# compile the same programs many times over.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(ROOT, ".jax_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import pytest  # noqa: E402

# Scopes whose fixture one xdist worker computes once for the tests that share it.
SHARED_SCOPES = ("module", "package", "session")


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """Under ``--dist loadgroup`` every test is sent to whichever worker is free, except those
    that share a module-scoped fixture (one end-to-end run, asserted on by several tests): each
    such test is marked ``xdist_group`` by the module and fixture, so the run is made once, on
    one worker. A test marked ``xdist_group`` already keeps its own."""
    for item in items:
        if item.get_closest_marker("xdist_group"):
            continue  # a group of its own choosing
        shared = sorted(
            name
            for name in item.fixturenames
            if (defs := item._fixtureinfo.name2fixturedefs.get(name))
            and defs[-1].scope in SHARED_SCOPES
            and defs[-1].baseid  # the project's own fixtures, not pytest's tmp_path_factory
        )
        if shared:
            item.add_marker(pytest.mark.xdist_group(f"{item.module.__name__}:{'+'.join(shared)}"))
