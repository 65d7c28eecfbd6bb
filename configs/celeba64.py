"""DDPM on CelebA at 64x64 (tensorflow-datasets ``celeb_a``, centre-cropped and resized).

    python -m diffusion_jax.main --config configs/celeba64.py --workdir runs/celeba64

Not measured here.
"""

from configs import base


def get_config():
    config = base.get_config()
    config.data.dataset = "celeb_a"
    config.data.image_size = 64
    config.model.ch_mult = (1, 2, 2, 2, 4)  # 64 -> 32 -> 16 -> 8 -> 4
    config.model.attn_resolutions = (16,)
    config.training.batch_size = 64
    config.training.num_train_steps = 500_000
    return config
