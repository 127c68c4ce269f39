"""``brainseg benchmark`` on tiny sizes (keys and sane numbers, never timings), its memory probes, and the inference
optimisations it led to: each must give the same probabilities as the plain path within a stated tolerance."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from monai.transforms import NormalizeIntensity

from brainseg_monai import cli
from brainseg_monai.benchmark import (
    BenchmarkSizes,
    PeakMemory,
    _bench_dicom,
    _bench_tta,
    _write_checkpoint,
    format_table,
    mask_agreement,
    run_benchmark,
    run_command,
)
from brainseg_monai.errors import InputError
from brainseg_monai.inference import predictor as predictor_module
from brainseg_monai.inference.predictor import GroupInstanceNorm, Predictor, inference_network
from brainseg_monai.inference.tta import predict_with_tta
from brainseg_monai.inference.writers import write_png_mask
from brainseg_monai.model import ModelSpec
from brainseg_monai.networks import get_network
from conftest import REPO_ROOT, shared_path

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
    got = predictor.predict_batch(images)[:, 0]
    plain = Predictor(net, spec, torch.device("cpu"), tta="dihedral", batch_size=4)
    plain.network = net  # what predict_batch ran before the optimisation
    expected = plain.predict_batch(images)[:, 0]
    assert got.shape == (3, 64, 64)
    assert (got - expected).abs().max().item() < PROB_TOLERANCE
    direct = predict_with_tta(net, images[:, :, :32, :32], "dihedral", 2)[:, 0]
    small = predictor.predict_batch(images[:, :, :32, :32])[:, 0]  # no window: the network itself
    assert (small - direct).abs().max().item() < PROB_TOLERANCE


TINY_INSTANCE_NET = {**TINY_NET, "norm": "instance"}


def _instance_norm_predictor_inputs() -> tuple[torch.nn.Module, ModelSpec, torch.Tensor]:
    torch.manual_seed(0)
    spec = ModelSpec(network_kwargs=TINY_INSTANCE_NET, roi_size=[32, 32])
    net = get_network("unet", 2, 3, 1, **TINY_INSTANCE_NET).eval()
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(3)) * 2 + 0.5
    return net, spec, images


def test_precision_fp32_is_the_reference_bit_for_bit() -> None:
    """``fp32`` runs the inference network as it was before ``--precision``: no autocast, the network's own layers."""
    net, spec, images = _instance_norm_predictor_inputs()
    predictor = Predictor(net, spec, torch.device("cpu"), tta="dihedral", precision="fp32")
    assert predictor.fast_path.autocast is None and not predictor.fast_path.group_instance_norm
    with torch.inference_mode():
        expected = predict_with_tta(inference_network(net, "cpu"), images, "dihedral", 2)[:, 0]
    assert torch.equal(predictor.predict_batch(images)[:, 0], expected)
    bn_net = _with_trained_batch_norm(get_network("unet", 2, 3, 1, **TINY_NET))
    bn_spec = ModelSpec(network_kwargs=TINY_NET, roi_size=[32, 32])
    fp32, auto = (Predictor(bn_net, bn_spec, torch.device("cpu"), precision=p).predict_batch(images)[:, 0]
                  for p in ("fp32", "auto"))
    assert torch.equal(fp32, auto), "auto changes nothing on CPU for a model without instance norm"


def test_precision_auto_on_cpu_runs_instance_norm_as_group_norm() -> None:
    net, spec, images = _instance_norm_predictor_inputs()
    auto = Predictor(net, spec, torch.device("cpu"), tta="dihedral")
    assert auto.fast_path.autocast is None and auto.fast_path.group_instance_norm
    assert not any(isinstance(m, torch.nn.InstanceNorm2d) for m in auto.network.modules())
    assert sum(isinstance(m, GroupInstanceNorm) for m in auto.network.modules()) == sum(
        isinstance(m, torch.nn.InstanceNorm2d) for m in net.modules()) > 0
    fp32 = Predictor(net, spec, torch.device("cpu"), tta="dihedral", precision="fp32")
    got, expected = auto.predict_batch(images)[:, 0], fp32.predict_batch(images)[:, 0]
    assert (got - expected).abs().max().item() < PROB_TOLERANCE
    assert (expected - 0.5).abs().max().item() > 0.05, "the check needs a network whose output is not flat"


