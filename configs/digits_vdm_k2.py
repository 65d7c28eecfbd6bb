"""``configs/digits_vdm.py`` with each digit diffused at 2 t per step (one network batch of 2B):
the per-step cost of the digits default, whose hybrid loss also runs 2B (its L_simple and L_vlb
halves), and half the t-variance of the gradient.

    python -m diffusion_jax.main --config configs/digits_vdm_k2.py --workdir runs/digits_vdm_k2

Expected (experiments/vdm/README.md): the continuous bound 1.8039 ± 0.0138 bits/dim (T = 1000:
1.8145 ± 0.0139); ``vdm_ancestral`` classifier FD 11.45 ± 6.77 (500 samples).
"""

from configs import digits_vdm


def get_config():
    config = digits_vdm.get_config()
    config.vdm.t_per_example = 2
    return config
