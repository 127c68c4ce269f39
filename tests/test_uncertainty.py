"""How sure the model is: the case score on arrays with known answers, the spread's writers, and ``brainseg infer``
writing the views' disagreement beside every mask with a network whose views disagree in a known way."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from brainseg_monai.inference.runner import InferenceSettings, run_inference
from brainseg_monai.inference.tta import tta_views
from brainseg_monai.inference.writers import (
    spread_from_png,
    write_spread_png,
    write_spread_volume,
    write_uncertainty_png,
)
from brainseg_monai.model import ModelSpec
from brainseg_monai.uncertainty import EXPECTED_DICE as SCORE
from brainseg_monai.uncertainty import MEMBERS_DICE, RING_PIXELS, case_score, members_score, needs_review, validate


def _square(shape: tuple[int, ...], lo: int, hi: int) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    mask[lo:hi, lo:hi] = True
    return mask


def _expected_dice_score(prob: np.ndarray, mask: np.ndarray, region: np.ndarray) -> float:
    """One minus 2 sum(p m) / (sum(p) + sum(m)) over ``region``, written out for the tests."""
    return 1.0 - 2.0 * float((prob * mask)[region].sum()) / (float(prob[region].sum()) + float(mask.sum()))


def test_score_is_one_minus_the_masks_expected_dice() -> None:
    mask = _square((32, 32), 10, 20)  # 100 pixels; with a 2-pixel ring 14 x 14 = 196
    prob = np.full((32, 32), 0.01, np.float32)  # faint everywhere: counted only in the ring
    prob[mask] = 0.8
    prob[10:20, 20] = 0.2  # doubt just outside the mask, below half the threshold: in the ring
    expected = 1.0 - 2 * 80.0 / (100 + 80 + 10 * 0.2 + 0.01 * (196 - 100 - 10))
    assert case_score(prob, mask, threshold=0.5) == pytest.approx(expected)
    assert case_score(mask.astype(np.float32), mask, threshold=0.5) == 0.0, "every view sure of the mask"
    assert case_score(np.where(mask, 0.5, 0.0), mask, threshold=0.5) == pytest.approx(1 - 2 * 50 / 150)


def test_doubt_away_from_the_mask_counts_above_half_the_threshold() -> None:
    """A blob the views half saw (above half the threshold) is a tumour the mask may have missed; fainter is not."""
    mask = _square((48, 48), 10, 20)
    prob = mask.astype(np.float32)
    prob[35:37, 35:37] = 0.2  # below 0.25: not counted
    assert case_score(prob, mask, threshold=0.5) == 0.0
    prob[35:37, 35:37] = 0.4  # above 0.25: the blob and its ring (6 x 6) join the region
    assert case_score(prob, mask, threshold=0.5) == pytest.approx(1 - 2 * 100 / (100 + 100 + 4 * 0.4))


def test_slices_are_stacked_and_the_ring_stays_in_plane() -> None:
    """Two slices of a slice folder: the region does not reach the other slice, whose faint probability is not
    counted."""
    masks = [_square((32, 32), 10, 20), np.zeros((32, 32), dtype=bool)]
    probs = [np.where(masks[0], 0.9, 0.0).astype(np.float32), np.full((32, 32), 0.2, np.float32)]
    assert case_score(probs, masks, threshold=0.5) == pytest.approx(1 - 2 * 90 / (100 + 90))


def test_slices_of_different_sizes_are_scored_together() -> None:
    """A slice folder may hold slices of several sizes: each is grown in its own plane, the sums pooled."""
    masks = [_square((32, 32), 10, 20), _square((48, 40), 10, 20)]
    probs = [np.where(ndimage_ring(m), 0.1, 0.0).astype(np.float32) for m in masks]
    probs[0][masks[0]] = 0.9
    probs[1][masks[1]] = 0.6
    overlap, mass = 90 + 60, (90 + 0.1 * 96) + (60 + 0.1 * 96)
    assert case_score(probs, masks, threshold=0.5) == pytest.approx(1 - 2 * overlap / (mass + 200))
    volume = np.stack([probs[0], probs[0]], axis=-1)  # the same in (x, y, z): each z plane grown alone
    region = np.stack([ndimage_ring(masks[0])] * 2, axis=-1)
    both = np.stack([masks[0]] * 2, axis=-1)
    assert case_score(volume, both, 0.5) == pytest.approx(_expected_dice_score(volume, both, region))


def ndimage_ring(mask: np.ndarray) -> np.ndarray:
    """The mask grown by RING_PIXELS in-plane: the region the score sums over."""
    from scipy import ndimage

    return ndimage.binary_dilation(mask, structure=np.ones((2 * RING_PIXELS + 1,) * 2, dtype=bool))


def test_no_predicted_tumour_scores_the_chance_of_one() -> None:
    mask = np.zeros((16, 16, 3), dtype=bool)
    prob = np.zeros(mask.shape, np.float32)
    assert case_score(prob, mask, threshold=0.5) == 0.0, "every view sure there is nothing"
    prob[8, 8, 1] = 0.3  # above half the threshold: some views called it tumour
    assert case_score(prob, mask, threshold=0.5) == pytest.approx(0.3)
    prob[2, 2, 0] = 0.4  # and another, in another slice: tumour somewhere unless both are not
    assert case_score(prob, mask, threshold=0.5) == pytest.approx(1 - 0.7 * 0.6)


def test_an_ensembles_score_is_one_minus_its_members_mean_pairwise_dice() -> None:
    a = _square((32, 32), 10, 20)  # 100 pixels
    b = np.roll(a, 2, axis=0)  # 80 shared
    assert members_score([a, b]) == pytest.approx(1 - 0.8)
    c = np.zeros_like(a)
    assert members_score([a, b, c]) == pytest.approx(1 - (0.8 + 0 + 0) / 3)
    assert members_score([c, c]) == 0.0, "two members that both see nothing agree"
    # slice folders: each member's slices pooled over the case
    slices_a, slices_b = [a, np.zeros((16, 24), bool)], [b, _square((16, 24), 2, 6)]
    assert members_score([slices_a, slices_b]) == pytest.approx(1 - 2 * 80 / (100 + 100 + 16))
    with pytest.raises(ValueError, match="two or more"):
        members_score([a])
    with pytest.raises(ValueError, match="one shape"):
        members_score([a, a[:16]])


def test_shapes_must_agree_and_review_needs_a_threshold_of_this_score() -> None:
    with pytest.raises(ValueError, match="one shape"):
        case_score(np.zeros((4, 4)), np.zeros((4, 5), bool), 0.5)
    assert needs_review(0.2, {}) is None
    assert needs_review(0.2, {"review_above": 0.1, "score": SCORE}) is True
    assert needs_review(0.05, {"review_above": 0.1, "score": SCORE}) is False
    with pytest.warns(UserWarning, match="chosen for another case score"):  # an earlier model.json's mean spread
        assert needs_review(0.9, {"review_above": 0.1}) is None
    with pytest.warns(UserWarning, match="chosen for another case score"):  # a single model's, on an ensemble's
        assert needs_review(0.9, {"review_above": 0.1, "score": SCORE}, MEMBERS_DICE) is None
    assert needs_review(0.9, {"review_above": 0.1, "score": MEMBERS_DICE}, MEMBERS_DICE) is True
    with pytest.raises(ValueError, match="review_above"):
        ModelSpec(uncertainty={"review_above": 1.5})


def test_spread_writers_keep_values_and_geometry(tmp_path: Path) -> None:
    spread = np.linspace(0, 0.5, 12 * 10, dtype=np.float32).reshape(12, 10)
    png = write_spread_png(spread, tmp_path / "a_unc.png")
    back = sitk.GetArrayFromImage(sitk.ReadImage(str(png))).T / 510.0
    assert np.abs(back - spread).max() <= 0.001
    np.testing.assert_allclose(spread_from_png(sitk.GetArrayFromImage(sitk.ReadImage(str(png))).T), back, rtol=1e-6)
    affine = np.diag([0.9, 1.1, 3.0, 1.0])
    affine[:3, 3] = [10.0, -20.0, 5.0]
    volume = np.repeat(spread[..., None], 4, axis=-1)
    image = sitk.ReadImage(str(write_spread_volume(volume, affine, tmp_path / "uncertainty.nii.gz")))
    assert image.GetSpacing() == pytest.approx((0.9, 1.1, 3.0))
    assert sitk.GetArrayFromImage(image).T == pytest.approx(volume)
    with pytest.raises(ValueError, match=r"standard deviations in \[0, 0.5\]"):
        write_spread_png(spread + 0.1, tmp_path / "b_unc.png")
    picture = write_uncertainty_png(np.zeros((1, 12, 10)), spread, _square((12, 10), 3, 8), tmp_path / "u.png")
    rgb = sitk.GetArrayFromImage(sitk.ReadImage(str(picture)))  # (y, x, 3)
    assert tuple(rgb[9, 11]) == (255, 255, 0), "the largest spread is pure yellow"
    assert tuple(rgb[0, 0]) == (0, 0, 0), "no spread: the grey image as it is"
    assert tuple(rgb[3, 3]) == (255, 0, 0), "the mask's outline"


class _Ramp(torch.nn.Module):
    """Logits that ignore the image: a ramp along the first spatial axis (plus 1, so the views' mean passes 0.6 in a
    blob at the centre), so each TTA view sees it turned and the views disagree by a known amount at each pixel."""

    def __init__(self) -> None:
        super().__init__()
        self.unused = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ramp = torch.linspace(-6.0, 6.0, x.shape[2]).reshape(1, 1, -1, 1) + 1.0
        return ramp.expand(x.shape[0], 1, x.shape[2], x.shape[3]).contiguous()


def _expected_views(shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Mean and standard deviation of the ramp's 8 dihedral views at each pixel of an image of ``shape``."""
    probs = []
    for view in tta_views("dihedral", 2):
        viewed = view.forward(torch.zeros(1, 1, *shape))
        probs.append(view.inverse(torch.sigmoid(_Ramp()(viewed)))[0, 0].numpy())
    return np.mean(probs, axis=0), np.std(probs, axis=0)


