"""Named arrays from files that cannot run code when read: safetensors, through the
``safetensors`` package (a JSON header and raw little-endian data; never a pickle)."""

from __future__ import annotations

import numpy as np


def read(path: str) -> dict[str, np.ndarray]:
    """Every tensor of the safetensors file ``path`` as a numpy array (its own dtype).

    Raises ValueError naming the file when it is not safetensors (truncated, a bad header, a
    dtype numpy lacks, e.g. bfloat16) or cannot be read."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    try:
        return dict(load_file(path))
    except (SafetensorError, OSError, TypeError, ValueError) as e:
        raise ValueError(
            f"{path} cannot be read as safetensors ({type(e).__name__}: "
            f"{' '.join(str(e).split())[:200]})."
        ) from e
