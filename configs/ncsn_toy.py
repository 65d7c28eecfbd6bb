"""NCSN (Song & Ermon 2019) on the 2-D ring of 8 Gaussians with the residual MLP.

The score network is s(x, i) = net(x, i) / σ_i (``builders.ncsn_score_fn``), trained with
``score.ncsn_loss``, Σ_i σ_i² · DSM at σ_i, over L geometric levels σ_1 > … > σ_L, and sampled by
annealed Langevin dynamics with step α_i = ε σ_i² / σ_L²:

- σ_1 = 6 is the largest distance between two of the data's modes (radius 3), so q_σ1 mixes them
  (NCSNv2's technique 1); σ_L = 0.05 is well below the modes' width 0.3, so q_σL ≈ the data.
- ε = 5e-4 = 0.2 σ_L²: at every level the step is α_i = 0.2 σ_i², and the 100 steps per level
  (1000 network calls per sample) let the chain forget the previous level. With the exact score
  of ``toy_distributions.get("gmm8").noised(1, σ)`` in place of the network these settings reach the
  data-vs-data floor of the two-sample distances (``experiments/samplers/sampler_comparison.py``).

Training and 2000 samples take about 75 s on a CPU:

    python -m diffusion_jax.main --config configs/ncsn_toy.py --workdir runs/ncsn_toy
    python -m diffusion_jax.main --config configs/ncsn_toy.py --workdir runs/ncsn_toy --mode sample

Expected (experiments/score_matching/README.md): the 2000 samples fall on the 8 modes with counts
230, 256, 254, 256, 236, 282, 252, 234 (250 each expected), mean radius 3.0018 and radial std
0.3230 (data: 3, about 0.30).
"""

from configs import toy_moons


def get_config():
    config = toy_moons.get_config()
    config.data.dataset = "gmm8"
    config.model.hidden_dim = 128
    config.model.num_layers = 3

    config.training.objective = "ncsn"
    config.sampling.method = "langevin"  # annealed Langevin dynamics over config.ncsn
    config.training.num_train_steps = 6000
    config.training.checkpoint_every = 1000
    config.training.log_every = 250

    config.ncsn.sigma_max = 6.0
    config.ncsn.sigma_min = 0.05
    config.ncsn.num_levels = 10
    config.ncsn.n_steps_each = 100
    config.ncsn.step_lr = 5e-4
    return config
