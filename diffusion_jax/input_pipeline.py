"""The input pipeline's names, kept where earlier code imports them: everything lives in the
``diffusion_jax.data`` package (one module per kind of source, ``data.batching`` for batches)."""

from diffusion_jax.data import *  # noqa: F403
from diffusion_jax.data import __all__  # noqa: F401