@pytest.mark.parametrize("review_above, flagged", [(None, ""), (0.01, "yes"), (0.95, "no")])
def test_infer_writes_the_views_spread_and_the_case_score(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                          review_above: float | None, flagged: str) -> None:
    import brainseg_monai.inference.runner as runner

    uncertainty = {} if review_above is None else {"review_above": review_above, "score": SCORE,
                                                   "chosen_on": "a test"}
    spec = ModelSpec(spatial_dims=2, in_channels=1, roi_size=[32, 32], channels=["image"], uncertainty=uncertainty)
    monkeypatch.setattr(runner, "load_model", lambda checkpoint, device: (_Ramp().eval(), spec))
    image = np.random.default_rng(0).integers(10, 200, size=(32, 32)).astype(np.uint8)
    folder = tmp_path / "case"
    folder.mkdir()
    for name in ("s_1.png", "s_2.png"):
        sitk.WriteImage(sitk.GetImageFromArray(image), str(folder / name))
    out = tmp_path / "pred"
    rows = run_inference([folder], out, InferenceSettings("unused.pt", tta="dihedral", threshold=0.6, progress=False,
                                                          device="cpu"))
    assert rows[0]["status"] == "ok", rows
    mean, std = _expected_views((32, 32))
    assert std.max() > 0.2, "the ramp's views disagree"
    for name in ("s_1", "s_2"):
        unc = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "case" / f"{name}_unc.png"))).T / 510.0
        assert np.abs(unc - std).max() <= 0.0015
    masks = [sitk.GetArrayFromImage(sitk.ReadImage(str(out / "case" / f"{name}_pred.png"))).T > 0
             for name in ("s_1", "s_2")]
    np.testing.assert_array_equal(masks[0], mean > 0.6)
    expected = case_score([mean, mean], masks, 0.6)
    assert float(rows[0]["uncertainty"]) == pytest.approx(expected, abs=1e-4) and expected > 0.05
    assert rows[0]["review"] == flagged
    assert (out / "case" / "uncertainty.png").is_file()
    with open(out / "summary.csv", newline="") as f:
        summary = next(csv.DictReader(f))
    assert float(summary["uncertainty"]) == pytest.approx(expected, abs=1e-4) and summary["review"] == flagged
    marker = json.loads((out / "case" / "case.json").read_text())
    assert marker["uncertainty"] == pytest.approx(expected, abs=1e-4) and marker["uncertainty_score"] == SCORE


