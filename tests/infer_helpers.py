"""What the tests of ``brainseg infer`` share: a stand-in network whose mask is known, the settings and command line
that run it, small images with known masks, and readers of what the runner wrote."""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

import brainseg_monai.inference.runner as runner
from brainseg_monai.cli import main as cli_main
from brainseg_monai.inference.runner import InferenceSettings
from brainseg_monai.model import MODEL_SIDECAR, ModelSpec
from brainseg_monai.networks import get_network


def summary_rows(out: Path) -> list[dict]:
    with (out / "summary.csv").open(newline="") as handle:
        return list(csv.DictReader(handle))


def output_hashes(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*")) if p.is_file() and p.name not in ("summary.csv", "case.json")
    }


def untrained_one_channel_model(folder: Path, seed: int = 0) -> Path:
    """A 1-channel 2D U-Net with random weights (drawn from ``seed``): enough to check geometry end to end."""
    torch.manual_seed(seed)
    folder.mkdir(parents=True, exist_ok=True)
    spec = ModelSpec(network_name="unet", spatial_dims=2, in_channels=1, roi_size=[256, 256], channels=["image"],
                     network_kwargs={"channels": [8, 16, 32], "strides": [2, 2], "num_res_units": 1})
    net = get_network(spec.network_name, 2, 1, 1, **spec.network_kwargs)
    torch.save(net.state_dict(), folder / "model.pt")
    (folder / MODEL_SIDECAR).write_text(json.dumps(spec.to_dict()))
    return folder / "model.pt"


class BrightVoxels(torch.nn.Module):
    """A stand-in network whose mask is known: every voxel above the mean of the head (z-scored > 0) is tumour.

    ``channel`` is the input channel it looks at (a 2D model z-scores each slice, so per slice: above the slice's mean).
    """

    def __init__(self, channel: int = 0) -> None:
        super().__init__()
        self.channel = channel
        self.unused = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.where(x[:, self.channel:self.channel + 1] > 0, 100.0, -100.0)


THREE_CHANNELS = ["t1", "flair", "t1c"]


def stand_in(monkeypatch: pytest.MonkeyPatch, in_channels: int = 1, channel: int = 0) -> ModelSpec:
    """Make ``run_inference`` use a 2D :class:`BrightVoxels` on ``channel`` instead of loading a checkpoint."""
    spec = ModelSpec(network_name="unet", spatial_dims=2, in_channels=in_channels, roi_size=[64, 64],
                     channels=THREE_CHANNELS if in_channels == 3 else ["image"])
    monkeypatch.setattr(runner, "load_model", lambda checkpoint, device: (BrightVoxels(channel).eval(), spec))
    return spec


def infer_settings(**values) -> InferenceSettings:
    return InferenceSettings("unused.pt", tta="none", threshold=0.5, progress=False, device="cpu", **values)


def infer_cli(*args: str | Path) -> int:
    return cli_main(["infer", *map(str, args), "--checkpoint", "unused.pt", "--tta", "none", "--device", "cpu",
                     "--no-progress"])


def bright_per_slice(volume: np.ndarray, channel: int = 0) -> np.ndarray:
    """The mask :class:`BrightVoxels` gives through a 2D model: a (C, x, y[, z]) image -> (x, y[, z]) bool.

    Per slice, the non-zero pixels above the mean of the slice's non-zero pixels; slices of noise only stay empty.
    """
    from brainseg_monai.inference.predictor import noise_only_slices

    planar = volume.ndim == 3
    values = (volume[..., None] if planar else volume).astype(np.float64)
    expected = np.zeros(values.shape[1:], dtype=bool)
    noise = set(noise_only_slices(values)) if not planar else set()
    for z in range(values.shape[-1]):
        plane = values[channel, ..., z]
        if z not in noise and (plane != 0).any():
            expected[..., z] = (plane > plane[plane != 0].mean()) & (plane != 0)
    return expected[..., 0] if planar else expected


def xyz(image: sitk.Image) -> np.ndarray:
    """A SimpleITK image's pixels in reader axis order (x, y[, z])."""
    return sitk.GetArrayFromImage(image).T


def write_image(path: Path, array_xy: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(sitk.GetImageFromArray(np.ascontiguousarray(array_xy.T)), str(path))
    return path


def random_image(seed: int, shape: tuple[int, int] = (40, 28)) -> np.ndarray:
    """A (x, y) uint8 image with a bright block whose place depends on ``seed``: masks of two seeds differ."""
    rng = np.random.default_rng(seed)
    image = rng.integers(1, 60, size=shape, dtype=np.uint8)
    x0 = 3 + seed % 17
    image[x0:x0 + 12, 4:14] = 250
    return image


def pred_png(path: Path) -> np.ndarray:
    return xyz(sitk.ReadImage(str(path))) > 0