def test_group_instance_norm_equals_affine_instance_norm() -> None:
    norm = torch.nn.InstanceNorm2d(4, affine=True, eps=1e-3).eval()
    with torch.no_grad():
        norm.weight.copy_(torch.tensor([0.5, 1.0, 2.0, -1.0]))
        norm.bias.copy_(torch.tensor([0.1, -0.2, 0.0, 3.0]))
    x = (torch.randn(2, 4, 9, 7) * 5 + 3).contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(GroupInstanceNorm(norm)(x), norm(x), rtol=0, atol=1e-5)


def test_precision_bf16_only_where_the_device_has_it(monkeypatch: pytest.MonkeyPatch) -> None:
    net, spec, images = _instance_norm_predictor_inputs()
    monkeypatch.setattr(predictor_module, "cpu_bf16_flags", lambda: frozenset())
    with pytest.raises(ValueError, match="neither AVX512-BF16 nor AMX-BF16.*use precision fp32 or auto"):
        Predictor(net, spec, torch.device("cpu"), precision="bf16")
    assert Predictor(net, spec, torch.device("cpu")).fast_path.autocast is None, "auto is never bfloat16 on CPU"
    monkeypatch.setattr(predictor_module, "cpu_bf16_flags", lambda: frozenset({"avx512_bf16"}))
    bf16 = Predictor(net, spec, torch.device("cpu"), tta="dihedral", precision="bf16")
    assert bf16.fast_path.autocast == torch.bfloat16 and not bf16.fast_path.group_instance_norm
    assert Predictor(net, spec, torch.device("cpu")).fast_path.autocast is None, "nor where the CPU has it"
    got = bf16.predict_batch(images)[:, 0]
    expected = Predictor(net, spec, torch.device("cpu"), tta="dihedral", precision="fp32").predict_batch(images)[:, 0]
    assert got.dtype == torch.float32 and not torch.equal(got, expected)
    assert (got - expected).abs().max().item() < 0.05


def test_unknown_precision_is_a_clear_error() -> None:
    net, spec, _ = _instance_norm_predictor_inputs()
    with pytest.raises(ValueError, match="precision must be one of fp32, bf16, auto but is 'fp16'"):
        Predictor(net, spec, torch.device("cpu"), precision="fp16")
    parser = cli.build_parser()
    for command in (["infer", "x", "--out", "y"], ["benchmark", "--out", "y"]):
        assert parser.parse_args(command + ["--precision", "fp32"]).precision == "fp32"
        assert parser.parse_args(command).precision == "auto"
        with pytest.raises(SystemExit):
            parser.parse_args(command + ["--precision", "fp16"])


def test_benchmark_times_the_given_checkpoint(tmp_path: Path) -> None:
    """The TTA part on a tiny instance-norm checkpoint: it names the model, its norm and fast path, and times the
    default batch-norm U-Net beside it."""
    sizes = BenchmarkSizes(image_size=32, slices=4, cases=1, repeats=1, batch_size=2,
                           network_kwargs={"channels": [4, 8], "strides": [2], "num_res_units": 1}, matmul_size=64)
    checkpoint = _write_checkpoint(tmp_path / "tiny", ModelSpec(network_kwargs=TINY_INSTANCE_NET, roi_size=[32, 32]))
    result = _bench_tta(sizes, torch.device("cpu"), None, tmp_path / "work", checkpoint, "auto")
    assert result["model"] == {
        "checkpoint": str(checkpoint), "network": "unet", "norm": "instance", "network_kwargs": TINY_INSTANCE_NET,
        "precision": "auto", "fast_path": "float32, instance norm as group_norm", "default_unet_norm": "batch",
        "default_unet_kwargs": sizes.network_kwargs,
    }
    for name in ("infer_tta_dihedral", "infer_tta_dihedral_fp32", "monai_tta", "infer_tta_none", "forward_only",
                 "forward_fast", "forward_default_unet_bn"):
        _positive_finite(result["parts"][name]["seconds"]["median"], name)
    assert result["tta_setup"]["roi_size"] == [32, 32]
    table = format_table({"machine": {"cpu": "c", "cores": 2, "torch": "t", "device": "cpu"}, **result})
    assert f"model timed: {checkpoint} (unet, instance norm), precision auto -> float32, instance norm as" in table
    fp32 = _bench_tta(sizes, torch.device("cpu"), None, tmp_path / "work32", checkpoint, "fp32")
    assert fp32["model"]["fast_path"] == "float32"
    assert "forward_fast" not in fp32["parts"] and "infer_tta_dihedral_fp32" not in fp32["parts"]


