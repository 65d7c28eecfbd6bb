"""The samplers, the bound and training against outputs stored from an earlier commit.

``tests/data/reference_outputs/digits.npz`` holds, for fixed seeds, 10 training losses of the
digits and digits_vdm configs, every sampler's samples and the bound (full and K = 20), as
``tests/data/reference_outputs/make.py`` computed them with the code of commit 97899f6 (its
docstring says how to remake them and how to compare two trees bit for bit). A refactoring that
changes what any of them computes fails here. The tolerance admits another jax and XLA's
rounding (the subprocess compiles with LLVM -O0: 3e-4 absolute, 3e-5 relative at most from the
default build), not a change of algorithm.
"""

import os
import subprocess
import sys

import numpy as np
import pytest
from helpers import ROOT, xla_flags

MAKE = os.path.join(ROOT, "tests", "data", "reference_outputs", "make.py")
STORED = os.path.join(ROOT, "tests", "data", "reference_outputs", "digits.npz")


@pytest.mark.parametrize(
    "name, part", [("digits", "samplers"), ("digits", "bound"), ("digits_vdm", None)]
)
def test_samplers_bound_and_losses_match_the_stored_outputs(tmp_path, name, part):
    """One subprocess per case (the digits config's in two, each under a minute)."""
    out = tmp_path / "now.npz"
    env = dict(os.environ, XLA_FLAGS=xla_flags(1))
    command = [sys.executable, MAKE, str(out), "--config", name]
    subprocess.run(command + (["--part", part] if part else []), check=True, env=env)
    now, stored = np.load(out), np.load(STORED)
    vdm = [k for k in stored if k.startswith("vdm_") or k.endswith("_vdm")]
    ours = vdm if name == "digits_vdm" else [k for k in stored if k not in vdm]
    if part == "samplers":
        ours = [k for k in ours if not k.startswith("bound_")]
    elif part == "bound":
        ours = [k for k in ours if k.startswith(("bound_", "loss_"))]
    assert sorted(now) == sorted(ours)
    for key in ours:
        np.testing.assert_allclose(now[key], stored[key], rtol=2e-4, atol=2e-5, err_msg=key)
