"""Measured performance of ``brainseg infer`` and of training, in one run on one machine.

Inference is timed with the model users run: a checkpoint, by default the shipped model (``bundle/models/model.pt``,
an instance-norm U-Net); ``model`` in the result names it, its normalisation and the precision of its fast path.
The default batch-norm U-Net (untrained; speed does not depend on the weights) is timed beside it as one named row,
its forward on the same batches.

The headline figures are ratios, so that they carry over between machines better than seconds do:
``tta_speedup_vs_monai_tta`` (our end-to-end 8-way TTA against MONAI's ``TestTimeAugmentation`` with the same model),
``tta_overhead_pct`` (how much of our end-to-end time is not the network's forward), ``forward_fraction_of_matmul_peak``
(the forward's FLOP/s over a large fp32 matmul's), ``train_data_overhead_pct`` (time lost to the bundle's data
pipeline in training steps), plus ``scaling`` of ``brainseg infer`` over the number of cases and processes and a
240x240x155 volume through a 3D and a 2D model. Timings are medians over repeats with min and max; every part reports
the peak resident memory of the process that ran it (see :class:`PeakMemory` and :func:`run_command`).
"""

from __future__ import annotations

import json
import logging
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import monai
import numpy as np
import pydicom
import torch
from monai.bundle import ConfigParser
from monai.data import TestTimeAugmentation
from monai.inferers import SlidingWindowInferer
from monai.transforms import Compose, RandFlipd, RandRotate90d
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from skimage.transform import resize
from torch.utils.flop_counter import FlopCounterMode

from brainseg_monai.devices import resolve_device
from brainseg_monai.errors import InputError
from brainseg_monai.channel_roles import InputRoles
from brainseg_monai.inference.cases import discover_cases
from brainseg_monai.inference.outputs import OVERLAY, SLICE_MASK_SUFFIX, VOLUME_MASK, slice_output_names
from brainseg_monai.inference.predictor import Predictor, fast_path, inference_network
from brainseg_monai.inference.runner import InferenceSettings, run_inference
from brainseg_monai.inference.writers import write_overlay_png, write_png_mask
from brainseg_monai.io import read_mask, write_text_atomic
from brainseg_monai.model import MODEL_SIDECAR, ModelSpec, load_model, write_sidecar
from brainseg_monai.networks import get_network
from brainseg_monai.synth import make_dataset
from brainseg_monai.transforms import infer_transforms

__all__ = [
    "FULL", "QUICK", "BenchmarkSizes", "PeakMemory", "format_table", "mask_agreement", "run_benchmark", "run_command",
]

logger = logging.getLogger(__name__)

#: The views of our dihedral TTA and the examples MONAI's TTA draws per image.
TTA_VIEWS = 8


@dataclass(frozen=True)
class BenchmarkSizes:
    """How much work each part does. ``QUICK`` and ``FULL`` are the presets; tests pass tiny ones.

    Args:
        image_size: side of the synthetic 2D slices (LGG slices are 256).
        slices: slices per synthetic case.
        cases: cases in the TTA comparison (``scaling`` uses ``scaling_cases`` times 1, 2 and 4).
        repeats: repeats of every timed part except ``scaling``.
        scaling_cases: cases in the 1x run of ``scaling``.
        scaling_repeats: repeats of every ``brainseg infer`` process in ``scaling``.
        batch_size: ``brainseg infer --batch-size`` (slices per forward, times the TTA views).
        network_kwargs: overrides of the default batch-norm ``unet`` (empty: the bundle's default), whose forward is
            timed beside the timed model's and which the training part trains.
        train_cases: synthetic cases the training pipeline reads.
        train_steps: training steps timed per repeat.
        train_roi: training patch of the bundle (``roi_size`` in ``train.json``).
        volume_size: the 3D volume (x, y, z).
        roi_3d: the 3D model's sliding-window patch.
        network_kwargs_3d: overrides of the default 3D ``unet``.
        volume_tta: TTA of both models in the volume part.
        matmul_size: side of the square fp32 matmul that measures the peak.
        dicom_slices: slices of the DICOM study built from ``run_benchmark``'s ``dicom`` series (its central ones).
        dicom_size: rows and columns of that study (the series resampled in-plane over the same field of view).

    Raises:
        ValueError: when a count or size is not a positive integer.
    """

    image_size: int = 256
    slices: int = 16
    cases: int = 2
    repeats: int = 3
    scaling_cases: int = 1
    scaling_repeats: int = 1
    batch_size: int = 16
    network_kwargs: dict = field(default_factory=dict)
    train_cases: int = 4
    train_steps: int = 4
    train_roi: tuple[int, int] = (128, 128)
    volume_size: tuple[int, int, int] = (240, 240, 155)
    roi_3d: tuple[int, int, int] = (96, 96, 96)
    network_kwargs_3d: dict = field(default_factory=dict)
    volume_tta: str = "none"
    matmul_size: int = 2048
    dicom_slices: int = 22
    dicom_size: int = 288

    def __post_init__(self) -> None:
        for name in ("image_size", "slices", "cases", "repeats", "scaling_cases", "scaling_repeats", "batch_size",
                     "train_cases", "train_steps", "matmul_size", "dicom_slices", "dicom_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer but is {value!r}.")
        for name in ("train_roi", "volume_size", "roi_3d"):
            value = getattr(self, name)
            if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value):
                raise ValueError(f"{name} must hold positive integers but is {value!r}.")


QUICK = BenchmarkSizes()
FULL = BenchmarkSizes(cases=4, repeats=5, scaling_cases=2, scaling_repeats=2, train_cases=8, train_steps=12,
                      matmul_size=4096)


