"""DDPM on 2-D two moons (an exact Gaussian mixture, fresh points each step) with a residual MLP.

    python -m diffusion_jax.main --config configs/toy_moons.py --workdir runs/toy_moons

Not measured here.
"""

from configs import base


def get_config():
    config = base.get_config()
    config.data.dataset = "moons"
    config.data.image_size = 0  # vector data
    config.data.num_channels = 2  # dimension
    config.data.random_flip = False

    config.model.name = "mlp"
    config.model.hidden_dim = 256
    config.model.num_layers = 4
    config.model.dropout = 0.0

    config.diffusion.num_timesteps = 200
    config.diffusion.beta_end = 0.1  # T * mean beta stays about the same as DDPM's 1000 steps
    config.optim.learning_rate = 1e-3
    config.optim.warmup_steps = 100
    config.optim.ema_decay = 0.999
    config.training.batch_size = 256
    config.training.num_train_steps = 5000
    config.training.checkpoint_every = 1000
    config.training.sample_every = 0
    config.eval.metrics = ()
    config.eval.num_examples = 2000
    config.sampling.num_samples = 2000
    config.sampling.batch_size = 2000
    config.sampling.clip_denoised = False  # continuous, unbounded data
    return config
