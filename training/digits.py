"""Write scikit-learn's handwritten digits as an image folder (root/<digit>/<n>.png) for the README tutorial.

The 1,797 8x8 digits ship inside the scikit-learn wheel (`sklearn.datasets.load_digits` reads a file in
the package; nothing is downloaded), so the whole own-data path - `satml train --data <folder>` ->
`satml export` -> `satml-serve` -> `/classify` - can be run and tested on real images anywhere.
scikit-learn is a `dev` extra, not a dependency of the service.

    python -m training.digits /tmp/digits/png --size 16
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image


def write_digits(out: str | Path, size: int = 16, per_class: int | None = None) -> dict[str, int]:
    """Write the digits as grayscale PNGs of size x size (bilinear from 8x8; 8 keeps them as shipped) under
    out/<digit>/; `per_class` keeps only the first n of each digit (tiny slices for tests). Returns the
    number written per class."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:  # a dev extra: say how to get it rather than a bare ModuleNotFoundError
        raise RuntimeError("scikit-learn is needed for the digits data set: pip install -e '.[dev]'") from e
    if size < 8:
        raise ValueError(f"size must be >= 8 (the digits are 8x8), got {size}")
    digits = load_digits()
    images = np.round(digits.images * (255 / 16)).astype(np.uint8)  # stored as 0..16 intensities
    root = Path(out)
    written: dict[str, int] = {}
    for digit in range(10):
        folder = root / str(digit)
        folder.mkdir(parents=True, exist_ok=True)
        idx = np.flatnonzero(digits.target == digit)[:per_class]
        for i in idx:
            img = Image.fromarray(images[i], mode="L")
            if size != 8:
                img = img.resize((size, size), Image.Resampling.BILINEAR)
            img.save(folder / f"{i:04d}.png")
        written[str(digit)] = len(idx)
    return written


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.digits", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", help="folder to write out/<digit>/<n>.png into")
    p.add_argument("--size", type=int, default=16, help="side of the written images in pixels (8: as shipped)")
    p.add_argument("--per-class", type=int, default=None, help="only the first N images of each digit")
    args = p.parse_args(argv)
    written = write_digits(args.out, args.size, args.per_class)
    sys.stdout.write(json.dumps({"out": args.out, "images": sum(written.values()), "per_class": written}) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
