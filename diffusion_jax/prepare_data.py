"""Write a data set as memory-mappable arrays, for data sets larger than host memory.

    python -m diffusion_jax.prepare_data --input PATH --output DIR [--image_size 32] [--split train]

``--input``: a folder of images (decoded, centre-cropped and resized to ``--image_size``, into
split ``--split``; class sub-folders give labels), or a ``.npz`` (each array is a split; an
``images`` array goes to ``--split``; ``{split}_labels`` / ``labels`` give labels). ``DIR``
then holds ``{split}.npy`` (uint8 [N, H, W, C]), ``{split}_labels.npy`` (int32 [N]) where there
are labels, and ``dataset.json`` (class names, shapes); train with
``--config.data.dataset=DIR``. Images are written a chunk at a time and read back as a memory
map (``input_pipeline``): neither side holds the whole set in memory.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil

import numpy as np
from absl import logging

from diffusion_jax import input_pipeline, reporting
from diffusion_jax.data import folder, npz

_CHUNK = 4096  # images per write


def write_split(out: str, split: str, images, labels: np.ndarray | None) -> dict:
    """``{out}/{split}.npy`` from ``images`` (an array or ``input_pipeline.LazyImages``: read
    ``_CHUNK`` rows at a time) and ``{split}_labels.npy``; returns the split's description."""
    n = len(images)
    path = os.path.join(out, f"{split}.npy")
    tmp = path + ".tmp.npy"
    target = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=tuple(images.shape))
    with reporting.progress_bar(n, f"{split}", unit="image") as bar:
        for start in range(0, n, _CHUNK):
            rows = np.arange(start, min(start + _CHUNK, n))
            target[rows[0] : rows[-1] + 1] = images[rows]
            bar.update(len(rows))
    target.flush()
    del target
    os.replace(tmp, path)  # a split is complete or absent
    if labels is not None:
        np.save(os.path.join(out, f"{split}_labels.npy"), labels.astype(np.int32))
    return {"num_examples": n, "shape": list(images.shape[1:]), "labels": labels is not None}


def prepare(
    input_path: str, output: str, image_size: int, split: str, overwrite: bool = False
) -> dict:
    """Write ``input_path`` (a folder of images or a .npz) to ``output``; returns dataset.json.

    The set is written whole into a temporary folder beside ``output`` and renamed into place,
    so ``output`` holds one complete write or none; a non-empty ``output`` is replaced only
    with ``overwrite``."""
    if not os.path.exists(input_path):
        raise input_pipeline.DatasetError(f"--input={input_path!r}: no such file or folder.")
    folder_input = not input_path.endswith(".npz")  # a .npz keeps its arrays' sizes
    if folder_input and (
        isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1
    ):
        raise input_pipeline.DatasetError(
            f"--image_size={image_size!r} must be an integer >= 1 (the side of the images)."
        )
    if os.path.exists(output) and not os.path.isdir(output):
        raise input_pipeline.DatasetError(f"--output={output!r} is a file, not a folder.")
    if os.path.isdir(output) and os.listdir(output) and not overwrite:
        raise input_pipeline.DatasetError(
            f"--output={output!r} is not empty (it holds {sorted(os.listdir(output))[:5]}): "
            "pass --overwrite to replace it, or write to another folder."
        )
    final, output = output, f"{output.rstrip(os.sep)}.tmp-{os.getpid()}"
    shutil.rmtree(output, ignore_errors=True)
    os.makedirs(output)
    try:
        meta = _write(input_path, output, image_size, split)
    except BaseException:
        shutil.rmtree(output, ignore_errors=True)
        raise
    old = f"{final.rstrip(os.sep)}.old-{os.getpid()}"
    if os.path.exists(final):
        os.rename(final, old)
    os.rename(output, final)
    shutil.rmtree(old, ignore_errors=True)
    logging.info(
        "Wrote %s to %s.",
        ", ".join(f"{k} ({v['num_examples']})" for k, v in meta["splits"].items()),
        final,
    )
    return meta


def _write(input_path: str, output: str, image_size: int, split: str) -> dict:
    splits, names = {}, ()
    if input_path.endswith(".npz"):
        with np.load(input_path) as f:
            keys = [k for k in f.files if not k.endswith("_labels") and k != "labels"]
            for key in keys:
                name = split if key == "images" else key
                _, label_key = npz.npz_keys(f.files, name, input_path)
                images = npz.npz_array(f, key, input_path)
                if images.dtype != np.uint8 or images.ndim != 4:
                    raise input_pipeline.DatasetError(
                        f"{input_path}: array {key!r} must be uint8 images [N, H, W, C]; got "
                        f"{images.dtype} {images.shape}."
                    )
                labels = None
                if label_key is not None:
                    where = f"{input_path} (array {label_key!r})"
                    labels = input_pipeline.checked_labels(f[label_key], len(images), where)
                splits[name] = write_split(output, name, images, labels)
    else:
        files = folder.folder_files(input_path)
        if not files:
            raise input_pipeline.DatasetError(f"--input={input_path!r} holds no images.")
        labels, names = folder.folder_classes(input_path, files)
        images = input_pipeline.folder_images(tuple(files), image_size, input_path)
        splits[split] = write_split(output, split, images, labels)
    meta = {"source": os.path.abspath(input_path), "class_names": list(names), "splits": splits}
    with open(os.path.join(output, input_pipeline.PREPARED_MARKER), "w") as f:
        json.dump(meta, f, indent=2)
    return meta


def main(argv: list[str] | None = None) -> None:
    """The command line (argparse: no absl flags, which are global to the process)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", required=True, help="a folder of images or a .npz")
    parser.add_argument("--output", required=True, help="the folder to write")
    parser.add_argument("--image_size", type=int, default=32, help="side of folder images")
    parser.add_argument("--split", default="train", help="the split of a folder / 'images'")
    parser.add_argument(
        "--overwrite", action="store_true", help="replace a non-empty --output folder"
    )
    args = parser.parse_args(argv)
    logging.set_verbosity(logging.INFO)
    try:
        prepare(args.input, args.output, args.image_size, args.split, args.overwrite)
    except input_pipeline.DatasetError as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main()
