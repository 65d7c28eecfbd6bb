"""Inception-v3 weights that can be trusted: fetched, verified against a pinned SHA-256, read
from array formats that cannot run code, and assigned onto the Flax network.

No pretrained weights ship with the library. They load from ``eval.inception.weights`` (a path or
an http(s)/file URL) after their SHA-256 is checked against ``eval.inception.sha256``, and only
from ``.npz`` (``allow_pickle=False``, every member a plain ``.npy``) or safetensors. Pickles and
PyTorch checkpoints are refused. Keys are either the Flax layout of ``InceptionV3``
(``params/Mixed_5b/branch1x1/conv/kernel``, ``batch_stats/.../bn/mean``; what
``save_variables_npz`` writes) or the PyTorch layout of pytorch-fid's state dict
(``Mixed_5b.branch1x1.conv.weight`` [O, I, kh, kw], ``...bn.running_mean``, ``fc.weight``), which
is transposed onto the Flax tree.
"""

from __future__ import annotations

import hashlib
import os
import urllib.parse
import urllib.request
import zipfile
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from diffusion_jax import safe_arrays
from diffusion_jax.models.inception import InceptionV3, abstract_variables


class WeightsError(ValueError):
    """Inception weights that are not configured, not reachable, not verified or do not fit."""


def sha256_of(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def verify_sha256(path: str, expected: str) -> None:
    """Raise WeightsError unless the file's SHA-256 equals the pinned ``expected`` (hex)."""
    actual = sha256_of(path)
    if not expected:
        raise WeightsError(
            f"No SHA-256 is pinned for {path} (its SHA-256 is {actual}): set "
            "eval.inception.sha256 to the published hash of the file you trust; unverified "
            "weights are not used."
        )
    if actual != expected.strip().lower():
        raise WeightsError(
            f"SHA-256 mismatch for {path}: expected {expected}, got {actual}. The file is not "
            "the pinned one (corrupt, truncated or different weights): not used."
        )


def fetch_weights(spec: str, sha256: str, cache_dir: str) -> str:
    """A local, verified copy of the weights named by ``spec`` (a path or an http(s)/file URL).

    A URL is downloaded once into ``cache_dir`` (to a temporary name, renamed when its hash is
    verified); a path is used in place. Raises WeightsError when unreachable or unverified.
    """
    if not spec:
        raise WeightsError(
            "No Inception weights configured (eval.inception.weights is empty): FID/IS need the "
            "FID Inception-v3 weights as .npz or .safetensors, with eval.inception.sha256."
        )
    scheme = urllib.parse.urlparse(spec).scheme
    if scheme in ("http", "https", "file"):
        suffix = os.path.splitext(urllib.parse.urlparse(spec).path)[1] or ".bin"
        path = os.path.join(cache_dir, f"inception-{(sha256 or 'unpinned')[:16]}{suffix}")
        if not os.path.exists(path):
            os.makedirs(cache_dir, exist_ok=True)
            tmp = path + f".part{os.getpid()}"
            try:
                with urllib.request.urlopen(spec, timeout=60) as r, open(tmp, "wb") as f:
                    for block in iter(lambda: r.read(1 << 20), b""):
                        f.write(block)
            except OSError as e:
                if os.path.exists(tmp):
                    os.remove(tmp)
                raise WeightsError(f"Could not download Inception weights from {spec}: {e}") from e
            try:
                verify_sha256(tmp, sha256)
            except WeightsError:
                os.remove(tmp)
                raise
            os.replace(tmp, path)
    else:
        path = os.path.expanduser(spec)
        if not os.path.isfile(path):
            raise WeightsError(f"Inception weights file {path} does not exist.")
    verify_sha256(path, sha256)
    return path


def read_arrays(path: str) -> dict[str, np.ndarray]:
    """The named arrays of a ``.npz`` or safetensors file; anything else is refused.

    The format is decided by the file's first bytes, not its name: a zip whose members are all
    ``.npy`` files is read with ``allow_pickle=False`` (a PyTorch zip checkpoint, with its
    ``data.pkl``, is refused); an 8-byte little-endian header length followed by a JSON header is
    safetensors; a pickle (or anything else) is refused without being parsed.
    """
    with open(path, "rb") as f:
        head = f.read(16)
    if head.startswith(b"PK"):
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
        bad = [n for n in names if not n.endswith(".npy")]
        if bad:
            raise WeightsError(
                f"{path} is a zip archive with members that are not .npy arrays ({bad[:3]}): "
                "probably a PyTorch checkpoint, which is a pickle and is not loaded. Convert it "
                "to .npz or .safetensors on a machine you trust."
            )
        try:
            with np.load(path, allow_pickle=False) as npz:
                return {k: np.asarray(npz[k]) for k in npz.files}
        except ValueError as e:  # object arrays: pickled data inside the .npy
            raise WeightsError(f"{path} holds object arrays (pickled data): refused ({e}).") from e
    if len(head) >= 9 and head[8:9] == b"{":
        return _read_safetensors(path)
    kind = "a pickle" if head[:1] == b"\x80" else "not .npz or safetensors"
    raise WeightsError(
        f"{path} is {kind}; only .npz and safetensors weights are loaded (pickles can run code)."
    )


def _read_safetensors(path: str) -> dict[str, np.ndarray]:
    """The tensors of a safetensors file, read by the ``safetensors`` package."""
    try:
        return safe_arrays.read(path)
    except ValueError as e:
        raise WeightsError(str(e)) from e


def flatten_variables(variables: Any) -> dict[str, Any]:
    """{'params/Mixed_5b/branch1x1/conv/kernel': leaf, ...} for a Flax variables tree."""
    flat = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(variables)[0]:
        flat["/".join(str(getattr(k, "key", k)) for k in path)] = leaf
    return flat


def save_variables_npz(path: str, variables: Any) -> None:
    """Write a variables tree as ``.npz`` in the Flax layout ``read_arrays`` loads."""
    arrays = {k: np.asarray(v) for k, v in flatten_variables(variables).items()}
    np.savez(path, **arrays)


def _torch_to_flax(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """pytorch-fid state-dict names and layouts -> the Flax layout.

    conv.weight [O, I, kh, kw] -> params/.../conv/kernel [kh, kw, I, O]; bn.weight/bias ->
    params/.../bn/scale/bias; bn.running_mean/var -> batch_stats/.../bn/mean/var;
    fc.weight [K, 2048] -> params/fc/kernel [2048, K]; fc.bias -> params/fc/bias. Buffers
    ``num_batches_tracked`` and the auxiliary classifier ``AuxLogits.*`` are dropped.
    """
    out = {}
    for name, a in arrays.items():
        if name.endswith("num_batches_tracked") or name.startswith("AuxLogits."):
            continue
        *mods, leaf = name.split(".")
        prefix = "/".join(mods)
        if mods and mods[-1] == "bn":
            new = {
                "weight": f"params/{prefix}/scale",
                "bias": f"params/{prefix}/bias",
                "running_mean": f"batch_stats/{prefix}/mean",
                "running_var": f"batch_stats/{prefix}/var",
            }.get(leaf)
        elif leaf == "weight" and a.ndim == 4:
            new, a = f"params/{prefix}/kernel", np.transpose(a, (2, 3, 1, 0))
        elif leaf == "weight" and a.ndim == 2:
            new, a = f"params/{prefix}/kernel", a.T
        elif leaf == "bias":
            new = f"params/{prefix}/bias"
        else:
            new = None
        out[new or f"<unmapped>/{name}"] = a
    return out


def assign_variables(arrays: dict[str, np.ndarray], target: Any, source: str = "weights") -> Any:
    """Map named arrays onto the structure of ``target`` (a variables tree of arrays or
    ShapeDtypeStructs): every leaf must be present with its shape; extra names are errors too.
    PyTorch-layout names (``a.b.weight``) are converted first. Floats are cast to the target dtype.
    """
    if arrays and all("/" not in k for k in arrays):
        arrays = _torch_to_flax(arrays)
    flat = flatten_variables(target)
    missing = sorted(set(flat) - set(arrays))
    unexpected = sorted(set(arrays) - set(flat))
    wrong = [
        f"{k}: file {tuple(arrays[k].shape)} vs model {tuple(flat[k].shape)}"
        for k in sorted(set(flat) & set(arrays))
        if tuple(arrays[k].shape) != tuple(flat[k].shape)
    ]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[:3]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})")
        if wrong:
            parts.append(f"{len(wrong)} with the wrong shape (e.g. {wrong[:3]})")
        raise WeightsError(
            f"{source} do not fit the Inception-v3 variables: " + "; ".join(parts) + "."
        )
    leaves, treedef = jax.tree_util.tree_flatten(target)
    values = [jnp.asarray(arrays[k], flat[k].dtype) for k in flat]
    assert len(values) == len(leaves)
    return jax.tree_util.tree_unflatten(treedef, values)


def load_inception(config: ml_collections.ConfigDict, cache_dir: str) -> tuple[InceptionV3, Any]:
    """(model, variables) from the configured, verified weights; raises WeightsError."""
    path = fetch_weights(config.eval.inception.weights, config.eval.inception.sha256, cache_dir)
    model = InceptionV3()
    variables = assign_variables(read_arrays(path), abstract_variables(model), source=path)
    logging.info("Loaded Inception-v3 weights from %s (SHA-256 verified).", path)
    return model, variables
