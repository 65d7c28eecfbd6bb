"""Write a data set as memory-mappable arrays, for data sets larger than host memory.

    python -m diffusion_jax.prepare_data --input PATH --output DIR [--image_size 32] [--split train]

``--input``: a folder of images (decoded, centre-cropped and resized to ``--image_size``, into
split ``--split``; class sub-folders give labels), or a ``.npz`` (each array is a split; an
``images`` array goes to ``--split``; ``{split}_labels`` / ``labels`` give labels). ``DIR``
then holds ``{split}.npy`` (uint8 [N, H, W, C]), ``{split}_labels.npy`` (int32 [N]) where there
are labels, and ``dataset.json`` (class names, shapes); train with
``--config.data.dataset=DIR``. Images are written a chunk at a time and read back as a memory
map (``input_pipeline``): neither side holds the whole set in memory. A full disk or Ctrl-C leaves
``DIR`` as it was (one line, exit 1 or 130); a killed run's temporary folder is removed by the
next one.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np
from absl import logging

from diffusion_jax import files, input_pipeline, reporting
from diffusion_jax.data import folder, npz

_CHUNK = 4096  # images per write


def write_split(out: str, split: str, images, labels: np.ndarray | None) -> dict:
    """``{out}/{split}.npy`` from ``images`` (an array or ``input_pipeline.LazyImages``: read
    ``_CHUNK`` rows at a time) and ``{split}_labels.npy``; returns the split's description.

    Written with ``write`` calls, not through a memory map: on a full disk a write raises
    ENOSPC (``prepare``: a WriteError naming the output), where a store into a map kills the
    process with SIGBUS."""
    n = len(images)
    path = os.path.join(out, f"{split}.npy")
    header = {
        "descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)),
        "fortran_order": False,
        "shape": tuple(int(d) for d in images.shape),
    }
    with open(path, "wb") as f:
        np.lib.format.write_array_header_1_0(f, header)
        with reporting.progress_bar(n, f"{split}", unit="image") as bar:
            for start in range(0, n, _CHUNK):
                rows = np.arange(start, min(start + _CHUNK, n))
                f.write(np.ascontiguousarray(images[rows], dtype=np.uint8).tobytes())
                bar.update(len(rows))
        f.flush()
        os.fsync(f.fileno())
    if labels is not None:
        np.save(os.path.join(out, f"{split}_labels.npy"), labels.astype(np.int32))
    return {"num_examples": n, "shape": list(images.shape[1:]), "labels": labels is not None}


def prepare(
    input_path: str, output: str, image_size: int, split: str, overwrite: bool = False
) -> dict:
    """Write ``input_path`` (a folder of images or a .npz) to ``output``; returns dataset.json.

    The set is written whole into a temporary folder beside ``output`` (``OUTPUT.tmp-PID``,
    ``files.atomic_path``: those of dead processes are removed first) and renamed into place,
    so ``output`` holds one complete write or none; a non-empty ``output`` is replaced only
    with ``overwrite``. A failed write (a full disk) raises ``files.WriteError`` naming the
    file and the cause; ``output`` is left as it was."""
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
    final = output.rstrip(os.sep) or output
    with files.atomic_path(final) as tmp:
        os.makedirs(tmp)
        meta = _write(input_path, tmp, image_size, split)
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
        image_files = folder.folder_files(input_path)
        if not image_files:
            raise input_pipeline.DatasetError(f"--input={input_path!r} holds no images.")
        labels, names = folder.folder_classes(input_path, image_files)
        images = input_pipeline.folder_images(tuple(image_files), image_size, input_path)
        splits[split] = write_split(output, split, images, labels)
    meta = {"source": os.path.abspath(input_path), "class_names": list(names), "splits": splits}
    marker = os.path.join(output, input_pipeline.PREPARED_MARKER)
    with open(marker, "w") as f:
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
    except (input_pipeline.DatasetError, files.WriteError) as e:
        raise SystemExit(f"error: {e}") from None
    except KeyboardInterrupt:
        print(f"interrupted: nothing written to {args.output} (as it was).", file=sys.stderr)
        raise SystemExit(130) from None


if __name__ == "__main__":
    main()
