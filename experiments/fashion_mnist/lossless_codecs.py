"""Lossless codecs on the Fashion-MNIST test set: the anchors the model's bound is read against.

    python experiments/fashion_mnist/lossless_codecs.py [--idx_dir DIR]

The 10,000 test images of DIR (default /usr/share/datasets/fashion-mnist; 28x28, 8 bits) laid
out as one 100x100 mosaic (2800x2800 grey), each codec's file size in bits over the 7,840,000
pixels: JPEG XL (``cjxl -d 0 -e 9``, Debian's libjxl-tools), WebP (``cwebp -lossless -z 9``,
Debian's webp) and PNG (Pillow, compress_level 9, optimize). Every file is decoded again and
compared with the mosaic, so a size counts only when the codec was lossless.
Writes ``results/lossless_codecs.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile

import numpy as np
from PIL import Image

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, ROOT)

from diffusion_jax.data import idx  # noqa: E402


def mosaic(images: np.ndarray, per_row: int = 100) -> np.ndarray:
    """[N, H, W] uint8 -> [N/per_row * H, per_row * W], row-major."""
    n, h, w = images.shape
    rows = n // per_row
    return images.reshape(rows, per_row, h, w).transpose(0, 2, 1, 3).reshape(rows * h, per_row * w)


def _version(cmd: str) -> str:
    out = subprocess.run([cmd, "-version" if cmd == "cwebp" else "--version"], capture_output=True)
    return (out.stdout or out.stderr).decode().splitlines()[0].strip()


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--idx_dir", default="/usr/share/datasets/fashion-mnist")
    parser.add_argument("--out", default=os.path.join(HERE, "results", "lossless_codecs.json"))
    args = parser.parse_args(argv)
    path = os.path.join(args.idx_dir, "t10k-images-idx3-ubyte.gz")
    if not os.path.exists(path):
        path = path[: -len(".gz")]
    images = idx.read_idx(path)  # [10000, 28, 28] uint8
    image = mosaic(images)
    pixels = image.size
    out = {"images": int(images.shape[0]), "mosaic": list(image.shape), "pixels": pixels}
    with tempfile.TemporaryDirectory() as tmp:
        png = os.path.join(tmp, "mosaic.png")
        Image.fromarray(image).save(png, compress_level=9, optimize=True)
        files = {"png (Pillow, compress_level 9, optimize)": (png, png)}
        codecs = {
            "jpeg_xl (cjxl -d 0 -e 9)": ("cjxl", ["-d", "0", "-e", "9"], "jxl", "djxl"),
            "webp (cwebp -lossless -z 9)": ("cwebp", ["-lossless", "-z", "9"], "webp", "dwebp"),
        }
        for name, (enc, flags, ext, dec) in codecs.items():
            if shutil.which(enc) is None or shutil.which(dec) is None:
                print(f"{enc}/{dec} not found: skipped ({name})")
                continue
            coded = os.path.join(tmp, f"mosaic.{ext}")
            args_ = [enc, png, coded, *flags] if enc == "cjxl" else [enc, *flags, png, "-o", coded]
            subprocess.run(args_, check=True, capture_output=True)
            back = os.path.join(tmp, f"back_{ext}.png")
            subprocess.run(
                [dec, coded, back] if dec == "djxl" else [dec, coded, "-o", back],
                check=True,
                capture_output=True,
            )
            files[name] = (coded, back)
            out[f"{enc}_version"] = _version(enc)
        for name, (coded, back) in files.items():
            decoded = np.asarray(Image.open(back).convert("L"))
            if not np.array_equal(decoded, image):
                raise SystemExit(f"{name}: the decoded mosaic differs from the original")
            size = os.path.getsize(coded)
            out[name] = {"bytes": size, "bits_per_dim": 8 * size / pixels}
            print(f"{name}: {size:,} bytes, {8 * size / pixels:.4f} bits/dim (lossless: checked)")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)
    return out


if __name__ == "__main__":
    main()
