"""Noise schedules beta_1..beta_T, computed in float64 NumPy.

Index ``t`` of the returned array is the zero-based step (``betas[0]`` is the paper's beta_1).
"""

import math

import numpy as np

__all__ = ["SCHEDULES", "check_betas", "get_beta_schedule"]

_SCHEDULE_KWARGS = {
    "linear": {"beta_start": 1e-4, "beta_end": 0.02},
    "quadratic": {"beta_start": 1e-4, "beta_end": 0.02},
    "const": {"beta": 0.02},
    "cosine": {"s": 0.008, "max_beta": 0.999},
}
SCHEDULES = tuple(_SCHEDULE_KWARGS)  # the names get_beta_schedule knows


def _cosine(num_timesteps: int, s: float, max_beta: float) -> np.ndarray:
    """Nichol & Dhariwal (2021): abar(u) = cos^2((u + s) / (1 + s) * pi / 2), u = t / T,
    beta_t = min(1 - abar(t / T) / abar((t - 1) / T), max_beta) for the paper's t = 1..T."""
    u = np.arange(num_timesteps + 1, dtype=np.float64) / num_timesteps  # [T + 1]
    abar = np.cos((u + s) / (1.0 + s) * math.pi / 2.0) ** 2
    return np.minimum(1.0 - abar[1:] / abar[:-1], max_beta)


def get_beta_schedule(name: str, num_timesteps: int, **kw: float) -> np.ndarray:
    """Returns the float64 betas [T] of a named schedule.

    - ``linear`` (Ho et al.): beta_t evenly spaced from ``beta_start`` (1e-4) to ``beta_end``
      (0.02).
    - ``quadratic``: sqrt(beta_t) evenly spaced from sqrt(beta_start) to sqrt(beta_end).
    - ``const``: beta_t = ``beta`` (0.02) for every t.
    - ``cosine``: Nichol & Dhariwal's abar(u) = cos^2((u + s)/(1 + s) pi/2), betas clipped at
      ``max_beta`` (s = 0.008, max_beta = 0.999).

    Raises:
      ValueError: unknown ``name`` or keyword, ``num_timesteps < 1``, or any beta outside (0, 1).
    """
    if name not in _SCHEDULE_KWARGS:
        raise ValueError(f"Unknown beta schedule {name!r}; allowed: {sorted(_SCHEDULE_KWARGS)}.")
    if isinstance(num_timesteps, bool) or not isinstance(num_timesteps, int | np.integer):
        raise ValueError(f"num_timesteps must be an int >= 1, got {num_timesteps!r}.")
    if num_timesteps < 1:
        raise ValueError(f"num_timesteps must be >= 1, got {num_timesteps}.")
    unknown = set(kw) - set(_SCHEDULE_KWARGS[name])
    if unknown:
        raise ValueError(
            f"Unknown keyword(s) {sorted(unknown)} for schedule {name!r}; "
            f"allowed: {sorted(_SCHEDULE_KWARGS[name])}."
        )
    p = {**_SCHEDULE_KWARGS[name], **kw}
    for key, value in p.items():
        if key != "s" and not 0.0 < value < 1.0:
            raise ValueError(f"{key} = {value!r} for schedule {name!r} must lie in (0, 1).")
    if name == "linear":
        betas = np.linspace(p["beta_start"], p["beta_end"], num_timesteps, dtype=np.float64)
    elif name == "quadratic":
        betas = np.linspace(p["beta_start"] ** 0.5, p["beta_end"] ** 0.5, num_timesteps) ** 2
    elif name == "const":
        betas = np.full(num_timesteps, p["beta"], dtype=np.float64)
    else:
        betas = _cosine(num_timesteps, p["s"], p["max_beta"])
    betas = np.asarray(betas, dtype=np.float64)
    check_betas(betas, context=f"schedule {name!r} with {p}")
    return betas


def check_betas(betas: np.ndarray, context: str = "betas") -> None:
    """Raises ValueError unless ``betas`` is a non-empty 1-D array of finite values in (0, 1)."""
    if betas.ndim != 1 or betas.size < 1:
        raise ValueError(
            f"{context}: betas must be a non-empty 1-D array, got shape {betas.shape}."
        )
    bad = ~(np.isfinite(betas) & (betas > 0.0) & (betas < 1.0))
    if bad.any():
        i = int(np.argmax(bad))
        raise ValueError(
            f"{context}: every beta must lie in the open interval (0, 1); "
            f"beta[{i}] = {betas[i]!r} does not ({int(bad.sum())} bad value(s))."
        )
