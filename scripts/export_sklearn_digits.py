"""Write scikit-learn's bundled handwritten digits (UCI optical recognition, 1,797 images of 8 x 8, ten classes)
as an image folder, so a machine without a network has a fourth real dataset for ``image_folder:PATH``.

    pip install scikit-learn
    python scripts/export_sklearn_digits.py data/sklearn_digits
    python train.py experiment=dwa_sequence method=dwa

The layout is torchvision's ``ImageFolder``: ``DIR/<digit>/<index>.png``, grey, the 17 grey levels of the data
scaled to 0..255. lifelong holds out a fixed 20 % of each class as the test split.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path)
    args = parser.parse_args()
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:
        raise SystemExit("this script reads the digits that scikit-learn ships: pip install scikit-learn") from err
    digits = load_digits()
    images = np.round(digits.images * 255 / 16).astype(np.uint8)  # values 0..16
    for i, (image, label) in enumerate(zip(images, digits.target, strict=True)):
        folder = args.folder / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image, mode="L").save(folder / f"{i:04d}.png")
    print(f"wrote {len(images)} images in {len(set(digits.target))} class folders to {args.folder}")


if __name__ == "__main__":
    main()
