"""NCSN (Song & Ermon 2019) on the 8x8 digits with the small U-Net conditioned on the noise level.

The U-Net takes the level index i (0 = the largest σ) where a DDPM takes t, and the score is
s(x, i) = net(x, i) / σ_i (``builders.ncsn_score_fn``), trained with ``score.ncsn_loss``. The
levels follow Song & Ermon (2020, "Improved techniques"):

- σ_1 = 10 ≈ the largest distance between two training digits in [-1, 1]^64 (9.6);
- σ_L = 0.01, a twelfth of the spacing 2/16 between grey levels: invisible in samples;
- L = 20 geometric levels, ratio γ = σ_{i-1}/σ_i ≈ 1.44, close to the γ ≈ 1.36 at which
  neighbouring levels' shells overlap for D = 64;
- annealed Langevin with α_i = ε σ_i²/σ_L², ε = 2e-5 = 0.2 σ_L², 50 steps per level (1000 network
  calls per sample, as many as the DDPM's T = 1000). On a Gaussian level N(0, σ_i² I) a step
  contracts the variance's distance to its fixed point by (1 − ε/(2σ_L²))² = 0.81, so 50 steps
  forget the previous level (0.81^50 ≈ 3e-5); the fixed point σ_i²/(1 − ε/(4σ_L²)) is 5% above
  σ_i² (the step's discretisation bias).

The U-Net is the digits one at half the width and one ResNet block per level (ch 32). 2000 steps
took 5.4 min, and the 64 samples 40 s more, on 2 CPU cores shared with other jobs:

    python -m diffusion_jax.main --config configs/ncsn_digits.py --workdir runs/ncsn_digits
    python -m diffusion_jax.main --config configs/ncsn_digits.py --workdir runs/ncsn_digits \
        --mode sample

Expected (experiments/score_matching/README.md): many of the 64 digits legible (0, 3, 7 and 9
clear), noisier than the data.
"""

from configs import digits


def get_config():
    config = digits.get_config()
    config.model.ch = 32  # a quarter of the DDPM digits U-Net's compute: minutes on a CPU
    config.model.num_res_blocks = 1
    config.model.dropout = 0.0
    config.model.fourier_features = ()  # the digits DDPM's input features, not screened for NCSN

    config.training.objective = "ncsn"
    config.sampling.method = "langevin"  # annealed Langevin dynamics over config.ncsn
    config.training.num_train_steps = 2000
    config.training.sample_every = 0  # a 1000-call Langevin chain costs as much as ~100 steps
    config.eval.metrics = ()  # bits/dim is a DDPM bound; an NCSN has none

    config.ncsn.sigma_max = 10.0
    config.ncsn.sigma_min = 0.01
    config.ncsn.num_levels = 20
    config.ncsn.n_steps_each = 50
    config.ncsn.step_lr = 2e-5
    return config