def test_benchmark_refuses_a_missing_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="checkpoint not found"):
        run_benchmark(tmp_path / "b.json", bundle=REPO_ROOT / "bundle", checkpoint=tmp_path / "none.pt")


def test_mask_agreement_is_dice_per_case_over_its_stacked_masks(tmp_path: Path) -> None:
    square = np.zeros((16, 16), dtype=np.uint8)
    square[4:8, 4:8] = 1  # 16 pixels
    shifted = np.roll(square, 2, axis=0)  # 8 of them shared
    empty = np.zeros_like(square)
    for run, masks in (("a", {"p1": [square, square], "p2": [empty]}), ("b", {"p1": [square, shifted], "p2": [empty]})):
        for case, slices in masks.items():
            for i, mask in enumerate(slices):
                write_png_mask(mask, tmp_path / run / case / f"{case}_{i}_pred.png")
    (tmp_path / "a" / ".p3.tmp12345").mkdir()  # what an interrupted run leaves is not a case
    result = mask_agreement(tmp_path / "a", tmp_path / "b")
    assert result["cases"]["p1"] == {"dice": 2 * (16 + 8) / 64, "pixels": [32, 32], "pixels_differing": 16}
    assert result["cases"]["p2"]["dice"] == 1.0, "two empty masks agree"
    assert result["cases_compared"] == 2 and result["identical_cases"] == 1 and result["min_dice"] == 0.75
    write_png_mask(square, tmp_path / "b" / "p4" / "p4_0_pred.png")
    with pytest.raises(InputError, match="same cases and mask files.*p4"):
        mask_agreement(tmp_path / "a", tmp_path / "b")


def test_volume_by_slices_equals_the_per_slice_path() -> None:
    """Vectorised normalisation + optimised network against MONAI's transform per slice + the plain network."""
    rng = np.random.default_rng(0)
    volume = rng.rayleigh(3.0, size=(3, 32, 32, 6)).astype(np.float32)
    volume[:, 6:26, 6:26, 1:5] += rng.uniform(200, 600, size=(3, 20, 20, 4)).astype(np.float32)
    spec = ModelSpec(network_kwargs=TINY_NET, roi_size=[32, 32])
    net = _with_trained_batch_norm(get_network("unet", 2, 3, 1, **TINY_NET))
    got = Predictor(net, spec, torch.device("cpu"), tta="flip").predict_volume_by_slices(torch.as_tensor(volume), "v")[0]
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
        network_kwargs={"channels": [4, 8], "strides": [2], "num_res_units": 1}, train_cases=3,
        train_steps=2, train_roi=(32, 32), volume_size=(32, 32, 8), roi_3d=(16, 16, 16),
        network_kwargs_3d={"channels": [4, 8], "strides": [2], "num_res_units": 1}, matmul_size=64,
    )
    out = tmp_path / "b.json"
    checkpoint = _write_checkpoint(tmp_path / "tiny", ModelSpec(network_kwargs=TINY_INSTANCE_NET, roi_size=[32, 32]))
    result = run_benchmark(out, device="cpu", bundle=REPO_ROOT / "bundle", sizes=sizes, workdir=tmp_path / "work",
                           checkpoint=checkpoint)
    assert json.loads(out.read_text()) == json.loads(json.dumps(result, default=float))
    for key in ("tta_speedup_vs_monai_tta", "forward_fraction_of_matmul_peak"):
        _positive_finite(result[key], key)
    for key in ("tta_overhead_pct", "train_data_overhead_pct"):  # differences of timings: noise may make them < 0
        assert math.isfinite(result[key]), key
    parts = result["parts"]
    assert result["model"]["checkpoint"] == str(checkpoint) and result["model"]["norm"] == "instance"
    for name in ("infer_tta_dihedral", "monai_tta", "infer_tta_none", "forward_only", "forward_fast",
                 "forward_default_unet_bn", "matmul_fp32", "train_bundle_pipeline", "train_in_memory"):
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
                "train_data_overhead_pct", "monai_tta", "torchrun x2", "volume_3d_sliding_window", "model timed",
                "forward_default_unet_bn"):
        assert key in table


