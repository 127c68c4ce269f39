"""How much a 2D model's mask depends on the input's pixel size, with and without resampling to the model's own.

The shared real FLAIR series (REMBRANDT, 0.94 mm) is resampled in-plane to other pixel sizes (SimpleITK, linear, the
same field of view), each copy is segmented by ``brainseg infer`` with the shipped model, and each mask is brought
back onto the original grid (nearest neighbour) and compared with the original's mask by Dice. Run once as shipped
(the model's ``pixel_spacing`` resamples every slice to 0.86 mm) and once with ``pixel_spacing`` removed from a copy
of the model (the network sees the pixels as given). docs/benchmarks.md quotes the table it prints.

    python scripts/pixel_size_experiment.py [--sizes 0.45 1.2] [--tta dihedral] [--work /tmp/pixel-size]
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from brainseg_monai.inference.runner import InferenceSettings, run_inference
from brainseg_monai.io import read_sitk
from brainseg_monai.model import MODEL_SIDECAR, read_sidecar, write_sidecar

REPO = Path(__file__).resolve().parents[1]
SERIES = REPO.parent / "shared" / "data" / "dicom" / "HF1139_AXIAL_FLAIR"


def resampled(image: sitk.Image, size_mm: float) -> sitk.Image:
    """``image`` on a grid of ``size_mm`` pixels in-plane over the same field of view (slices unchanged)."""
    spacing = (size_mm, size_mm, image.GetSpacing()[2])
    size = [int(round(image.GetSize()[k] * image.GetSpacing()[k] / spacing[k])) for k in range(2)] + [image.GetSize()[2]]
    return sitk.Resample(image, size, sitk.Transform(), sitk.sitkLinear, image.GetOrigin(), spacing,
                         image.GetDirection(), 0.0, image.GetPixelID())


def dice(a: np.ndarray, b: np.ndarray) -> float:
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int(np.logical_and(a, b).sum()) / total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=float, nargs="+", default=[0.45, 1.2], help="in-plane pixel sizes (mm)")
    parser.add_argument("--tta", default="dihedral", help="test-time augmentation of brainseg infer")
    parser.add_argument("--work", type=Path, default=Path("/tmp/pixel-size"), help="scratch folder (replaced)")
    args = parser.parse_args()
    shutil.rmtree(args.work, ignore_errors=True)
    source = read_sitk(SERIES)
    inputs = {"original": source, **{f"{s:g}mm": resampled(source, s) for s in args.sizes}}
    for name, image in inputs.items():
        (args.work / "in" / name).mkdir(parents=True)
        sitk.WriteImage(image, str(args.work / "in" / name / f"{name}_flair.nii.gz"))
    plain = args.work / "model_without_pixel_spacing"
    plain.mkdir()
    shutil.copy(REPO / "bundle" / "models" / "model.pt", plain / "model.pt")
    settings = read_sidecar(REPO / "bundle" / "models" / MODEL_SIDECAR)
    write_sidecar(plain / MODEL_SIDECAR, {**settings, "pixel_spacing": None})
    models = {"resampled to the model's 0.86 mm": REPO / "bundle" / "models" / "model.pt",
              "pixels as given": plain / "model.pt"}
    print(f"| input | pixels | {' | '.join(f'Dice vs original, {m}' for m in models)} |")
    print(f"|---|---|{'---|' * len(models)}")
    rows: dict[str, list[str]] = {name: [] for name in inputs}
    for label, checkpoint in models.items():
        masks = {}
        for name, image in inputs.items():
            out = args.work / "out" / label.split()[0] / name
            run_inference([args.work / "in" / name], out, InferenceSettings(str(checkpoint), tta=args.tta,
                                                                             device="cpu", progress=False))
            mask = sitk.ReadImage(str(out / name / "mask.nii.gz"))  # the case folder is named after its folder
            back = sitk.Resample(mask, source, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
            masks[name] = sitk.GetArrayFromImage(back) > 0
        for name in inputs:
            rows[name].append(f"{dice(masks[name], masks['original']):.3f} ({int(masks[name].sum())} voxels)")
    for name, image in inputs.items():
        print(f"| {name} ({image.GetSpacing()[0]:.2f} mm) | {image.GetSize()[0]}x{image.GetSize()[1]} | "
              f"{' | '.join(rows[name])} |")


if __name__ == "__main__":
    main()
