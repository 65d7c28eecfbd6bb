"""Toy 2-D (vector) distributions of ``data.toy_distributions``: fresh points each step, or a fixed
draw (``data.toy_size``; other splits always a fixed draw)."""

from __future__ import annotations

import jax
import numpy as np

from diffusion_jax.data import toy_distributions
from diffusion_jax.data.base import DatasetError, DataSource, Source, split_id


def load(config, split: str) -> DataSource:
    """Training draws fresh points each step unless data.toy_size fixes a finite set; other
    splits are always a fixed draw (of eval.num_examples points by default)."""
    name = config.data.dataset
    n = config.data.toy_size
    if split != config.data.train_split:
        n = n or config.eval.num_examples or 10_000
    if not n:
        return DataSource(None, toy_name=name)
    key = jax.random.fold_in(jax.random.key(config.seed), split_id(split))
    return DataSource(np.asarray(toy_distributions.sample(name, key, n), np.float32))


def validate(config) -> None:
    if config.data.image_size:
        raise DatasetError(
            f"data.dataset={config.data.dataset!r} is a toy vector data set: set "
            f"data.image_size=0 (got {config.data.image_size}) and data.num_channels to its "
            "dimension."
        )


SOURCE = Source(
    matches=lambda name, data: name in toy_distributions.NAMES,
    load=load,
    unlabelled_reason=lambda config: (
        f"data.dataset={config.data.dataset!r} is a toy data set, which has no labels"
    ),
    validate=validate,
)
