"""CIFAR-10 with Improved DDPM's L_hybrid (Nichol & Dhariwal 2021, sections 3.1-3.2): the
paper config of ``configs/cifar10_ddpm.py`` with the cosine schedule, learned interpolated
variances (``learned_range``: the U-Net's output doubled, 35,749,766 parameters) and the hybrid
loss L_simple + 0.001 L_vlb, at T = 1000. (Their CIFAR-10 runs also used T = 4000, lr 1e-4 and
dropout 0.3; those stay at the paper config's values here.)

    python -m diffusion_jax.main --config configs/cifar10_improved.py --workdir runs/cifar10_iddpm

Not measured here.
"""

from configs import cifar10_ddpm


def get_config():
    config = cifar10_ddpm.get_config()
    config.diffusion.beta_schedule = "cosine"
    config.diffusion.var_type = "learned_range"
    config.diffusion.loss_type = "hybrid"
    config.diffusion.num_timesteps = 1000
    return config
