"""scikit-learn's 1,797 handwritten digits (8x8, levels 0..16): real data inside a package."""

from __future__ import annotations

import numpy as np

from diffusion_jax.data.base import DatasetError, DataSource, Source

NAME = "digits"


def load(config, split: str) -> DataSource:
    """1,500 train, 297 test (a fixed permutation, whatever the seed) or 'all'; the labels are the
    digits' ``target`` (0..9) of the same rows."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = digits.images.astype(np.uint8)  # [1797, 8, 8], levels 0..16
    order = np.random.default_rng(0).permutation(len(images))  # fixed split, whatever the seed
    images = images[order][..., None]  # [1797, 8, 8, 1]
    labels = digits.target[order].astype(np.int32)  # [1797]
    rows = {"train": slice(0, 1500), "test": slice(1500, None), "all": slice(None)}
    if split not in rows:
        raise DatasetError(f"digits has splits 'train', 'test' and 'all', not {split!r}.")
    names = tuple(str(k) for k in range(10))
    return DataSource(images[rows[split]], labels=labels[rows[split]], class_names=names)


SOURCE = Source(
    matches=lambda name, data: name == NAME,
    load=load,
    unlabelled_reason=lambda config: None,
)