def test_cpu_forwards_are_cut_to_a_cache_sized_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    """On the CPU a 2D model's stacked TTA views go through the network in chunks of at most
    ``_CPU_FORWARD_PIXELS`` pixels, with the same probabilities as one whole batch."""
    net, spec, images = _instance_norm_predictor_inputs()
    whole = Predictor(net, spec, torch.device("cpu"), tta="dihedral").predict_batch(images)[:, 0]
    monkeypatch.setattr(predictor_module, "_CPU_FORWARD_PIXELS", 5 * 32 * 32)
    predictor = Predictor(net, spec, torch.device("cpu"), tta="dihedral")
    seen: list[int] = []
    handle = predictor.network.register_forward_pre_hook(lambda module, args: seen.append(args[0].shape[0]))
    try:
        chunked = predictor.predict_batch(images)[:, 0]
    finally:
        handle.remove()
    assert seen == [5, 5, 5, 5, 4], "3 images x 8 views in forwards of at most 5 images"
    assert (chunked - whole).abs().max().item() < PROB_TOLERANCE


def test_benchmark_dicom_study_keeps_the_field_of_view(tmp_path: Path) -> None:
    """The benchmark's DICOM study: the central slices of the real series, resampled, on the same field of view."""
    import SimpleITK as sitk

    from brainseg_monai.benchmark import _dicom_study

    series = shared_path("dicom", "HF1139_AXIAL_FLAIR")
    study = _dicom_study(series, tmp_path, slices=5, size=288)
    reader = sitk.ImageSeriesReader()
    source = sitk.ReadImage(reader.GetGDCMSeriesFileNames(str(series)))
    copy = sitk.ReadImage(reader.GetGDCMSeriesFileNames(str(study / "series")))
    assert copy.GetSize() == (288, 288, 5)
    assert copy.GetDirection() == pytest.approx(source.GetDirection())
    for axis in (0, 1):  # the field of view's edges: first pixel centre minus half a pixel, and its far end
        low = lambda image: image.GetOrigin()[axis] - image.GetSpacing()[axis] / 2  # noqa: E731
        assert low(copy) == pytest.approx(low(source), abs=1e-3)
        assert copy.GetSpacing()[axis] * 288 == pytest.approx(source.GetSpacing()[axis] * 256, abs=1e-3)
    # the central 5 of 53 slices, in order, and their content resampled, not replaced
    assert copy.GetOrigin()[2] == pytest.approx(source.GetOrigin()[2] + 24 * source.GetSpacing()[2], abs=1e-3)
    middle = sitk.GetArrayFromImage(source)[26].astype(float)
    resampled = sitk.GetArrayFromImage(copy)[2].astype(float)
    assert resampled.mean() == pytest.approx(middle.mean(), rel=0.02)
    assert pydicom.dcmread(next((study / "series").iterdir())).SeriesDescription == "AXIAL FLAIR"


def test_benchmark_times_infer_on_the_dicom_study(tmp_path: Path) -> None:
    sizes = BenchmarkSizes(repeats=1, batch_size=2, dicom_slices=3, dicom_size=64)
    spec = ModelSpec(network_kwargs=TINY_INSTANCE_NET, roi_size=[32, 32], channel_fallbacks={"t1": "flair", "t1c": "flair"})
    checkpoint = _write_checkpoint(tmp_path / "tiny", spec)
    result = _bench_dicom(sizes, torch.device("cpu"), shared_path("dicom", "HF1139_AXIAL_FLAIR"), tmp_path / "work",
                          checkpoint, "auto")
    assert set(result["parts"]) == {"dicom_tta_dihedral", "dicom_tta_dihedral_fp32"}
    for name, part in result["parts"].items():
        _positive_finite(part["seconds"]["median"], name)
    assert result["dicom_setup"]["slices"] == 3 and result["dicom_setup"]["size"] == [64, 64]
