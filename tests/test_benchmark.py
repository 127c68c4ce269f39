"""``brainseg benchmark`` on tiny sizes (keys and sane numbers, never timings), its memory probes, and the inference
optimisations it led to: each must give the same probabilities as the plain path within a stated tolerance."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.transforms import NormalizeIntensity

from brainseg_monai.benchmark import BenchmarkSizes, PeakMemory, format_table, run_benchmark, run_command
from brainseg_monai.inference.predictor import (
    ModelSpec,
    Predictor,
    inference_network,
    normalise_images,
    normalise_slices,
)
from brainseg_monai.inference.tta import predict_with_tta
from brainseg_monai.networks import get_network
from brainseg_monai.transforms import channel_statistics, normalise_with
from conftest import REPO_ROOT

#: Probabilities of the optimised path (batch norm folded, channels-last, vectorised normalisation) against the plain one.
PROB_TOLERANCE = 1e-5
TINY_NET = {"channels": [4, 8, 16], "strides": [2, 2], "num_res_units": 1}


def _with_trained_batch_norm(net: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Batch-norm statistics and affine terms far from the identity, as after training, so folding them matters."""
    gen = torch.Generator().manual_seed(seed)
    for module in net.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            n = module.num_features
            module.running_mean.copy_(torch.rand(n, generator=gen) * 2 - 1)
            module.running_var.copy_(torch.rand(n, generator=gen) * 1.5 + 0.5)
            module.weight.data.copy_(torch.rand(n, generator=gen) + 0.5)
            module.bias.data.copy_(torch.rand(n, generator=gen) - 0.5)
    return net.eval()


def _batch_norms(net: torch.nn.Module) -> int:
    return sum(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in net.modules())


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_inference_network_folds_batch_norm_and_keeps_outputs(spatial_dims: int) -> None:
    torch.manual_seed(0)
    net = _with_trained_batch_norm(get_network("unet", spatial_dims, 3, 1, **TINY_NET))
    before = {k: v.clone() for k, v in net.state_dict().items()}
    fast = inference_network(net, "cpu")
    assert _batch_norms(net) > 0 and _batch_norms(fast) == 0, "every conv + batch norm pair should be folded"
    memory_format = torch.channels_last if spatial_dims == 2 else torch.channels_last_3d
    conv = next(m for m in fast.modules() if isinstance(m, torch.nn.modules.conv._ConvNd))
    assert conv.weight.is_contiguous(memory_format=memory_format)
    x = torch.randn((2, 3) + (32,) * spatial_dims, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        expected, got = torch.sigmoid(net(x)), torch.sigmoid(fast(x))
    assert (expected - got).abs().max().item() < PROB_TOLERANCE
    assert (expected - 0.5).abs().max().item() > 0.05, "the check needs a network whose output is not flat"
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items()), "the caller's network was changed"


def test_batch_norm_after_activation_is_not_folded() -> None:
    """Folding is exact only when batch norm comes straight after the convolution (ADN order "NDA")."""
    net = _with_trained_batch_norm(get_network("unet", 2, 3, 1, adn_ordering="AN", **TINY_NET))
    fast = inference_network(net, "cpu")
    assert _batch_norms(fast) == _batch_norms(net) > 0
    x = torch.randn(1, 3, 32, 32)
    with torch.inference_mode():
        assert torch.allclose(torch.sigmoid(net(x)), torch.sigmoid(fast(x)), atol=PROB_TOLERANCE)


def test_predictor_matches_plain_tta_through_sliding_window() -> None:
    """The whole optimised path (sliding window, 8 views) against plain TTA on the unmodified network."""
    torch.manual_seed(0)
    spec = ModelSpec(network_kwargs=TINY_NET, roi_size=[32, 32])
    net = _with_trained_batch_norm(get_network("unet", 2, 3, 1, **TINY_NET))
    predictor = Predictor(net, spec, torch.device("cpu"), tta="dihedral", batch_size=4)
    images = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    got = predictor.predict_batch(images)
    plain = Predictor(net, spec, torch.device("cpu"), tta="dihedral", batch_size=4)
    plain.network = net  # what predict_batch ran before the optimisation
    expected = plain.predict_batch(images)
    assert got.shape == (3, 64, 64)
    assert (got - expected).abs().max().item() < PROB_TOLERANCE
    direct = predict_with_tta(net, images[:, :, :32, :32], "dihedral", 2)[:, 0]
    small = predictor.predict_batch(images[:, :, :32, :32])  # no window: the network itself
    assert (small - direct).abs().max().item() < PROB_TOLERANCE


