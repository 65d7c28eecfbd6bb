"""DDPM on MNIST (28x28): a prepared tensorflow-datasets ``mnist`` copy, else the four IDX files
of the original release in ``data.idx_dir`` (else tfds downloads it where it is installed and the
network allows).

    python -m diffusion_jax.main --config configs/mnist.py --workdir runs/mnist \
        --config.data.idx_dir=DIR

Not measured here.
"""

from configs import base


def get_config():
    config = base.get_config()
    config.data.dataset = "mnist"
    config.data.image_size = 28
    config.data.num_channels = 1
    config.data.random_flip = False

    config.model.ch = 64
    config.model.ch_mult = (1, 2, 2)  # 28 -> 14 -> 7
    config.model.attn_resolutions = (14,)

    config.optim.warmup_steps = 1000
    config.training.num_train_steps = 100_000
    config.training.sample_every = 10_000
    return config
