"""Fashion-MNIST (Xiao et al. 2017: 28x28, 256 grey levels, 60,000 train / 10,000 test), the
CPU recipe: the digits default's objective on a 1.6M-parameter U-Net, 2,000 steps.

Offline from Debian's package (``apt-get install dataset-fashion-mnist``: the four IDX files in
/usr/share/datasets/fashion-mnist/), from IDX files anywhere (``--config.data.idx_dir=DIR``), or
from a prepared tensorflow-datasets copy:

    python -m diffusion_jax.main --config configs/fashion_mnist.py --workdir runs/fashion_mnist

Expected (experiments/fashion_mnist/README.md): about 2.1 s a step on a 2-core CPU (about 70
minutes unloaded); the bound 3.7562 ± 0.0070 bits/dim on all 10,000 test images (ΣL_t from 20
stratified t per image); 1,000 samples of DPM-Solver++(2M) SDE at 20 calls, classifier FD
202.5 ± 7.0 (real vs real 1.433).
"""

from configs import digits


def get_config():
    config = digits.get_config()  # its objective: hybrid, loss-aware vb, learned variances
    config.data.dataset = "fashion_mnist"
    config.data.image_size = 28
    config.data.num_bins = 256
    config.data.random_flip = False  # kept off: the bound is of the data as it is

    config.model.ch = 32
    config.model.ch_mult = (1, 2, 2)  # 28 -> 14 -> 7
    config.model.attn_resolutions = (7,)  # (14,) costs 22 % more per step
    config.model.dropout = 0.0  # about two epochs: far from overfitting
    # sin/cos(2^n 255 pi x_t), n = -1, 0: one period per two levels and per level, the grid
    # frequencies themselves (VDM's 2^7, 2^8 pi are only close to them at 256 levels).
    config.model.fourier_grid = True
    config.model.fourier_features = (-1, 0)

    config.training.num_train_steps = 2000
    config.training.checkpoint_every = 250
    config.training.sample_every = 1000

    # The bound on all 10,000 test images: L_0 and L_T exact, sum L_t from 20 t per image,
    # stratified in log t (eval.bound_num_t; 0 would be all 1,000 t: 10 M network calls). The
    # per-t figures run all t on the first eval.rate_distortion.num_examples images:
    # --config.eval.figures='("lt_curve","rate_distortion","progressive")'.
    config.eval.num_examples = 0
    config.eval.batch_size = 200
    config.eval.bound_num_t = 20
    config.eval.rate_distortion.num_examples = 200
    config.eval.figures = ("progressive",)
    # Sample quality judged by a classifier trained on the 60,000 training images, 1,000 samples
    # of DPM-Solver++(2M) SDE at 20 network calls (digits' best sampler at <= 20 calls).
    config.eval.metrics = (
        "bpd",
        "fd_classifier",
        "kid_classifier",
        "is_classifier",
        "precision_recall_classifier",
    )
    config.sampling.method = "dpmpp_2m_sde"
    config.sampling.num_steps = 20
    config.sampling.batch_size = 200
    return config