def test_volume_gets_an_uncertainty_map_on_the_mask_grid(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import brainseg_monai.inference.runner as runner

    spec = ModelSpec(spatial_dims=2, in_channels=1, roi_size=[32, 32], channels=["image"])
    monkeypatch.setattr(runner, "load_model", lambda checkpoint, device: (_Ramp().eval(), spec))
    array = np.random.default_rng(1).uniform(50, 100, size=(4, 32, 32)).astype(np.float32)  # (z, y, x)
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((0.9, 0.9, 3.0))
    image.SetOrigin((1.0, 2.0, 3.0))
    source = tmp_path / "volume.nii.gz"
    sitk.WriteImage(image, str(source))
    for tta in ("dihedral", "none"):
        out = tmp_path / tta
        rows = run_inference([source], out, InferenceSettings("unused.pt", tta=tta, threshold=0.5, progress=False,
                                                              device="cpu"))
        assert rows[0]["status"] == "ok", rows
        if tta == "none":  # one view: nothing measured, so no map and no score that would read as certainty
            assert not (out / rows[0]["case"] / "uncertainty.nii.gz").exists()
            assert not (out / rows[0]["case"] / "uncertainty.png").exists()
            assert rows[0]["uncertainty"] == "" and rows[0]["review"] == ""
            continue
        unc = sitk.ReadImage(str(out / rows[0]["case"] / "uncertainty.nii.gz"))
        mask = sitk.ReadImage(str(out / rows[0]["case"] / "mask.nii.gz"))
        assert (unc.GetSize(), unc.GetSpacing(), unc.GetOrigin(), unc.GetDirection()) == (
            mask.GetSize(), mask.GetSpacing(), mask.GetOrigin(), mask.GetDirection())
        # every slice sees the same ramp: each z plane is the views' standard deviation of one (x, y) slice
        std = _expected_views((32, 32))[1]
        assert np.abs(sitk.GetArrayFromImage(unc) - std.T[None]).max() < 1e-5


def test_validate_counts_failures_among_the_most_uncertain() -> None:
    scores = {f"c{i}": s for i, s in enumerate([0.30, 0.05, 0.20, 0.10, 0.02, 0.25, 0.08, 0.04, 0.06, 0.01])}
    dice = {f"c{i}": d for i, d in enumerate([0.40, 0.90, 0.65, 0.80, 0.95, 0.85, 0.60, 0.90, 0.88, 0.97])}
    result = validate(scores, {**dice, "other": 0.5})  # a case without a score is left out
    assert result["cases"] == 10 and result["failures"] == 3  # c0, c2, c6
    assert result["top_cases"] == 2 and result["failures_in_top"] == 1  # the top 2: c0 (0.40) and c5 (0.85)
    assert result["review_above"] == pytest.approx((0.25 + 0.20) / 2)
    expected_rho = -0.8875420938  # Pearson of the ranks (the two 0.90 share rank 7.5), worked out by hand
    assert result["spearman_rho"] == pytest.approx(expected_rho, abs=1e-6)
    with pytest.raises(ValueError, match="at least 3 cases"):
        validate({"a": 0.1}, {"a": 0.9})


def test_a_slice_folder_of_mixed_sizes_is_scored(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With TTA, a folder whose slices differ in size still gets its masks and one score (it failed once)."""
    import brainseg_monai.inference.runner as runner

    spec = ModelSpec(spatial_dims=2, in_channels=1, roi_size=[32, 32], channels=["image"])
    monkeypatch.setattr(runner, "load_model", lambda checkpoint, device: (_Ramp().eval(), spec))
    folder = tmp_path / "case"
    folder.mkdir()
    rng = np.random.default_rng(2)
    for name, shape in (("s_1.png", (32, 32)), ("s_2.png", (64, 48))):
        sitk.WriteImage(sitk.GetImageFromArray(rng.integers(10, 200, size=shape).astype(np.uint8)), str(folder / name))
    rows = run_inference([folder], tmp_path / "pred", InferenceSettings("unused.pt", tta="dihedral", threshold=0.6,
                                                                        progress=False, device="cpu"))
    assert rows[0]["status"] == "ok", rows
    assert 0.0 < float(rows[0]["uncertainty"]) <= 1.0
    assert {p.name for p in (tmp_path / "pred" / "case").glob("*_unc.png")} == {"s_1_unc.png", "s_2_unc.png"}


def test_resume_scores_again_a_case_scored_by_an_earlier_definition(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """A summary must not mix two meanings of ``uncertainty``: a case finished before the score changed is redone."""
    import brainseg_monai.inference.runner as runner

    spec = ModelSpec(spatial_dims=2, in_channels=1, roi_size=[32, 32], channels=["image"])
    monkeypatch.setattr(runner, "load_model", lambda checkpoint, device: (_Ramp().eval(), spec))
    folder = tmp_path / "case"
    folder.mkdir()
    image = np.random.default_rng(3).integers(10, 200, size=(32, 32)).astype(np.uint8)
    sitk.WriteImage(sitk.GetImageFromArray(image), str(folder / "s_1.png"))
    settings = InferenceSettings("unused.pt", tta="dihedral", threshold=0.6, progress=False, device="cpu")
    run_inference([folder], tmp_path / "pred", settings)
    marker_path = tmp_path / "pred" / "case" / "case.json"
    marker = json.loads(marker_path.read_text())
    del marker["fingerprint"]["settings"]["case_scores"]  # as an earlier version recorded it
    marker_path.write_text(json.dumps(marker))
    settings.resume = True
    rows = run_inference([folder], tmp_path / "pred", settings)
    assert rows[0]["status"] == "ok" and "settings changed" in rows[0]["warnings"]
    assert json.loads(marker_path.read_text())["fingerprint"]["settings"]["case_scores"] == [SCORE, MEMBERS_DICE]
