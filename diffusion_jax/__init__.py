"""diffusion_jax: denoising diffusion probabilistic models and score matching in JAX.

Submodules are imported explicitly, e.g. ``from diffusion_jax import diffusion``.
"""

__version__ = "0.1.0"