class PeakMemory:
    """Peak resident memory of this process while a ``with`` block runs, in MiB.

    On Linux the kernel keeps the peak (``VmHWM``) and a process may reset it to its current size by writing ``5`` to
    ``/proc/self/clear_refs``; elsewhere the figure is the lifetime peak (``ru_maxrss``), an upper bound
    (``method`` says which). On CUDA the peak of allocated GPU memory is kept too.
    """

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.method = "ru_maxrss"
        self.baseline_mb = 0.0
        self.peak_mb = 0.0
        self.peak_gpu_mb: float | None = None

    def __enter__(self) -> PeakMemory:
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self.method = "VmHWM"
        except OSError:
            self.method = "ru_maxrss"
        self.baseline_mb = _status_mb("VmRSS") or 0.0
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        return self

    def __exit__(self, *exc: object) -> None:
        peak = _status_mb("VmHWM") if self.method == "VmHWM" else None
        if peak is None:
            import resource

            scale = 1.0 if sys.platform == "darwin" else 1024.0  # bytes on macOS, KiB on Linux
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20
        self.peak_mb = round(peak, 1)
        if self.device.type == "cuda":
            self.peak_gpu_mb = round(torch.cuda.max_memory_allocated(self.device) / 2**20, 1)

    def to_dict(self) -> dict:
        out = {"peak_rss_mb": self.peak_mb, "rss_at_start_mb": round(self.baseline_mb, 1), "memory_method": self.method}
        if self.peak_gpu_mb is not None:
            out["peak_gpu_mb"] = self.peak_gpu_mb
        return out


def _status_mb(key: str, pid: int | str = "self") -> float | None:
    """A ``kB`` field of ``/proc/<pid>/status`` in MiB, or ``None`` where there is no such file or field."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024.0
    except (OSError, ValueError, IndexError):
        return None
    return None


def _descendants(root: int) -> list[int]:
    """``root`` and every process below it, from ``/proc/<pid>/task/<tid>/children``."""
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        try:
            for task in Path(f"/proc/{pid}/task").iterdir():
                todo.extend(int(child) for child in (task / "children").read_text().split())
        except OSError:  # the process ended meanwhile
            continue
    return found


def run_command(cmd: Sequence[str], env: Mapping[str, str] | None = None, cwd: str | os.PathLike | None = None,
                interval_s: float = 0.05) -> dict:
    """Run ``cmd`` to completion and measure it: wall seconds and peak resident memory, sampled from ``/proc``.

    Every ``interval_s`` each process of the tree is read: ``peak_rss_mb`` is the largest ``VmHWM`` (the kernel's
    peak of one process, so only growth in a process's last ``interval_s`` is missed), ``peak_tree_rss_mb`` the
    largest sum of ``VmRSS`` over the tree (``torchrun`` and its workers together). ``wait4``'s ``ru_maxrss`` is not
    used: a child started by ``vfork`` reports this process's peak as its own.

    Raises:
        RuntimeError: when the command fails (the message holds the end of its output).
    """
    with tempfile.TemporaryFile() as log:
        started = time.perf_counter()
        proc = subprocess.Popen(list(cmd), env=dict(env) if env is not None else None, cwd=cwd, stdout=log,
                                stderr=subprocess.STDOUT)
        largest, tree = [0.0], [0.0]
        done = threading.Event()

        def sample() -> None:
            while not done.wait(interval_s):
                total = 0.0
                for pid in _descendants(proc.pid):
                    largest[0] = max(largest[0], _status_mb("VmHWM", pid) or 0.0)
                    total += _status_mb("VmRSS", pid) or 0.0
                tree[0] = max(tree[0], total)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        returncode = proc.wait()
        seconds = time.perf_counter() - started
        done.set()
        sampler.join()
        if returncode != 0:
            log.seek(0)
            tail = log.read().decode(errors="replace")[-3000:]
            raise RuntimeError(f"{' '.join(cmd)} failed with status {returncode}:\n{tail}")
    return {"seconds": seconds, "peak_rss_mb": round(largest[0], 1), "peak_tree_rss_mb": round(max(tree[0], largest[0]), 1)}


def _stats(values: Sequence[float]) -> dict:
    """Median, min and max of repeated measurements (and how many there were)."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values),
            "values": [round(v, 6) for v in values]}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _machine(device: torch.device) -> dict:
    """What the figures were measured on."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {
        "cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__, "monai": monai.__version__, "python": platform.python_version(),
        "platform": platform.platform(), "device": str(device),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def _load() -> list[float] | None:
    return list(os.getloadavg()) if hasattr(os, "getloadavg") else None


# ----------------------------------------------------------------------------------------------------- data, models


def _lgg_cases(sizes: BenchmarkSizes, data: Path | None, work: Path, cases: int, name: str) -> list[Path]:
    """``cases`` LGG patient folders: the first ones of ``data`` (sorted), else synthetic phantoms in ``work``."""
    if data is None:
        size = (sizes.image_size, sizes.image_size, sizes.slices)
        root = make_dataset(work / name, "lgg", cases=cases, seed=0, size=size)
    else:
        root = data
    folders = sorted(p for p in root.iterdir() if p.is_dir() and any(p.glob("*.tif")))
    if len(folders) < cases:
        raise InputError(root, f"holds {len(folders)} LGG patient folder(s) with .tif slices; the benchmark needs {cases}")
    return folders[:cases]


def _n_slices(folders: Sequence[Path]) -> int:
    return sum(len(case.images) for case in discover_cases([str(f) for f in folders], InputRoles.of(ModelSpec())))


def _write_checkpoint(folder: Path, spec: ModelSpec) -> Path:
    """Random weights of ``spec``'s network (speed does not depend on the weights) with its ``model.json``."""
    torch.manual_seed(0)
    folder.mkdir(parents=True, exist_ok=True)
    net = get_network(spec.network_name, spec.spatial_dims, spec.in_channels, 1, **spec.network_kwargs)
    torch.save(net.state_dict(), folder / "model.pt")
    write_sidecar(folder / MODEL_SIDECAR, spec.to_dict())
    return folder / "model.pt"


# ------------------------------------------------------------------------------------------- inference: ours, MONAI


def _timed_infer(cases: Sequence[Path], out: Path, settings: InferenceSettings, device: torch.device) -> tuple[float, PeakMemory]:
    """Seconds and peak memory of ``run_inference`` (the library call behind ``brainseg infer``) into a fresh ``out``."""
    shutil.rmtree(out, ignore_errors=True)
    with PeakMemory(device) as peak:
        _sync(device)
        started = time.perf_counter()
        rows = run_inference([str(c) for c in cases], out, settings)
        _sync(device)
        seconds = time.perf_counter() - started
    failed = [r for r in rows if r["status"] != "ok"]
    if failed:
        raise RuntimeError(f"brainseg infer failed on {failed[0]['case']}: {failed[0]['error']}")
    shutil.rmtree(out, ignore_errors=True)
    return seconds, peak


