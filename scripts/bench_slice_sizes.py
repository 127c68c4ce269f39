"""What a slice costs by its size: the shipped 2D model with 8-view TTA on whole slices against 256x256 windows.

Behind docs/benchmarks.md's "Whole slices instead of windows": for each slice size, the median time per slice of
``Predictor.predict_batch`` (a batch of 16 normalised 3-channel slices, dihedral TTA) as ``brainseg infer`` runs it
now (the whole slice in one forward) and through MONAI's Gaussian sliding window of the training size (256x256,
overlap 0.25: how it ran before), in one process, after a warm-up.

    python scripts/bench_slice_sizes.py [--sizes 256 288 320] [--repeats 5] [--batch 16]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from brainseg_monai.inference.predictor import Predictor
from brainseg_monai.model import load_model

MODEL = Path(__file__).resolve().parents[1] / "bundle" / "models" / "model.pt"


def per_slice_ms(predictor: Predictor, images: torch.Tensor, repeats: int) -> float:
    """Median milliseconds per slice of ``predictor.predict_batch(images)`` over ``repeats`` calls after one warm-up."""
    predictor.predict_batch(images)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        predictor.predict_batch(images)
        times.append(time.perf_counter() - started)
    return 1000.0 * statistics.median(times) / images.shape[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 288, 320])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, default=16)
    args = parser.parse_args()
    network, spec = load_model(MODEL, "cpu")
    whole = Predictor(network, spec, torch.device("cpu"), tta="dihedral", batch_size=args.batch)
    windows = Predictor(network, spec, torch.device("cpu"), tta="dihedral", batch_size=args.batch)
    windows._network_fn = lambda shape: (lambda x: windows.window(x, windows.network))  # the path before: windows
    generator = torch.Generator().manual_seed(0)
    base = {}
    print("| slice | whole slice, ms/slice | x 256 | 256x256 windows, ms/slice | x 256 | windows / whole |")
    print("|---|---|---|---|---|---|")
    for size in args.sizes:
        images = torch.randn(args.batch, spec.in_channels, size, size, generator=generator)
        a, b = per_slice_ms(whole, images, args.repeats), per_slice_ms(windows, images, args.repeats)
        base.setdefault("whole", a)
        base.setdefault("windows", b)
        print(f"| {size}x{size} | {a:.0f} | {a / base['whole']:.2f} | {b:.0f} | {b / base['windows']:.2f} | {b / a:.2f} |")


if __name__ == "__main__":
    main()
