"""Import a fixture of ``make_diffusers_fixture.py`` and compare our network's outputs with the
PyTorch network's (``reference.npz``): prints one JSON line with the largest differences.

    python experiments/weights/check_import.py --fixture /tmp/ddpm_cifar10_random \
        [--workdir DIR] [--conv_impl auto|xla|winograd]

The import runs through ``diffusion_jax.import_weights.import_diffusers`` (what the command line
runs) into ``--workdir`` (a temporary folder by default), and the parameters are read back with
``checkpoints.load_params``, so the whole path is checked.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fixture", required=True)
    parser.add_argument("--workdir", default="")
    parser.add_argument("--conv_impl", default="auto")
    args = parser.parse_args()

    import jax
    import numpy as np

    from diffusion_jax import checkpoints, import_weights, models
    from diffusion_jax.models import layers

    workdir = args.workdir or tempfile.mkdtemp(prefix="import_")
    start = time.perf_counter()
    config = import_weights.import_diffusers(args.fixture, workdir)
    imported_s = time.perf_counter() - start
    config.model.conv_impl = layers.resolve_conv_impl(args.conv_impl)
    params = checkpoints.load_params(workdir)
    ref = np.load(os.path.join(args.fixture, "reference.npz"))
    model = models.get_model(config)
    out = np.asarray(
        jax.jit(lambda p, x, t: model.apply({"params": p}, x, t))(params, ref["x"], ref["t"])
    )
    diff = np.abs(out - ref["out"])
    scale = float(np.abs(ref["out"]).max())
    print(
        json.dumps(
            {
                "fixture": args.fixture,
                "conv_impl": config.model.conv_impl,
                "parameters": int(sum(a.size for a in jax.tree.leaves(params))),
                "tensors": len(jax.tree.leaves(params)),
                "times": [float(t) for t in ref["t"]],
                "max_abs_diff": float(diff.max()),
                "max_abs_output": scale,
                "max_diff_relative": float(diff.max()) / scale,
                "max_diff_per_example": [float(d) for d in diff.reshape(len(diff), -1).max(1)],
                "import_s": round(imported_s, 2),
                "workdir": workdir,
            }
        )
    )


if __name__ == "__main__":
    main()
