"""Copy LGG patient folders with their pre- and post-contrast channels replaced by FLAIR, the way the dataset itself
fills a missing sequence: what the model sees of a study that has only a FLAIR series (issue 28, "FLAIR-only").

    python scripts/flair_only_copy.py ../shared/data/lgg/kaggle_3m/TCGA_* --out runs/flair_only
    brainseg infer runs/flair_only --out pred_flair && brainseg evaluate pred_flair --truth runs/flair_only --source lgg --out report_flair

Each ``<patient>_<n>.tif`` is written again with channel 1 (FLAIR) in all three; the masks are linked, not copied.
An existing output folder is refused, so nothing is overwritten.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np
import tifffile


def copy_flair_only(patients: list[Path], out: Path) -> int:
    """Write the FLAIR-only copies of ``patients`` under ``out``; returns the number of slices written."""
    if out.exists():
        raise SystemExit(f"{out}: exists already; choose a new folder")
    written = 0
    for patient in patients:
        target = out / patient.name
        target.mkdir(parents=True)
        for path in sorted(patient.glob("*.tif")):
            if path.stem.endswith("_mask"):
                os.symlink(path.resolve(), target / path.name)
                continue
            image = tifffile.imread(path)
            if image.ndim != 3 or image.shape[-1] != 3:
                raise SystemExit(f"{path}: not an RGB slice (shape {image.shape})")
            flair = np.repeat(image[..., 1:2], 3, axis=-1)
            tifffile.imwrite(target / path.name, flair, photometric="rgb", compression="deflate")
            written += 1
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("patients", nargs="+", type=Path, help="LGG patient folders")
    parser.add_argument("--out", required=True, type=Path, help="new folder for the copies")
    args = parser.parse_args()
    print(f"{copy_flair_only(args.patients, args.out)} slices of {len(args.patients)} patients -> {args.out}")


if __name__ == "__main__":
    main()
