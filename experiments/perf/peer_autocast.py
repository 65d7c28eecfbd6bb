"""The PyTorch peer (`../shared/bench/peer_torch_unet.py`) with its U-Net's forward pass under
``torch.autocast("cpu", dtype=torch.bfloat16)``: PyTorch's mixed precision (convolutions and
matrix products in bfloat16 with float32 accumulation, the rest float32), the counterpart of our
``model.dtype = "bfloat16"``. Same command line as the peer script, run with the peer's python:

    ~/peer-venv/bin/python experiments/perf/peer_autocast.py \
        --peer_script ../shared/bench/peer_torch_unet.py --config ddpm_cifar10 --mode train \
        --batch 16 --steps 3

(`python -m diffusion_jax.benchmark --peer_script experiments/perf/peer_autocast.py` passes the
peer's own path through ``$PEER_SCRIPT``.)
"""

import functools
import importlib.util
import os
import sys


def main() -> None:
    argv = sys.argv[1:]
    script = os.environ.get("PEER_SCRIPT", "../shared/bench/peer_torch_unet.py")
    if argv[:1] == ["--peer_script"]:
        script, argv = argv[1], argv[2:]
    spec = importlib.util.spec_from_file_location("peer", script)
    peer = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(peer)
    import torch

    build = peer.build_model

    @functools.wraps(build)
    def build_autocast(*args, **kwargs):
        model, cfg = build(*args, **kwargs)
        forward = model.forward

        def autocast_forward(*a, **kw):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return forward(*a, **kw)

        model.forward = autocast_forward
        return model, cfg

    peer.build_model = build_autocast
    sys.argv = [script, *argv]
    peer.main()


if __name__ == "__main__":
    main()
