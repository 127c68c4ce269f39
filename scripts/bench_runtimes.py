"""Forward-pass runtimes for the default 2D model: eager PyTorch, brainseg's inference network, torch.compile, and
ONNX Runtime when it is installed. It backs the "what did not help" table in docs/benchmarks.md.

    python scripts/bench_runtimes.py --out runtimes.json [--checkpoint bundle/models/model.pt] [--batch 8] [--repeats 7]

Each variant's probabilities are compared with eager PyTorch's (largest absolute difference); times are medians of
``--repeats`` forwards after two warm-up ones, on the same input, in one process. The first call's time is reported
too: it holds torch.compile's compilation.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from brainseg_monai.inference.predictor import inference_network, load_model
from brainseg_monai.networks import get_network


def _time(run: Callable[[], torch.Tensor], repeats: int) -> tuple[float, list[float], torch.Tensor]:
    """(seconds of the first call, which includes any compilation; seconds of each timed call; the last output)."""
    started = time.perf_counter()
    run()
    first = time.perf_counter() - started
    out = run()
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        out = run()
        seconds.append(time.perf_counter() - started)
    return first, seconds, out


def _onnx_runner(network: torch.nn.Module, example: torch.Tensor, work: Path) -> Callable[[], torch.Tensor] | str:
    """An ONNX Runtime session over ``network``'s export, or the reason there is none."""
    try:
        import onnxruntime as ort
    except ImportError:
        return "onnxruntime is not installed (pip install onnxruntime onnx)"
    path = work / "model.onnx"
    try:
        torch.onnx.export(network, (example,), str(path), input_names=["image"], output_names=["logits"],
                          dynamic_axes={"image": {0: "batch"}}, dynamo=False)
    except Exception as error:  # the exporter's failures are many and version-specific: report, don't crash
        return f"export failed: {error}"
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feed = example.numpy()
    return lambda: torch.from_numpy(session.run(None, {"image": feed})[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--checkpoint", type=Path, help="a model.pt with its model.json (default: untrained default)")
    parser.add_argument("--batch", type=int, default=8, help="images per forward (8 = one slice's dihedral TTA)")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()

    torch.manual_seed(0)
    if args.checkpoint:
        network, spec = load_model(args.checkpoint, "cpu")
        channels = spec.in_channels
    else:
        network, channels = get_network("unet", 2, 3, 1).eval(), 3
    example = torch.randn(args.batch, channels, args.size, args.size)
    ours = inference_network(network, "cpu")
    variants: dict[str, Callable[[], torch.Tensor] | str] = {
        "eager": lambda: network(example),
        "inference_network (BN folded, channels-last)": lambda: ours(example.contiguous(memory_format=torch.channels_last)),
    }
    try:
        compiled = torch.compile(ours)
        variants["torch.compile(inference_network)"] = lambda: compiled(example.contiguous(memory_format=torch.channels_last))
    except Exception as error:
        variants["torch.compile(inference_network)"] = f"torch.compile failed: {error}"
    with tempfile.TemporaryDirectory() as work:
        variants["onnxruntime (inference_network export)"] = _onnx_runner(ours, example, Path(work))
        results, reference = {}, None
        with torch.inference_mode():
            for name, run in variants.items():
                if isinstance(run, str):
                    results[name] = {"skipped": run}
                    print(f"{name:48s} skipped: {run}")
                    continue
                try:
                    first, seconds, out = _time(run, args.repeats)
                except Exception as error:
                    results[name] = {"skipped": f"failed: {error}"}
                    print(f"{name:48s} failed: {error}")
                    continue
                probs = torch.sigmoid(out.float())
                reference = probs if reference is None else reference
                median = statistics.median(seconds)
                results[name] = {
                    "median_ms_per_image": 1000 * median / args.batch, "min_s": min(seconds), "max_s": max(seconds),
                    "first_call_s": first,
                    "max_abs_prob_diff_vs_eager": float((probs - reference).abs().max()),
                }
                print(f"{name:48s} {1000 * median / args.batch:8.2f} ms/image  first call {first:6.2f} s  "
                      f"max |p - p_eager| {results[name]['max_abs_prob_diff_vs_eager']:.1e}")
    eager = results["eager"]["median_ms_per_image"]
    for value in results.values():
        if "median_ms_per_image" in value:
            value["speedup_vs_eager"] = eager / value["median_ms_per_image"]
    setup = {"batch": args.batch, "size": args.size, "repeats": args.repeats, "threads": torch.get_num_threads(),
             "torch": torch.__version__, "checkpoint": str(args.checkpoint) if args.checkpoint else None}
    args.out.write_text(json.dumps({"setup": setup, "variants": results}, indent=2))


if __name__ == "__main__":
    main()
