"""DDPM on CIFAR-10, the paper's setup (Ho et al. 2020, appendix B).

35.7M-parameter U-Net (ch 128, ch_mult (1, 2, 2, 2), 2 ResNet blocks per level, attention at
16x16, dropout 0.1), T = 1000 linear betas, Adam 2e-4 with 5000 warmup steps, batch 128,
gradient clipping at 1, EMA 0.9999, random horizontal flips, 800k steps.

    python -m diffusion_jax.main --config configs/cifar10_ddpm.py --workdir runs/cifar10

Expected, the paper's (Table 1; not trained here): FID 3.17 and a bound of <= 3.75 bits/dim on
the test set. The paper's trained weights run as a workdir of ours: docs/weights.md.
"""

from configs import base


def get_config():
    config = base.get_config()
    config.data.dataset = "cifar10"
    return config