def test_normalise_slices_equals_monai_per_slice() -> None:
    gen = torch.Generator().manual_seed(0)
    volume = torch.rand(3, 40, 24, 6, generator=gen) * 900 * (torch.rand(1, 40, 24, 6, generator=gen) > 0.4)
    volume[1, ..., 2] = 0  # an all-zero plane stays zero
    volume[2, ..., 3] = (volume[2, ..., 3] != 0) * 7.0  # constant brain: std 0 is taken as 1
    monai_norm = NormalizeIntensity(nonzero=True, channel_wise=True)
    expected = torch.stack([torch.as_tensor(monai_norm(volume[..., z].clone())) for z in range(6)])
    got = normalise_slices(volume)
    assert got.shape == (6, 3, 40, 24)
    assert (got - expected).abs().max().item() < PROB_TOLERANCE
    assert not got[2, 1].any() and set(got[3, 2].unique().tolist()) <= {0.0}
    assert abs(float(got[0, 0][volume[0, ..., 0] != 0].mean())) < 1e-4


def test_normalise_images_equals_monai_per_image() -> None:
    """Stacked normalisation of a case's slices (two sizes here) against MONAI's transform on each image alone."""
    gen = torch.Generator().manual_seed(1)
    images = [torch.rand(3, *shape, generator=gen) * 500 * (torch.rand(1, *shape, generator=gen) > 0.3)
              for shape in ((40, 24), (40, 24), (16, 16), (40, 24))]
    images[1][2] = 0  # an all-zero channel stays zero
    monai_norm = NormalizeIntensity(nonzero=True, channel_wise=True)
    for got, image in zip(normalise_images(images), images):
        assert got.shape == image.shape
        assert (got - torch.as_tensor(monai_norm(image.clone()))).abs().max().item() < PROB_TOLERANCE
    stats = channel_statistics(images)
    for got, image in zip(normalise_images(images, stats), images):
        expected = normalise_with(image, stats["norm_mean"], stats["norm_std"])
        assert (got - expected).abs().max().item() < PROB_TOLERANCE


def test_volume_by_slices_equals_the_per_slice_path() -> None:
    """Vectorised normalisation + optimised network against MONAI's transform per slice + the plain network."""
    rng = np.random.default_rng(0)
    volume = rng.rayleigh(3.0, size=(3, 32, 32, 6)).astype(np.float32)
    volume[:, 6:26, 6:26, 1:5] += rng.uniform(200, 600, size=(3, 20, 20, 4)).astype(np.float32)
    spec = ModelSpec(network_kwargs=TINY_NET, roi_size=[32, 32])
    net = _with_trained_batch_norm(get_network("unet", 2, 3, 1, **TINY_NET))
    got = Predictor(net, spec, torch.device("cpu"), tta="flip").predict_volume_by_slices(torch.as_tensor(volume), "v")
    monai_norm = NormalizeIntensity(nonzero=True, channel_wise=True)
    expected = np.zeros_like(got)
    for z in (1, 2, 3, 4):  # slices 0 and 5 hold noise only and get 0
        image = torch.as_tensor(monai_norm(torch.as_tensor(volume[..., z]).clone()))[None]
        expected[..., z] = predict_with_tta(net, image, "flip", 2)[0, 0].numpy()
    assert np.abs(got - expected).max() < PROB_TOLERANCE


def test_run_command_reports_the_child_peak_not_ours(tmp_path: Path) -> None:
    hog = "import numpy as np, time; a = np.ones(300 * 2**20 // 8); time.sleep(0.3)"
    result = run_command([sys.executable, "-c", hog])
    assert 300 < result["peak_rss_mb"] < 600, result  # 300 MiB of ones plus the interpreter and numpy
    assert result["peak_tree_rss_mb"] >= result["peak_rss_mb"] and result["seconds"] > 0.3
    small = run_command([sys.executable, "-c", "pass"])
    assert small["peak_rss_mb"] < 100, "a child must not inherit this process's peak"
    with pytest.raises(RuntimeError, match="(?s)status 3.*boom"):
        run_command([sys.executable, "-c", "print('boom'); raise SystemExit(3)"])


