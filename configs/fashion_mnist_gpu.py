"""Fashion-MNIST at the paper's scale, for one accelerator: the CPU recipe's objective on a
DDPM U-Net of 64 channels with attention at 14x14 (6,472,770 parameters), batch 128, 10,000 steps,
sized to train in about 6 minutes on one H100/H200 (not yet measured on one:
experiments/fashion_mnist/README.md). Run by ../shared/bench/gpu_fashion.sh on a lent device:

    python -m diffusion_jax.main --config configs/fashion_mnist_gpu.py --workdir runs/fm_gpu \
        --config.data.data_dir=DIR_OF_THE_IDX_FILES
"""

from configs import fashion_mnist


def get_config():
    config = fashion_mnist.get_config()
    config.model.ch = 64
    config.model.ch_mult = (1, 2, 2)
    config.model.num_res_blocks = 2
    config.model.attn_resolutions = (14,)
    config.model.dropout = 0.1

    config.optim.learning_rate = 2e-4  # the paper's, at batch 128
    config.optim.warmup_steps = 1000
    config.optim.ema_decay = 0.9995

    config.training.batch_size = 128
    config.training.num_train_steps = 10_000
    config.training.log_every = 500
    config.training.checkpoint_every = 2500
    config.training.sample_every = 5000

    config.eval.batch_size = 1000
    config.sampling.batch_size = 500
    return config
