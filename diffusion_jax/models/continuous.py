"""The continuous-time (VDM) network: a model of ``models`` and its noise schedule γ(t) in one
module, so the schedule's learned parameters live, train, average (EMA) and checkpoint with the
network's.

``ContinuousTimeNet(net)(z_t, t, y)`` with t [B] in [0, 1] returns ε̂: γ(t) from the schedule,
then ``net(z_t, 1000 (γ − γ_min)/(γ_max − γ_min), y)`` (``vdm.snr_net_time``, the configured
endpoints) — the network sees the noise level, as VDM's does. Its parameters are
``{"net": …, "gamma_shape": …, "gamma_ends": [2]}`` (the last two for ``vdm.gamma="learned"``;
``gamma_ends`` only with ``vdm.learn_endpoints``).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from diffusion_jax import vdm
from diffusion_jax.models import layers


class ContinuousTimeNet(nn.Module):
    net: nn.Module
    schedule: str = "learned"  # vdm.GAMMAS
    gamma_min: float = -13.3
    gamma_max: float = 5.0
    learn_endpoints: bool = True
    hidden: int = 1024  # units of the learned schedule's monotone network
    beta_start: float = 1e-4  # beta_linear only
    beta_end: float = 0.02
    num_timesteps: int = 1000

    @property
    def num_classes(self) -> int:
        return self.net.num_classes

    learned_variance = False  # the continuous bound needs none

    def setup(self) -> None:
        if self.schedule == "learned":
            self.gamma_shape = self.param(
                "gamma_shape", lambda key: vdm.init_monotone_params(key, self.hidden)
            )
            if self.learn_endpoints:
                ends = jnp.asarray([self.gamma_min, self.gamma_max], jnp.float32)
                self.gamma_ends = self.param("gamma_ends", lambda key: ends)

    def endpoints(self) -> tuple[jax.Array, jax.Array]:
        """(γ(0), γ(1)): learned (``gamma_ends``) or the configured constants."""
        if self.schedule == "learned" and self.learn_endpoints:
            return self.gamma_ends[0], self.gamma_ends[1]
        if self.schedule == "beta_linear":
            g = self._fixed(jnp.asarray([0.0, 1.0]))
            return g[0], g[1]
        return jnp.asarray(self.gamma_min, jnp.float32), jnp.asarray(self.gamma_max, jnp.float32)

    def _fixed(self, t: jax.Array) -> jax.Array:
        if self.schedule == "linear":
            return vdm.gamma_linear(t, self.gamma_min, self.gamma_max)
        if self.schedule == "cosine":
            return vdm.gamma_cosine(t, self.gamma_min, self.gamma_max)
        return vdm.gamma_beta_linear(t, self.beta_start, self.beta_end, self.num_timesteps)

    def shape(self, t: jax.Array) -> jax.Array:
        """The schedule's normalised shape s(t) = (γ(t) − γ(0))/(γ(1) − γ(0)) [B], 0 -> 1."""
        if self.schedule == "learned":
            return vdm.normalised_shape(self.gamma_shape, t)
        g0, g1 = self._fixed(jnp.asarray([0.0, 1.0], t.dtype))
        return (self._fixed(t) - g0) / (g1 - g0)

    def gamma(self, t: jax.Array) -> jax.Array:
        """γ(t) [B] = γ(0) + (γ(1) − γ(0)) s(t)."""
        g0, g1 = self.endpoints()
        return g0 + (g1 - g0) * self.shape(t)

    def eps(
        self, z: jax.Array, gamma_t: jax.Array, y: jax.Array | None = None, train: bool = False
    ) -> jax.Array:
        """ε̂(z_t) at noise level γ_t [B]."""
        t_net = vdm.snr_net_time(gamma_t, self.gamma_min, self.gamma_max)
        return self.net(z, t_net, y, train=train)

    def __call__(
        self, z: jax.Array, t: jax.Array, y: jax.Array | None = None, train: bool = False
    ) -> jax.Array:
        t = layers.broadcast_times(t, z.shape[0]).astype(jnp.float32)  # [B] in [0, 1]
        return self.eps(z, self.gamma(t), y, train)


def wrap(config: ml_collections.ConfigDict, net: nn.Module) -> ContinuousTimeNet:
    """``net`` with the schedule of ``config.vdm`` (``training.objective="vdm"``)."""
    c, d = config.vdm, config.diffusion
    return ContinuousTimeNet(
        net=net,
        schedule=c.gamma,
        gamma_min=float(c.gamma_min),
        gamma_max=float(c.gamma_max),
        learn_endpoints=bool(c.learn_endpoints),
        hidden=int(c.gamma_hidden),
        beta_start=float(d.beta_start),
        beta_end=float(d.beta_end),
        num_timesteps=int(d.num_timesteps),
    )