class _MonaiTTA:
    """The same model through ``monai.data.TestTimeAugmentation``, run as its documentation shows a user.

    Per slice: our pre-processing (read, channel first, z-score), then ``TestTimeAugmentation`` with random flips and
    quarter turns (the dihedral group's generators, invertible), ``batch_size=8``, ``num_workers=0``, progress off,
    ``TTA_VIEWS`` examples, under ``torch.inference_mode``; the mean of the inverted sigmoid outputs is post-processed
    and written with our writers, as ``brainseg infer`` does. ``return_full_data=True`` and a mean, rather than the
    default (mode, mean, std, vvc), so MONAI is not charged for statistics we do not compute.
    """

    def __init__(self, checkpoint: Path, device: torch.device, sw_batch_size: int) -> None:
        self.network, self.spec = load_model(checkpoint, device)
        self.device = device
        self.post = self.spec.postprocessor
        self.pre = infer_transforms(2)
        roi = list(self.spec.roi_size)
        # the sliding window ours uses for images larger than the training patch
        self.window = SlidingWindowInferer(roi_size=roi, sw_batch_size=sw_batch_size, overlap=0.25, mode="gaussian")
        augment = Compose([
            RandFlipd("image", prob=0.5, spatial_axis=0),
            RandRotate90d("image", prob=0.75, max_k=3, spatial_axes=(0, 1)),
        ])
        augment.set_random_state(seed=0)
        self.tta = TestTimeAugmentation(
            augment, batch_size=TTA_VIEWS, num_workers=0, inferrer_fn=self._logits_to_prob, device=device,
            image_key="image", orig_key="image", nearest_interp=False, return_full_data=True, progress=False,
        )

    def _logits_to_prob(self, images: torch.Tensor) -> torch.Tensor:
        if any(s > r for s, r in zip(images.shape[2:], self.spec.roi_size)):
            return torch.sigmoid(self.window(images, self.network))
        return torch.sigmoid(self.network(images))

    def __call__(self, cases: Sequence[Path], out: Path) -> None:
        for case in discover_cases([str(c) for c in cases], InputRoles.of(self.spec)):
            folder = out / case.case_id
            probs, images = [], []
            for path in case.images:
                data = self.pre({"image": path})
                with torch.inference_mode():
                    probs.append(np.asarray(self.tta(data, num_examples=TTA_VIEWS).mean(0)[0].cpu()))
                images.append(data["image"])
            masks = self.post.apply_to_slices(probs, case.images)
            for path, name, mask in zip(case.images, slice_output_names(case.images), masks):
                write_png_mask(mask, folder / name, reference=path)
            best = int(np.argmax([m.sum() for m in masks]))
            write_overlay_png(np.asarray(images[best]), masks[best], folder / OVERLAY)


def _timed_monai(tta: _MonaiTTA, cases: Sequence[Path], out: Path, device: torch.device) -> tuple[float, PeakMemory]:
    shutil.rmtree(out, ignore_errors=True)
    with PeakMemory(device) as peak:
        _sync(device)
        started = time.perf_counter()
        tta(cases, out)
        _sync(device)
        seconds = time.perf_counter() - started
    shutil.rmtree(out, ignore_errors=True)
    return seconds, peak


def _dicom_study(series: Path, dest: Path, slices: int, size: int) -> Path:
    """A copy of the DICOM ``series`` as a study of its ``slices`` central slices, each resampled (linear) to
    ``size`` x ``size`` pixels over the same field of view, with new UIDs and its headers kept; returns its folder."""
    files = [p for p in sorted(series.iterdir()) if p.is_file()]
    if not files:
        raise InputError(series, "holds no DICOM files")
    headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in files]
    order = np.argsort([float(h.ImagePositionPatient[2]) for h in headers])
    first = max(0, (len(files) - slices) // 2)
    chosen = [files[i] for i in order[first:first + slices]]
    if len(chosen) < slices:
        raise InputError(series, f"has {len(files)} slices; the benchmark's DICOM study needs {slices}")
    folder = dest / "study" / "series"
    folder.mkdir(parents=True, exist_ok=True)
    study_uid, series_uid = generate_uid(), generate_uid()
    for k, path in enumerate(chosen):
        ds = pydicom.dcmread(path)
        pixels = ds.pixel_array
        old = np.asarray(ds.PixelSpacing, float)  # (between rows, between columns)
        new = old * np.asarray(pixels.shape, float) / size
        resized = resize(pixels.astype(np.float32), (size, size), order=1, preserve_range=True, anti_aliasing=False)
        row_dir = np.asarray(ds.ImageOrientationPatient[:3], float)
        col_dir = np.asarray(ds.ImageOrientationPatient[3:], float)
        # the first pixel's centre moves by half the change of pixel size, so the field of view stays where it was
        origin = np.asarray(ds.ImagePositionPatient, float) + row_dir * (new[1] - old[1]) / 2 + col_dir * (new[0] - old[0]) / 2
        ds.PixelData = np.round(resized).astype(pixels.dtype).tobytes()
        ds.Rows = ds.Columns = size
        ds.PixelSpacing = [f"{v:.6f}" for v in new]
        ds.ImagePositionPatient = [f"{v:.4f}" for v in origin]
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.save_as(folder / f"IM{k:04d}.dcm", enforce_file_format=True)
    return folder.parent


def _interleaved(parts: Mapping[str, Callable[[], tuple[float, PeakMemory]]], repeats: int
                 ) -> tuple[dict[str, list[float]], dict[str, PeakMemory]]:
    """Each part's seconds over ``repeats`` rounds and its highest peak memory, after one warm-up round (allocator,
    oneDNN kernels, file cache). The parts are interleaved, so a change in machine load hits every part alike, and
    their order rotates each round, so does what runs before each."""
    runs: dict[str, list[float]] = {name: [] for name in parts}
    peaks: dict[str, PeakMemory] = {}
    names = list(parts)
    for repeat in range(repeats + 1):
        for name in names[repeat % len(names):] + names[: repeat % len(names)]:
            seconds, peak = parts[name]()
            if repeat == 0:
                continue
            runs[name].append(seconds)
            if name not in peaks or peak.peak_mb > peaks[name].peak_mb:
                peaks[name] = peak
    return runs, peaks


def _bench_dicom(sizes: BenchmarkSizes, device: torch.device, dicom: Path, work: Path, checkpoint: Path,
                 precision: str) -> dict:
    """``brainseg infer``'s path end to end (dihedral TTA, default settings) on a DICOM study built from ``dicom``:
    at ``precision`` and, when that is a fast path, at ``fp32`` (the path before it), interleaved."""
    study = _dicom_study(dicom, work / "dicom", sizes.dicom_slices, sizes.dicom_size)

    def timed(at: str) -> Callable[[], tuple[float, PeakMemory]]:
        settings = InferenceSettings(str(checkpoint), tta="dihedral", device=str(device),
                                     batch_size=sizes.batch_size, progress=False, precision=at)
        return lambda: _timed_infer([study], work / f"out_dicom_{at}", settings, device)

    parts = {"dicom_tta_dihedral": timed(precision)}
    if fast_path(precision, device) != fast_path("fp32", device):
        parts["dicom_tta_dihedral_fp32"] = timed("fp32")
    runs, peaks = _interleaved(parts, sizes.repeats)
    n_slices = sizes.dicom_slices
    return {
        "parts": {name: {"seconds": _stats(runs[name]), "slices_per_s": _stats([n_slices / s for s in runs[name]]),
                         **peaks[name].to_dict()} for name in parts},
        "dicom_setup": {"series": str(dicom), "slices": n_slices, "size": [sizes.dicom_size] * 2},
    }


def _record_network_inputs(cases: Sequence[Path], out: Path, settings: InferenceSettings, network_type: type) -> list[tuple]:
    """(shape, channels_last) of every batch our path sends to the network, seen by a global forward hook."""
    seen: list[tuple] = []

    def hook(module: torch.nn.Module, args: tuple) -> None:
        if type(module) is network_type and args and isinstance(args[0], torch.Tensor):
            x = args[0]
            seen.append((tuple(x.shape), x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)
                         and not x.is_contiguous()))

    handle = torch.nn.modules.module.register_module_forward_pre_hook(hook)
    try:
        shutil.rmtree(out, ignore_errors=True)
        run_inference([str(c) for c in cases], out, settings)
    finally:
        handle.remove()
        shutil.rmtree(out, ignore_errors=True)
    return seen


