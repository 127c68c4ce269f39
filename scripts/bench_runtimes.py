"""Forward-pass runtimes of a 2D model: eager PyTorch, brainseg's inference network, torch.compile, ONNX Runtime when
it is installed and, for a model with instance norm (the shipped one), ways of making the norm cheaper. It backs the
"what did not help" table and "The shipped model" in docs/benchmarks.md.

    python scripts/bench_runtimes.py --out runtimes.json [--checkpoint bundle/models/model.pt] [--batch 8] [--repeats 7]

Each variant's probabilities are compared with eager PyTorch's (largest absolute difference); the variants run
interleaved, round after round on the same input in one process (a change in the load of a shared machine hits them
alike), after two warm-up calls each; the median and the fastest of ``--repeats`` rounds are reported, and the first
call's time, which holds torch.compile's compilation. The instance-norm variants replace every ``InstanceNorm2d`` of
the inference network (:func:`~brainseg_monai.inference.predictor.inference_network`):

- bfloat16 autocast of the whole forward, or bfloat16 for the norms only (cast in and out of each norm);
- ``torch.nn.functional.group_norm`` with one group per channel (the same statistics as instance norm), as
  ``brainseg infer --precision auto`` runs it on CPU (``GroupInstanceNorm``);
- the statistics by ``torch.var_mean`` over the spatial axes, which reduces a channels-last tensor where it lies
  (``instance_norm`` reshapes it to one batch-norm channel per image and channel, a copy for channels-last);
- ``torch.compile`` of that norm (one compiled function shared by every norm);
- the inference network in the contiguous layout instead of channels-last (instance norm's reshape is then a view).

bfloat16 runs on any CPU, but at speed only where the CPU has bfloat16 instructions (``setup.cpu_bf16`` says which
it reports); elsewhere it is emulated and the timing says so.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from brainseg_monai.inference.predictor import cpu_bf16_flags, inference_network
from brainseg_monai.model import load_model
from brainseg_monai.networks import get_network

Runner = Callable[[], torch.Tensor]


def _onnx_runner(network: torch.nn.Module, example: torch.Tensor, work: Path) -> Runner | str:
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


class _Bf16Norm(torch.nn.Module):
    """Instance norm computed in bfloat16: the input cast down, the output cast back to float32."""

    def __init__(self, norm: torch.nn.InstanceNorm2d) -> None:
        super().__init__()
        self.norm = norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x.to(torch.bfloat16)).to(x.dtype)


def _var_mean_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    """Instance norm without affine: each image's channel z-scored over the spatial axes (population variance)."""
    var, mean = torch.var_mean(x, dim=tuple(range(2, x.dim())), keepdim=True, correction=0)
    return (x - mean) * torch.rsqrt(var + eps)


_compiled_norm = torch.compile(_var_mean_norm, dynamic=False)


class _VarMeanNorm(torch.nn.Module):
    """Instance norm by :func:`_var_mean_norm`, eager or compiled."""

    def __init__(self, norm: torch.nn.InstanceNorm2d, compiled: bool = False) -> None:
        super().__init__()
        self.eps, self.fn = norm.eps, (_compiled_norm if compiled else _var_mean_norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x, self.eps)


def _with_norms(network: torch.nn.Module,
                make: Callable[[torch.nn.InstanceNorm2d], torch.nn.Module]) -> torch.nn.Module:
    """A copy of ``network`` with every affine-free ``InstanceNorm2d`` replaced by ``make(norm)``."""
    network = copy.deepcopy(network)
    for parent in list(network.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, torch.nn.InstanceNorm2d) and not child.affine and not child.track_running_stats:
                setattr(parent, name, make(child))
    return network