def test_peak_memory_sees_a_temporary_allocation() -> None:
    with PeakMemory() as peak:
        block = np.ones(200 * 2**20 // 8)
        del block
    assert peak.peak_mb - peak.baseline_mb > 150, peak.to_dict()
    assert peak.to_dict()["memory_method"] in ("VmHWM", "ru_maxrss")


def test_sizes_are_checked() -> None:
    with pytest.raises(ValueError, match="repeats must be a positive integer but is 0"):
        BenchmarkSizes(repeats=0)
    with pytest.raises(ValueError, match="volume_size"):
        BenchmarkSizes(volume_size=(32, 0, 16))


def _positive_finite(value: object, where: str) -> None:
    assert isinstance(value, (int, float)) and math.isfinite(value) and value > 0, f"{where} = {value!r}"


@pytest.mark.slow
def test_tiny_benchmark_writes_every_key(tmp_path: Path) -> None:
    sizes = BenchmarkSizes(
        image_size=32, slices=4, cases=1, repeats=1, scaling_cases=1, scaling_repeats=1, batch_size=4,
        network_kwargs={"channels": [4, 8], "strides": [2], "num_res_units": 1}, roi_size=(32, 32), train_cases=3,
        train_steps=2, train_roi=(32, 32), volume_size=(32, 32, 8), roi_3d=(16, 16, 16),
        network_kwargs_3d={"channels": [4, 8], "strides": [2], "num_res_units": 1}, matmul_size=64,
    )
    out = tmp_path / "b.json"
    result = run_benchmark(out, device="cpu", bundle=REPO_ROOT / "bundle", sizes=sizes, workdir=tmp_path / "work")
    assert json.loads(out.read_text()) == json.loads(json.dumps(result, default=float))
    for key in ("tta_speedup_vs_monai_tta", "tta_overhead_pct", "forward_fraction_of_matmul_peak",
                "train_data_overhead_pct"):
        _positive_finite(result[key], key)
    parts = result["parts"]
    for name in ("infer_tta_dihedral", "monai_tta", "infer_tta_none", "forward_only", "matmul_fp32",
                 "train_bundle_pipeline", "train_in_memory"):
        for stat in ("median", "min", "max"):
            _positive_finite(parts[name]["seconds"][stat], f"{name} seconds {stat}")
        assert parts[name]["seconds"]["min"] <= parts[name]["seconds"]["median"] <= parts[name]["seconds"]["max"]
        _positive_finite(parts[name]["peak_rss_mb"], f"{name} peak")
    assert result["tta_setup"]["slices"] == 4
    # 4 slices x 8 views at batch size 4: one forward of 32 images (the 32x32 images fit the model's patch)
    assert parts["forward_only"]["batches"] == 1 and parts["forward_only"]["batch_shapes"][0]["shape"] == [32, 3, 32, 32]
    scaling = result["scaling"]
    assert [r["cases"] for r in scaling["runs"]] == [1, 2, 4] and [r["slices"] for r in scaling["runs"]] == [4, 8, 16]
    assert [r["processes"] for r in scaling["torchrun"]] == [1, 2]
    for row in scaling["runs"] + scaling["torchrun"]:
        _positive_finite(row["seconds"]["median"], "scaling seconds")
        _positive_finite(row["peak_rss_mb"], "scaling peak")
        assert row["peak_tree_rss_mb"] >= row["peak_rss_mb"]
    assert scaling["torchrun"][1]["peak_tree_rss_mb"] > scaling["torchrun"][1]["peak_rss_mb"], "two workers, one sum"
    for key in ("time_linearity", "memory_growth_pct_1x_to_4x", "torchrun_speedup_2_vs_1"):
        assert key in scaling
    for name in ("volume_3d_sliding_window", "volume_2d_by_slices"):
        _positive_finite(result["volume"][name]["seconds"]["median"], name)
        _positive_finite(result["volume"][name]["peak_rss_mb"], name)
    assert result["machine"]["cores"] >= 1 and result["machine"]["torch"] == torch.__version__
    table = format_table(result)
    for key in ("tta_speedup_vs_monai_tta", "tta_overhead_pct", "forward_fraction_of_matmul_peak",
                "train_data_overhead_pct", "monai_tta", "torchrun x2", "volume_3d_sliding_window"):
        assert key in table