def _inputs_for(batches: Sequence[tuple], device: torch.device) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    tensors = []
    cache: dict[tuple, torch.Tensor] = {}
    for shape, channels_last in batches:
        if (shape, channels_last) not in cache:
            x = torch.randn(shape, generator=gen).to(device)
            cache[(shape, channels_last)] = x.contiguous(memory_format=torch.channels_last) if channels_last else x
        tensors.append(cache[(shape, channels_last)])
    return tensors


def _timed_forward(network: Callable, inputs: Sequence[torch.Tensor], device: torch.device) -> tuple[float, PeakMemory]:
    """Seconds of the network alone over ``inputs``, under ``torch.inference_mode``."""
    with PeakMemory(device) as peak, torch.inference_mode():
        _sync(device)
        started = time.perf_counter()
        for x in inputs:
            network(x)
        _sync(device)
        seconds = time.perf_counter() - started
    return seconds, peak


def _forward_flops(network: Callable, inputs: Sequence[torch.Tensor]) -> int:
    """FLOPs of the network over ``inputs`` (``torch.utils.flop_counter``; each distinct shape counted once)."""
    per_shape: dict[tuple, int] = {}
    total = 0
    for x in inputs:
        key = (tuple(x.shape), x.stride())
        if key not in per_shape:
            with FlopCounterMode(display=False) as counter, torch.inference_mode():
                network(x)
            per_shape[key] = counter.get_total_flops()
        total += per_shape[key]
    return total


