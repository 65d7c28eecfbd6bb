"""Make a diffusers ``UNet2DModel`` with random weights and its outputs on fixed inputs: the
reference that ``diffusion_jax.import_weights`` is checked against, without torch at test time.

Run in the PyTorch peer's environment (``../shared/bench/README.md``: torch + diffusers), never in
the project's:

    ~/peer-venv/bin/python experiments/weights/make_diffusers_fixture.py --arch tiny \
        --out tests/data/diffusers_tiny
    ~/peer-venv/bin/python experiments/weights/make_diffusers_fixture.py --arch ddpm_cifar10 \
        --out /tmp/ddpm_cifar10_random

``--out`` gets what a diffusers model folder holds (``config.json``,
``diffusion_pytorch_model.safetensors``, ``scheduler_config.json``) plus ``reference.npz``: inputs
``x`` [B, H, W, C] (NHWC, as our network takes them), times ``t`` [B] and the PyTorch network's
outputs ``out`` [B, H, W, C_out]. Every weight is random, the GroupNorm scales and biases
included (diffusers starts them at 1 and 0, which would hide a swapped or dropped norm), so
every tensor's mapping shows in the outputs. Then, in the project's environment:

    python experiments/weights/check_import.py --fixture DIR
"""

from __future__ import annotations

import argparse
import json
import os

# The DDPM conversions on the Hugging Face hub (google/ddpm-*) and small ones of the same block
# types. ddpm_church256: google/ddpm-church-256's config.json (the same network as
# google/ddpm-bedroom-256, -cat-256 and -celebahq-256: Ho et al.'s 256x256 model).
_DDPM = dict(
    act_fn="silu",
    attention_head_dim=None,
    center_input_sample=False,
    downsample_padding=0,
    flip_sin_to_cos=False,
    freq_shift=1,
    mid_block_scale_factor=1,
    norm_eps=1e-6,
    norm_num_groups=32,
    time_embedding_type="positional",
)
ARCHS = {
    "ddpm_cifar10": dict(
        _DDPM,
        sample_size=32,
        in_channels=3,
        out_channels=3,
        block_out_channels=(128, 256, 256, 256),
        layers_per_block=2,
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    ),
    "ddpm_church256": dict(
        _DDPM,
        sample_size=256,
        in_channels=3,
        out_channels=3,
        block_out_channels=(128, 128, 256, 256, 512, 512),
        layers_per_block=2,
        down_block_types=(
            "DownBlock2D",
            "DownBlock2D",
            "DownBlock2D",
            "DownBlock2D",
            "AttnDownBlock2D",
            "DownBlock2D",
        ),
        up_block_types=(
            "UpBlock2D",
            "AttnUpBlock2D",
            "UpBlock2D",
            "UpBlock2D",
            "UpBlock2D",
            "UpBlock2D",
        ),
    ),
    # Committed under tests/data: three levels (8, 4, 2), attention at 4x4 and in the middle,
    # a channel change (a 1x1 shortcut), 4 GroupNorm groups.
    "tiny": dict(
        _DDPM,
        sample_size=8,
        in_channels=3,
        out_channels=3,
        block_out_channels=(8, 16, 16),
        layers_per_block=1,
        norm_num_groups=4,
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    ),
    # Committed too: the options a DDPM conversion does not use but the importer maps:
    # cos before sin in the time embedding, a learned variance (2C outputs), an explicit
    # attention_head_dim equal to the channels (one head), 8 groups.
    "tiny_flip_learned": dict(
        _DDPM,
        sample_size=4,
        in_channels=1,
        out_channels=2,
        block_out_channels=(8, 16),
        layers_per_block=1,
        norm_num_groups=8,
        flip_sin_to_cos=True,
        attention_head_dim=16,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    ),
}

# The DDPM conversions' scheduler (google/ddpm-cifar10-32's scheduler_config.json).
SCHEDULER = dict(
    num_train_timesteps=1000,
    beta_start=0.0001,
    beta_end=0.02,
    beta_schedule="linear",
    variance_type="fixed_large",
    clip_sample=True,
)
TIMES = (0.0, 1.0, 137.25, 999.0)  # one per example; 137.25: a fractional time (ODE solvers)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", choices=sorted(ARCHS), default="tiny")
    parser.add_argument("--out", required=True)
    parser.add_argument("--batch", type=int, default=len(TIMES))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    import numpy as np
    import torch
    from diffusers import DDPMScheduler, UNet2DModel

    torch.manual_seed(args.seed)
    cfg = dict(ARCHS[args.arch])
    model = UNet2DModel(**cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:  # biases and norm parameters: around their usual values
                scale = "norm" in name and name.endswith(".weight")
                p.copy_(float(scale) + 0.2 * torch.randn_like(p))
            else:  # fan-in scaled, so activations stay O(1) through the whole depth
                fan_in = p[0].numel()
                p.copy_(torch.randn_like(p) / fan_in**0.5)
    os.makedirs(args.out, exist_ok=True)
    model.save_pretrained(args.out, safe_serialization=True)
    scheduler = dict(SCHEDULER)
    if cfg["out_channels"] == 2 * cfg["in_channels"]:
        scheduler["variance_type"] = "learned_range"
    DDPMScheduler(**scheduler).save_config(args.out)

    b, c, s = args.batch, cfg["in_channels"], cfg["sample_size"]
    g = torch.Generator().manual_seed(args.seed + 1)
    x = torch.randn(b, c, s, s, generator=g, dtype=torch.float32)
    times = (TIMES * (b // len(TIMES) + 1))[:b]
    t = torch.tensor(times, dtype=torch.float32)
    with torch.no_grad():
        out = model(x, t).sample
    np.savez(
        os.path.join(args.out, "reference.npz"),
        x=x.permute(0, 2, 3, 1).numpy(),
        t=t.numpy(),
        out=out.permute(0, 2, 3, 1).numpy(),
    )
    n = sum(p.numel() for p in model.parameters())
    print(
        json.dumps(
            {
                "arch": args.arch,
                "parameters": n,
                "tensors": len(model.state_dict()),
                "out_std": float(out.std()),
                "out": args.out,
            }
        )
    )


if __name__ == "__main__":
    main()
