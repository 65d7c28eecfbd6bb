"""The offline default: scikit-learn's 1,797 handwritten digits (8x8, 17 grey levels).

Real data that ships inside a package, so a fresh machine with no download runs the whole job,
training to samples and bits/dim, on a CPU with the base install, in minutes:

    python -m diffusion_jax.main --config configs/digits.py --workdir runs/digits

The recipe: L_simple + 0.1 L_vlb (the vb term at a loss-aware t), learned variances, Fourier
features (4, 5, 6), a 0.92M-parameter U-Net (attention in its middle block only, no dropout),
2,500 steps of batch 64 at learning rate 3e-3 with a warmed-up EMA (docs/objectives.md).

Expected (experiments/digits/README.md, "The first run against the previous default"): 528 s
for the whole command alone on a 2-core CPU (about 5.5 steps/s); the bound on all 297 test
digits 1.7664 ± 0.0161 bits/dim from 20 stratified t per digit (independent pixels 2.4194,
uniform log2 17 = 4.0875); 5,000 samples of DPM-Solver++(2M) SDE at 20 calls against the 1,500
training digits, classifier FD 4.41 ± 1.26, IS 9.402. The previous default (4,000 steps,
attention at 4x4, dropout 0.1, lr 1e-3) took 1,034 s for 1.7685 ± 0.0138, FD 4.44 ± 1.34, IS
9.396.
"""

from configs import base


def get_config():
    config = base.get_config()
    config.data.dataset = "digits"
    config.data.image_size = 8
    config.data.num_channels = 1
    config.data.num_bins = 17  # levels 0..16
    config.data.random_flip = False  # digits are not mirror-symmetric

    config.model.ch = 32  # 0.92M parameters: 8x8 digits need little, and a CPU trains it fast
    config.model.ch_mult = (1, 2)
    config.model.num_res_blocks = 2
    # Attention only in the middle block, no dropout: in 2,000-step screens 1.7927 bits/dim
    # against 1.8027 with attention at 4x4 and dropout 0.1, and 1.25x the images per second
    # (experiments/digits/README.md, "A first run's budget").
    config.model.attn_resolutions = ()
    config.model.dropout = 0.0
    # Sin/cos(2^n pi x_t), n = 4, 5, 6: 2^4 = 17 - 1 (and its multiples) makes them periodic in
    # the 17-level grid, so they give x_t's offset from the nearest level, what the network must
    # resolve at low noise ((4, 5, 6) beat (3, 4, 5, 6) and (4, 5, 6, 7) in 2,000-step screens:
    # experiments/likelihood/README.md).
    config.model.fourier_features = (4, 5, 6)

    # Samples and bound together (experiments/recipes/README.md): L_simple at a uniform t (what
    # shapes a digit) plus 0.1 T L_t at a t importance-sampled from the loss history (Improved
    # DDPM 3.3), the mean trained by both, learned interpolated variances. Each example goes
    # through the network at both t's in one batch of 2B. In 2,000-step screens: 2.1403 bits/dim
    # (L_vlb alone, the previous default: 2.1632, with worse samples; L_simple and fixedlarge:
    # 3.1184).
    config.diffusion.var_type = "learned_range"
    config.diffusion.loss_type = "hybrid"
    config.diffusion.t_sampler = "loss_aware_vb"
    config.diffusion.hybrid_lambda = 0.1
    config.diffusion.hybrid_train_mean = True

    # A first run's budget (experiments/digits/README.md, "A first run's budget"): 2,500 steps at
    # learning rate 3e-3, the EMA warmed up (decay min(0.999, 1 - (1 + n)^-3/4)) so the average
    # forgets the random start within the run.
    config.optim.learning_rate = 3e-3
    config.optim.warmup_steps = 200
    config.optim.ema_decay = 0.999
    config.optim.ema_warmup_power = 0.75

    config.training.batch_size = 64
    config.training.num_train_steps = 2500
    config.training.log_every = 100
    config.training.checkpoint_every = 500
    config.training.sample_every = 1000

    # The bound on all 297 test digits, sum L_t estimated from 20 stratified t per digit
    # (standard error about 0.016 bits/dim; the full bound of every t: eval.bound_num_t=0); the
    # per-t figures (L_t curve, rate-distortion) from every t on the first 64 test digits.
    config.eval.num_examples = 0
    config.eval.bound_num_t = 20
    config.eval.batch_size = 100
    config.eval.rate_distortion.num_examples = 64

    # 20 network calls of DPM-Solver++(2M) SDE (the 1000-step chain: sampling.method=ancestral,
    # sampling.num_steps=0).
    config.sampling.method = "dpmpp_2m_sde"
    config.sampling.num_steps = 20
    return config