def _matmul_operands(size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return torch.randn(size, size, generator=gen).to(device), torch.randn(size, size, generator=gen).to(device)


def _timed_matmul(a: torch.Tensor, b: torch.Tensor, device: torch.device, calls: int = 3) -> tuple[float, PeakMemory]:
    """Seconds of one fp32 matmul (``2 n^3`` FLOPs): the fastest of ``calls``, so a burst of other load is skipped."""
    best = float("inf")
    with PeakMemory(device) as peak:
        for _ in range(calls):
            _sync(device)
            started = time.perf_counter()
            torch.mm(a, b)
            _sync(device)
            best = min(best, time.perf_counter() - started)
    return best, peak


def _norm_kind(network: torch.nn.Module) -> str:
    """The normalisation layers of ``network`` by kind (``instance``, ``batch``, ``group``, ``layer``), or ``none``."""
    kinds = ((torch.nn.modules.instancenorm._InstanceNorm, "instance"),
             (torch.nn.modules.batchnorm._BatchNorm, "batch"), (torch.nn.GroupNorm, "group"),
             (torch.nn.LayerNorm, "layer"))
    found = {name for module in network.modules() for cls, name in kinds if isinstance(module, cls)}
    return "+".join(sorted(found)) or "none"


def _forward_of(predictor: Predictor) -> Callable[[torch.Tensor], torch.Tensor]:
    """The predictor's network as :class:`~brainseg_monai.inference.tta.TTAPredictor` runs it: under
    ``torch.autocast`` when its fast path autocasts."""
    dtype = predictor.fast_path.autocast
    if dtype is None:
        return predictor.network

    def forward(x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(predictor.device.type, dtype=dtype):
            return predictor.network(x)

    return forward


def _bench_tta(sizes: BenchmarkSizes, device: torch.device, data: Path | None, work: Path, checkpoint: Path,
               precision: str) -> dict:
    """The timed model ``checkpoint`` on the same slices: ours (TTA on and off, at ``precision``), MONAI's TTA (the
    model as loaded, float32, as a user would call it) and the network alone (the float32 reference); when
    ``precision`` runs the model otherwise than ``fp32``, its forward that way and ours with TTA at ``fp32`` too
    (before and after); the default batch-norm U-Net's forward on the same batches; matmul peak and FLOPs."""
    cases = _lgg_cases(sizes, data, work, sizes.cases, "lgg_tta")
    n_slices = _n_slices(cases)

    def settings(tta: str, at: str = precision) -> InferenceSettings:
        return InferenceSettings(str(checkpoint), tta=tta, device=str(device), batch_size=sizes.batch_size,
                                 progress=False, precision=at)

    network, spec = load_model(checkpoint, device)
    predictor = Predictor(network, spec, device, tta="dihedral", batch_size=sizes.batch_size, precision=precision)
    reference = Predictor(network, spec, device, tta="dihedral", batch_size=sizes.batch_size, precision="fp32")
    torch.manual_seed(0)
    default_unet = get_network("unet", 2, spec.in_channels, 1, **sizes.network_kwargs).to(device)
    default_norm = _norm_kind(default_unet)  # before its batch norm is folded away
    default_unet = inference_network(default_unet, device, copy_network=False)
    batches = _record_network_inputs(cases, work / "out_record", settings("dihedral"), type(predictor.network))
    inputs = _inputs_for(batches, device)
    monai_tta = _MonaiTTA(checkpoint, device, sizes.batch_size)
    matmul_a, matmul_b = _matmul_operands(sizes.matmul_size, device)
    parts: dict[str, Callable[[], tuple[float, PeakMemory]]] = {
        "ours": lambda: _timed_infer(cases, work / "out_ours", settings("dihedral"), device),
        "monai": lambda: _timed_monai(monai_tta, cases, work / "out_monai", device),
        "ours_no_tta": lambda: _timed_infer(cases, work / "out_none", settings("none"), device),
        "forward": lambda: _timed_forward(reference.network, inputs, device),
        "forward_default": lambda: _timed_forward(default_unet, inputs, device),
        "matmul": lambda: _timed_matmul(matmul_a, matmul_b, device),
    }
    has_fast = predictor.fast_path != reference.fast_path
    if has_fast:
        fast = _forward_of(predictor)
        parts["forward_fast"] = lambda: _timed_forward(fast, inputs, device)
        parts["ours_fp32"] = lambda: _timed_infer(cases, work / "out_fp32", settings("dihedral", "fp32"), device)
    runs, peaks = _interleaved(parts, sizes.repeats)

    flops = _forward_flops(reference.network, inputs)
    forward_rates = [flops / s for s in runs["forward"]]
    matmul_rates = [2.0 * sizes.matmul_size**3 / s for s in runs["matmul"]]

    def part(name: str) -> dict:
        return {"seconds": _stats(runs[name]), "slices_per_s": _stats([n_slices / s for s in runs[name]]),
                **peaks[name].to_dict()}

    # ours runs at the fast path's precision, so its time outside the forward is against that forward
    forward_name = "forward_fast" if has_fast else "forward"
    ours, theirs, forward = (statistics.median(runs[k]) for k in ("ours", "monai", forward_name))
    shapes = sorted({(shape, cl) for shape, cl in batches})
    out_parts = {
        "infer_tta_dihedral": part("ours"),
        "monai_tta": part("monai"),
        "infer_tta_none": part("ours_no_tta"),
        "forward_only": {
            **part("forward"),
            "flops_per_s": _stats(forward_rates),
            "gflop_per_slice": flops / n_slices / 1e9,
            "batches": len(batches),
            "batch_shapes": [{"shape": list(s), "channels_last": cl, "count": batches.count((s, cl))} for s, cl in shapes],
        },
        "forward_default_unet_bn": part("forward_default"),
        "matmul_fp32": {"seconds": _stats(runs["matmul"]), "flops_per_s": _stats(matmul_rates),
                        "size": sizes.matmul_size, **peaks["matmul"].to_dict()},
    }
    if has_fast:
        out_parts["forward_fast"] = part("forward_fast")
        out_parts["infer_tta_dihedral_fp32"] = part("ours_fp32")
    return {
        "tta_speedup_vs_monai_tta": theirs / ours,
        "tta_overhead_pct": 100.0 * (ours - forward) / ours,
        "forward_fraction_of_matmul_peak": statistics.median(forward_rates) / statistics.median(matmul_rates),
        "model": {"checkpoint": str(checkpoint), "network": spec.network_name, "norm": _norm_kind(network),
                  "network_kwargs": dict(spec.network_kwargs), "precision": precision,
                  "fast_path": predictor.fast_path.describe(),
                  "default_unet_norm": default_norm, "default_unet_kwargs": dict(sizes.network_kwargs)},
        "parts": out_parts,
        "tta_setup": {"slices": n_slices, "cases": len(cases), "image_size": sizes.image_size,
                      "roi_size": list(spec.roi_size), "batch_size": sizes.batch_size, "views": TTA_VIEWS,
                      "data": str(data) if data else "synthetic"},
    }


# --------------------------------------------------------------------------------------------------------- training


def _bundle_training(bundle: Path, dataset_dir: Path, out: Path, device: torch.device, sizes: BenchmarkSizes) -> dict:
    """The bundle's own training objects (``train.json``): data loader, network, loss, optimizer."""
    config_file = bundle / "configs" / "train.json"
    if not config_file.is_file():
        raise InputError(config_file, "bundle training config not found (pass --bundle)")
    parser = ConfigParser()
    parser.read_config(str(config_file))
    parser.update({
        "bundle_root": str(bundle), "output_dir": str(out), "dataset_dir": str(dataset_dir), "device": str(device),
        "roi_size": list(sizes.train_roi), "network_kwargs": dict(sizes.network_kwargs),
    })
    keys = ("train#dataloader", "train#prepare_batch", "network", "loss", "optimizer", "batch_size")
    return {key: parser.get_parsed_content(key) for key in keys}


def _bench_training(sizes: BenchmarkSizes, device: torch.device, data: Path | None, work: Path, bundle: Path) -> dict:
    """Training steps through the bundle's data pipeline against the same steps on batches already in memory.

    The pipeline arm is what ``SupervisedTrainer`` does: the loader, then the trainer's ``prepare_batch`` (to the
    device and the batch augmentation), then the step; the in-memory arm steps on batches already prepared.
    """
    cases = _lgg_cases(sizes, data, work, sizes.train_cases, "lgg_train")
    root = work / "train_data"
    root.mkdir(exist_ok=True)
    for case in cases:  # a folder of exactly these patients, for the bundle's dataset_dir
        link = root / case.name
        if not link.exists():
            link.symlink_to(case.resolve(), target_is_directory=True)
    parts = _bundle_training(bundle, root, work / "train_run", device, sizes)
    loader, prepare, network, loss_fn, optimizer = (
        parts[k] for k in ("train#dataloader", "train#prepare_batch", "network", "loss", "optimizer"))
    network.train()

    def batches() -> Iterator[dict]:
        while True:
            yield from loader

    def step(images: torch.Tensor, labels: torch.Tensor) -> None:  # SupervisedTrainer's iteration without AMP
        optimizer.zero_grad(set_to_none=True)
        loss_fn(network(images), labels).backward()
        optimizer.step()

    stream = batches()
    step(*prepare(next(stream), device))  # warm-up
    steps = sizes.train_steps
    runs: dict[str, list[float]] = {"pipeline": [], "memory": []}
    peaks: dict[str, PeakMemory] = {}
    for _ in range(sizes.repeats):
        with PeakMemory(device) as peak:
            _sync(device)
            started = time.perf_counter()
            for _ in range(steps):
                step(*prepare(next(stream), device))
            _sync(device)
            runs["pipeline"].append(time.perf_counter() - started)
        peaks["pipeline"] = peak
        in_memory = [prepare(next(stream), device) for _ in range(steps)]
        with PeakMemory(device) as peak:
            _sync(device)
            started = time.perf_counter()
            for images, labels in in_memory:
                step(images, labels)
            _sync(device)
            runs["memory"].append(time.perf_counter() - started)
        peaks["memory"] = peak
    pipeline, memory = statistics.median(runs["pipeline"]), statistics.median(runs["memory"])
    batch_size = int(parts["batch_size"])

    def part(name: str) -> dict:
        return {"seconds": _stats(runs[name]), "steps_per_s": _stats([steps / s for s in runs[name]]),
                **peaks[name].to_dict()}

    return {
        "train_data_overhead_pct": 100.0 * (pipeline - memory) / pipeline,
        "parts": {"train_bundle_pipeline": part("pipeline"), "train_in_memory": part("memory")},
        "train_setup": {"steps": steps, "batch_size": batch_size, "roi_size": list(sizes.train_roi),
                        "num_workers": loader.num_workers, "cases": len(cases)},
    }


# ----------------------------------------------------------------------------------------------------------- scaling


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "brainseg_monai.cli", *args]


def _bench_scaling(sizes: BenchmarkSizes, device: torch.device, data: Path | None, work: Path, checkpoint: Path,
                   precision: str) -> dict:
    """``brainseg infer`` processes over 1x, 2x and 4x the cases, then the 4x batch under ``torchrun`` with 1 and 2."""
    base = sizes.scaling_cases
    cases = _lgg_cases(sizes, data, work, 4 * base, "lgg_scaling")
    env = dict(os.environ)
    args = ["--checkpoint", str(checkpoint), "--device", str(device), "--batch-size", str(sizes.batch_size),
            "--precision", precision, "--no-progress"]
    rows = []
    for factor in (1, 2, 4):
        chosen = cases[: factor * base]
        out = work / f"out_scaling_{factor}"
        runs = []
        for _ in range(sizes.scaling_repeats):
            shutil.rmtree(out, ignore_errors=True)
            runs.append(run_command(_cli("infer", *map(str, chosen), "--out", str(out), *args), env))
        rows.append(_process_row(runs, len(chosen), _n_slices(chosen)))
        shutil.rmtree(out, ignore_errors=True)
    torchrun = []
    cores = os.cpu_count() or 1
    for processes in (1, 2):
        out = work / f"out_torchrun_{processes}"
        threads = str(max(1, cores // processes))
        runs = []
        for _ in range(sizes.scaling_repeats):
            shutil.rmtree(out, ignore_errors=True)
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1",
                   f"--nproc_per_node={processes}", "-m", "brainseg_monai.cli", "infer", *map(str, cases),
                   "--out", str(out), *args]
            runs.append(run_command(cmd, {**env, "OMP_NUM_THREADS": threads}))
        torchrun.append({"processes": processes, "threads_per_process": int(threads),
                         **_process_row(runs, len(cases), _n_slices(cases))})
        shutil.rmtree(out, ignore_errors=True)
    s = [r["seconds"]["median"] for r in rows]
    n = [r["slices"] for r in rows]
    # time = start-up + slices * per-slice: the marginal cost per slice of 2x->4x over 1x->2x is 1 when linear
    marginal_low, marginal_high = (s[1] - s[0]) / (n[1] - n[0]), (s[2] - s[1]) / (n[2] - n[1])
    peaks = [r["peak_rss_mb"] for r in rows]
    return {
        "scaling": {
            "runs": rows,
            "seconds_per_slice_marginal": [marginal_low, marginal_high],
            "time_linearity": marginal_high / marginal_low if marginal_low > 0 else None,
            "startup_seconds": s[0] - marginal_low * n[0],
            "memory_growth_pct_1x_to_4x": 100.0 * (peaks[2] - peaks[0]) / peaks[0],
            "torchrun": torchrun,
            "torchrun_speedup_2_vs_1": torchrun[0]["seconds"]["median"] / torchrun[1]["seconds"]["median"],
        }
    }


def _process_row(runs: Sequence[dict], cases: int, slices: int) -> dict:
    seconds = [r["seconds"] for r in runs]
    return {"cases": cases, "slices": slices, "seconds": _stats(seconds),
            "peak_rss_mb": max(r["peak_rss_mb"] for r in runs), "peak_tree_rss_mb": max(r["peak_tree_rss_mb"] for r in runs),
            "memory_method": "largest process VmHWM; tree: sum of VmRSS; /proc sampled every 50 ms"}


# ---------------------------------------------------------------------------------------------------------------- 3D


def _bench_volume(sizes: BenchmarkSizes, device: torch.device, work: Path, checkpoint: Path, precision: str) -> dict:
    """One volume through a 3D model (sliding window) and through the timed 2D model slice by slice, both via
    ``run_inference``."""
    volume = make_dataset(work / "volume", "nifti", cases=1, seed=0, size=sizes.volume_size)
    case = next(p for p in volume.iterdir() if p.is_dir())
    spec_3d = ModelSpec(spatial_dims=3, network_kwargs=dict(sizes.network_kwargs_3d), roi_size=list(sizes.roi_3d))
    checkpoint_3d = _write_checkpoint(work / "model_3d", spec_3d)
    out = {}
    for name, model in (("volume_3d_sliding_window", checkpoint_3d), ("volume_2d_by_slices", checkpoint)):
        settings = InferenceSettings(str(model), tta=sizes.volume_tta, device=str(device),
                                     batch_size=sizes.batch_size, progress=False, precision=precision)
        runs, peak = [], None
        for _ in range(sizes.repeats if name == "volume_2d_by_slices" else max(1, sizes.repeats // 2)):
            seconds, this = _timed_infer([case], work / "out_volume", settings, device)
            runs.append(seconds)
            peak = this if peak is None or this.peak_mb > peak.peak_mb else peak
        out[name] = {"seconds": _stats(runs), **peak.to_dict()}  # type: ignore[union-attr]
    return {"volume": {**out, "size": list(sizes.volume_size), "roi_3d": list(sizes.roi_3d), "tta": sizes.volume_tta,
                       "batch_size": sizes.batch_size}}


# ---------------------------------------------------------------------------------------------- mask agreement

#: the mask files ``brainseg infer`` writes into a case folder: one PNG per 2D image, one volume per volume case
_MASK_PATTERNS = (f"*{SLICE_MASK_SUFFIX}", VOLUME_MASK)


def mask_agreement(reference: str | os.PathLike, other: str | os.PathLike) -> dict:
    """Per-case Dice between the masks of two ``brainseg infer`` outputs of the same inputs (e.g. ``--precision fp32``
    and the fast path), over each case's stacked masks; two empty masks agree fully (Dice 1).

    Returns ``cases`` (case -> ``dice``, ``pixels`` of the mask in each run, ``pixels_differing``), ``min_dice``,
    ``mean_dice``, ``identical_cases`` and ``cases_compared``.

    Raises:
        InputError: when the two outputs do not hold the same cases and mask files.
    """
    first, second = Path(reference), Path(other)

    def masks(root: Path) -> dict[str, list[Path]]:
        found: dict[str, list[Path]] = {}
        for case in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
            files = sorted(f for pattern in _MASK_PATTERNS for f in case.glob(pattern))
            if files:
                found[case.name] = files
        return found

    ours, theirs = masks(first), masks(second)
    names = {case: [f.name for f in files] for case, files in ours.items()}
    if names != {case: [f.name for f in files] for case, files in theirs.items()}:
        missing = sorted(set(ours) ^ set(theirs)) or sorted(c for c in ours if names[c] != [f.name for f in theirs[c]])
        raise InputError(second, f"does not hold the same cases and mask files as {first} (differing: "
                                 f"{', '.join(missing[:5])})")
    cases = {}
    for case, files in ours.items():
        a = np.concatenate([read_mask(f)[0].ravel() for f in files])
        b = np.concatenate([read_mask(f)[0].ravel() for f in theirs[case]])
        both, total = int(np.count_nonzero(a & b)), int(np.count_nonzero(a)) + int(np.count_nonzero(b))
        cases[case] = {"dice": 2.0 * both / total if total else 1.0, "pixels": [int(a.sum()), int(b.sum())],
                       "pixels_differing": int(np.count_nonzero(a ^ b))}
    dice = [c["dice"] for c in cases.values()]
    return {"cases": cases, "cases_compared": len(cases), "min_dice": min(dice, default=1.0),
            "mean_dice": statistics.fmean(dice) if dice else 1.0,
            "identical_cases": sum(c["pixels_differing"] == 0 for c in cases.values())}


# -------------------------------------------------------------------------------------------------------- top level


def run_benchmark(
    out: str | os.PathLike,
    quick: bool = False,
    device: str = "cpu",
    data: str | os.PathLike | None = None,
    bundle: str | os.PathLike = "bundle",
    sizes: BenchmarkSizes | None = None,
    workdir: str | os.PathLike | None = None,
    checkpoint: str | os.PathLike | None = None,
    precision: str = "auto",
    dicom: str | os.PathLike | None = None,
) -> dict:
    """Run every part, write the JSON to ``out`` and return it.

    Args:
        out: the JSON file to write (its folder is created).
        quick: the ``QUICK`` preset (a few minutes on 2 CPU cores) instead of ``FULL``.
        device: ``cpu``, ``cuda``, ``cuda:N`` or ``auto``.
        data: a folder of LGG patient folders (e.g. ``kaggle_3m``) instead of synthetic phantoms.
        bundle: the bundle folder whose ``configs/train.json`` defines the training data pipeline.
        sizes: explicit sizes, overriding ``quick``.
        workdir: where data, models and outputs go (default: a temporary folder, removed afterwards).
        checkpoint: the model whose inference is timed (default: ``bundle/models/model.pt``, the shipped model).
        precision: ``fp32``, ``bf16`` or ``auto``, as ``brainseg infer --precision``; the forward is timed in
            float32 as well.
        dicom: a DICOM series folder (e.g. ``../shared/data/dicom/HF1139_AXIAL_FLAIR``): ``brainseg infer`` is
            timed on a study of ``sizes.dicom_slices`` of its slices resampled to ``sizes.dicom_size`` pixels square.

    Raises:
        InputError: when ``data``, ``dicom``, the checkpoint or the bundle's ``train.json`` is missing, ``data`` has
            too few patients or ``dicom`` too few slices.
        ValueError: for a bad ``device``, or a ``precision`` the device cannot run.
    """
    dev = resolve_device(device)
    model = Path(checkpoint) if checkpoint is not None else Path(bundle) / "models" / "model.pt"
    if not model.is_file():
        raise InputError(model, "checkpoint not found (pass --checkpoint)")
    fast_path(precision, dev)  # refuse a precision the device cannot run before any part starts
    sizes = sizes or (QUICK if quick else FULL)
    data_dir = Path(data) if data is not None else None
    if data_dir is not None and not data_dir.is_dir():
        raise InputError(data_dir, "is not a folder of LGG patient folders")
    dicom_dir = Path(dicom) if dicom is not None else None
    if dicom_dir is not None and not dicom_dir.is_dir():
        raise InputError(dicom_dir, "is not a DICOM series folder")
    temporary = workdir is None
    work = Path(tempfile.mkdtemp(prefix="brainseg-bench-")) if temporary else Path(workdir)
    work.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"machine": _machine(dev), "load_average_before": _load(),
                              "sizes": {**asdict(sizes), "preset": "custom" if sizes not in (QUICK, FULL) else
                                        ("quick" if sizes == QUICK else "full")}}
    started = time.perf_counter()
    try:
        for name, part in (
            ("tta", lambda: _bench_tta(sizes, dev, data_dir, work, model, precision)),
            *([("dicom", lambda: _bench_dicom(sizes, dev, dicom_dir, work, model, precision))] if dicom_dir else []),
            ("training", lambda: _bench_training(sizes, dev, data_dir, work, Path(bundle))),
            ("scaling", lambda: _bench_scaling(sizes, dev, data_dir, work, model, precision)),
            ("volume", lambda: _bench_volume(sizes, dev, work, model, precision)),
        ):
            logger.info("benchmark part %s", name)
            part_started = time.perf_counter()
            values = part()
            result.setdefault("part_seconds", {})[name] = round(time.perf_counter() - part_started, 1)
            result.setdefault("parts", {}).update(values.pop("parts", {}))
            result.update(values)
    finally:
        if temporary:
            shutil.rmtree(work, ignore_errors=True)
    result["load_average_after"] = _load()
    result["seconds_total"] = time.perf_counter() - started
    ordered = {key: result[key] for key in HEADLINE if key in result}
    ordered.update({key: value for key, value in result.items() if key not in ordered})
    write_text_atomic(out, json.dumps(ordered, indent=2, default=float) + "\n")
    return ordered


HEADLINE = ("model", "tta_speedup_vs_monai_tta", "tta_overhead_pct", "forward_fraction_of_matmul_peak",
            "train_data_overhead_pct", "scaling", "volume")
#: The targets of the benchmark issue, on 2 CPU cores: (key, comparison, bound).
TARGETS = (("tta_overhead_pct", "<", 10.0), ("forward_fraction_of_matmul_peak", ">=", 0.5),
           ("tta_speedup_vs_monai_tta", ">", 1.15), ("train_data_overhead_pct", "<", 10.0))


def _meets(value: float, op: str, bound: float) -> bool:
    return {"<": value < bound, ">": value > bound, ">=": value >= bound}[op]


def format_table(result: Mapping[str, Any]) -> str:
    """The figures as a plain-text table: headline ratios against their targets, then every part."""
    lines = [f"machine: {result['machine']['cpu']}, {result['machine']['cores']} cores, torch {result['machine']['torch']}, "
             f"device {result['machine']['device']}; load average before {_fmt_load(result.get('load_average_before'))}, "
             f"after {_fmt_load(result.get('load_average_after'))}"]
    model = result.get("model")
    if model:
        lines.append(f"model timed: {model['checkpoint']} ({model['network']}, {model['norm']} norm), precision "
                     f"{model['precision']} -> {model['fast_path']}; forward_default_unet_bn: the default unet "
                     f"({model['default_unet_norm']} norm, folded) on the same batches")
    lines += ["", f"{'headline':34} {'value':>10}  target"]
    for key, op, bound in TARGETS:
        if key in result:
            value = result[key]
            lines.append(f"{key:34} {value:10.3f}  {op} {bound:g} {'ok' if _meets(value, op, bound) else 'MISSED'}")
    lines += ["", f"{'part':28} {'median':>10} {'min':>10} {'max':>10} {'unit':>10} {'peak MiB':>9}"]
    for name, part in result.get("parts", {}).items():
        for unit in ("slices_per_s", "steps_per_s", "flops_per_s"):
            if unit in part:
                stats, scale, label = part[unit], (1e9 if unit == "flops_per_s" else 1.0), unit
                if unit == "flops_per_s":
                    label = "GFLOP/s"
                lines.append(f"{name:28} {stats['median'] / scale:10.3f} {stats['min'] / scale:10.3f} "
                             f"{stats['max'] / scale:10.3f} {label:>10} {part.get('peak_rss_mb', float('nan')):9.0f}")
                break
    scaling = result.get("scaling")
    if scaling:
        lines += ["", f"{'brainseg infer':28} {'slices':>6} {'median s':>10} {'min':>8} {'max':>8} {'peak MiB':>9} {'tree MiB':>9}"]
        rows = [(f"{r['cases']} cases", r) for r in scaling["runs"]]
        rows += [(f"torchrun x{r['processes']} ({r['cases']} cases)", r) for r in scaling["torchrun"]]
        for label, r in rows:
            s = r["seconds"]
            lines.append(f"{label:28} {r['slices']:6d} {s['median']:10.2f} {s['min']:8.2f} {s['max']:8.2f} "
                         f"{r['peak_rss_mb']:9.0f} {r['peak_tree_rss_mb']:9.0f}")
        lines.append(f"time linearity (marginal s/slice 2x-4x over 1x-2x, 1 = linear): {_fmt(scaling['time_linearity'])}; "
                     f"peak memory 1x->4x: {scaling['memory_growth_pct_1x_to_4x']:+.1f}%; "
                     f"torchrun 2 vs 1 process: {scaling['torchrun_speedup_2_vs_1']:.2f}x")
    volume = result.get("volume")
    if volume:
        lines += ["", f"volume {'x'.join(map(str, volume['size']))} (tta {volume['tta']})"]
        for name in ("volume_3d_sliding_window", "volume_2d_by_slices"):
            s = volume[name]["seconds"]
            lines.append(f"{name:28} {s['median']:10.2f} {s['min']:10.2f} {s['max']:10.2f} {'s':>10} "
                         f"{volume[name]['peak_rss_mb']:9.0f}")
    return "\n".join(lines)


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _fmt_load(load: Sequence[float] | None) -> str:
    return "n/a" if not load else "/".join(f"{v:.2f}" for v in load)
