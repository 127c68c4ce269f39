"""Milliseconds an image of a 2D model's forward on the CPU by the number of images per forward: why ``brainseg infer``
sends its TTA views in chunks (``_CPU_FORWARD_PIXELS`` in ``brainseg_monai/inference/predictor.py``).

    python scripts/bench_forward_batches.py [--checkpoint bundle/models/model.pt] [--images 128] [--repeats 3]

The model runs as ``brainseg infer --precision auto`` runs it (``Predictor``'s inference network) on real LGG slices
read and normalised as inference reads them (the first patients of ``--data``, repeated to ``--images``); every batch
size runs once per round, rounds interleaved, so a change in the load of a shared machine hits them alike. Prints the
median and fastest ms per image of each batch size.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from brainseg_monai.inference.predictor import Predictor, load_for_case
from brainseg_monai.model import load_model

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default=str(REPO / "bundle" / "models" / "model.pt"))
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "lgg" / "kaggle_3m"))
    parser.add_argument("--images", type=int, default=128, help="images timed per batch size and round")
    parser.add_argument("--batches", type=int, nargs="+", default=[4, 8, 16, 32, 128])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    network, spec = load_model(args.checkpoint, "cpu")
    predictor = Predictor(network, spec, torch.device("cpu"), precision="auto")
    slices: list[torch.Tensor] = []
    for patient in sorted(p for p in Path(args.data).iterdir() if p.is_dir()):
        images = sorted(str(p) for p in patient.glob("*.tif") if not p.stem.endswith("_mask"))
        slices += load_for_case("slices", images, spec).slices
        if len(slices) >= args.images:
            break
    batch = torch.stack([slices[i % len(slices)] for i in range(args.images)]).float()
    batch = batch.contiguous(memory_format=torch.channels_last)
    runs: dict[int, list[float]] = {size: [] for size in args.batches}
    with torch.inference_mode():
        predictor.network(batch[:8])  # warm-up: oneDNN's kernels, the allocator
        for _ in range(args.repeats):
            for size in args.batches:
                started = time.perf_counter()
                for start in range(0, args.images, size):
                    predictor.network(batch[start:start + size])
                runs[size].append(1000.0 * (time.perf_counter() - started) / args.images)
    result = {size: {"median_ms_per_image": statistics.median(v), "fastest": min(v)} for size, v in runs.items()}
    print(json.dumps({"model": args.checkpoint, "fast_path": predictor.fast_path.describe(), "images": args.images,
                      "threads": torch.get_num_threads(), "ms_per_image_by_batch": result}, indent=1))


if __name__ == "__main__":
    main()
