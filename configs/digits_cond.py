"""The default digits run (configs/digits.py) made class-conditional, with classifier-free
guidance (Ho & Salimans 2022): the ten digits as classes, labels dropped to "no class" 10 % of
the time in training, so one network is both the conditional and the unconditional model.

    python -m diffusion_jax.main --config configs/digits_cond.py --workdir runs/digits_cond
    python -m diffusion_jax.main --config configs/digits_cond.py --workdir runs/digits_cond \
        --mode sample --config.sampling.num_samples=500 --config.sampling.guidance_scale=1
"""

from configs import digits


def get_config():
    config = digits.get_config()
    config.model.num_classes = 10
    config.training.label_dropout = 0.1
    config.sampling.guidance_scale = 1.0
    return config