def _bf16_forward(network: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.autocast("cpu", dtype=torch.bfloat16):
        return network(x).float()


def _norm_variants(ours: torch.nn.Module, network: torch.nn.Module, x_last: torch.Tensor,
                   x: torch.Tensor) -> dict[str, Runner]:
    """The instance-norm variants (see the module's docstring), all on the inference network."""
    contiguous = inference_network(network, "cpu").to(memory_format=torch.contiguous_format)
    group = inference_network(network, "cpu", group_instance_norm=True)
    var_mean = _with_norms(ours, _VarMeanNorm)
    compiled = _with_norms(ours, lambda norm: _VarMeanNorm(norm, compiled=True))
    bf16_norms = _with_norms(ours, _Bf16Norm)
    return {
        "inference_network, contiguous layout": lambda: contiguous(x),
        "bf16 autocast, whole forward": lambda: _bf16_forward(ours, x_last),
        "bf16 norms only": lambda: bf16_norms(x_last),
        "instance norm as group_norm (one group per channel; --precision auto)": lambda: group(x_last),
        "instance norm by var_mean (channels-last)": lambda: var_mean(x_last),
        "torch.compile of the norm (var_mean)": lambda: compiled(x_last),
    }


def _run_interleaved(variants: dict[str, Runner], repeats: int) -> dict[str, dict]:
    """Time every variant: a first call and a warm-up each, then ``repeats`` rounds of one call of each variant."""
    firsts, outputs, failed = {}, {}, {}
    for name, run in variants.items():
        try:
            started = time.perf_counter()
            run()
            firsts[name] = time.perf_counter() - started
            outputs[name] = run()
        except Exception as error:  # a variant this build cannot run (compiler, exporter) is reported, not fatal
            failed[name] = f"failed: {error}"
    seconds: dict[str, list[float]] = {name: [] for name in outputs}
    for _ in range(repeats):
        for name in outputs:
            started = time.perf_counter()
            variants[name]()
            seconds[name].append(time.perf_counter() - started)
    results = {name: {"skipped": reason} for name, reason in failed.items()}
    for name in outputs:
        results[name] = {"first_call_s": firsts[name], "seconds": seconds[name], "output": outputs[name]}
    return results


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
    example_last = example.contiguous(memory_format=torch.channels_last)
    ours = inference_network(network, "cpu")
    variants: dict[str, Runner | str] = {
        "eager": lambda: network(example),
        "inference_network (BN folded, channels-last)": lambda: ours(example_last),
    }
    has_instance_norm = any(isinstance(m, torch.nn.InstanceNorm2d) for m in network.modules())
    if has_instance_norm:
        variants.update(_norm_variants(ours, network, example_last, example))
    compiled = torch.compile(ours)
    variants["torch.compile(inference_network)"] = lambda: compiled(example_last)
    with tempfile.TemporaryDirectory() as work, torch.inference_mode():
        variants["onnxruntime (inference_network export)"] = _onnx_runner(ours, example, Path(work))
        runnable = {name: run for name, run in variants.items() if not isinstance(run, str)}
        timed = _run_interleaved(runnable, args.repeats)
    reference = torch.sigmoid(timed["eager"]["output"].float())
    eager_ms = 1000 * statistics.median(timed["eager"]["seconds"]) / args.batch
    results = {}
    for name, run in variants.items():
        value = {"skipped": run} if isinstance(run, str) else timed[name]
        if "skipped" in value:
            results[name] = value
            print(f"{name:60s} skipped: {value['skipped']}")
            continue
        probs = torch.sigmoid(value["output"].float())
        median, fastest = (1000 * f(value["seconds"]) / args.batch for f in (statistics.median, min))
        results[name] = {
            "median_ms_per_image": median, "min_ms_per_image": fastest, "seconds": value["seconds"],
            "first_call_s": value["first_call_s"], "speedup_vs_eager": eager_ms / median,
            "max_abs_prob_diff_vs_eager": float((probs - reference).abs().max()),
        }
        print(f"{name:60s} {median:8.2f} ms/image (fastest {fastest:7.2f})  first call {value['first_call_s']:6.2f} s"
              f"  max |p - p_eager| {results[name]['max_abs_prob_diff_vs_eager']:.1e}")
    setup = {"batch": args.batch, "size": args.size, "repeats": args.repeats, "threads": torch.get_num_threads(),
             "torch": torch.__version__, "checkpoint": str(args.checkpoint) if args.checkpoint else None,
             "cpu_bf16": sorted(cpu_bf16_flags()), "instance_norm": has_instance_norm}
    args.out.write_text(json.dumps({"setup": setup, "variants": results}, indent=2))


if __name__ == "__main__":
    main()
