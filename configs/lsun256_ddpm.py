"""DDPM at 256x256 (LSUN / CelebA-HQ in the paper): the 114M-parameter U-Net.

ch 128, ch_mult (1, 1, 2, 2, 4, 4), 2 ResNet blocks per level, attention at 16x16, dropout 0.0,
Adam 2e-5, batch 64.

    python -m diffusion_jax.main --config configs/lsun256_ddpm.py --workdir runs/lsun256 \
        --config.data.dataset=lsun/church_outdoor

Not measured here.
"""

from configs import base


def get_config():
    config = base.get_config()
    config.data.dataset = "lsun/church_outdoor"
    config.data.image_size = 256
    config.model.ch_mult = (1, 1, 2, 2, 4, 4)
    config.model.dropout = 0.0
    config.model.remat = True
    config.optim.learning_rate = 2e-5
    config.training.batch_size = 64
    return config
