"""Metrics on hand-made masks with hand-computed values: empty-mask conventions, distances in mm against a brute-force
computation, per-patient (stacked) Dice, pooling, tumour-free slices, detection, size bins and threshold tuning."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from monai.metrics import get_confusion_matrix

from brainseg_monai.errors import InputError
from brainseg_monai.metrics import (
    DEFAULT_THRESHOLDS,
    Confusion,
    best_on_curve,
    describe,
    detection_metrics,
    image_metrics,
    patient_metrics,
    pooled_metrics,
    size_bins,
    summarise,
    threshold_grid,
    tumour_free_metrics,
)


def mask(shape: tuple[int, ...], *points: tuple[int, ...]) -> np.ndarray:
    """Boolean mask of ``shape`` with the given voxels set."""
    out = np.zeros(shape, dtype=bool)
    for point in points:
        out[point] = True
    return out


def brute_force_distances(pred: np.ndarray, truth: np.ndarray, spacing: tuple[float, ...]) -> tuple[float, float]:
    """HD95 and symmetric ASD from all pairwise boundary distances (boundary: a voxel with a background face
    neighbour, outside the image counting as background)."""

    def boundary(m: np.ndarray) -> np.ndarray:
        padded = np.pad(m, 1)
        centre = tuple(slice(1, -1) for _ in m.shape)
        interior = m.copy()
        for axis in range(m.ndim):
            for shift in (-1, 1):
                interior &= np.roll(padded, shift, axis)[centre]
        return m & ~interior

    a = np.argwhere(boundary(pred)) * np.asarray(spacing)
    b = np.argwhere(boundary(truth)) * np.asarray(spacing)
    d = np.sqrt(((a[:, None, :] - b[None, :, :]) ** 2).sum(-1))
    pred_to_truth, truth_to_pred = d.min(axis=1), d.min(axis=0)
    hd95 = max(np.percentile(pred_to_truth, 95), np.percentile(truth_to_pred, 95))
    return float(hd95), float(np.concatenate([pred_to_truth, truth_to_pred]).mean())


# 4x4: truth 5 pixels, prediction 4 pixels, 3 of them right -> TP=3, FP=1, FN=2, TN=10
TRUTH_4x4 = mask((4, 4), (0, 0), (0, 1), (0, 2), (1, 0), (1, 1))
PRED_4x4 = mask((4, 4), (0, 0), (0, 1), (0, 2), (3, 3))


def test_ratio_metrics_on_a_hand_made_4x4_example() -> None:
    m = image_metrics(PRED_4x4.astype(np.uint8) * 255, TRUTH_4x4.astype(np.uint8) * 255)  # {0,255} masks
    assert (m["tp"], m["fp"], m["fn"], m["tn"]) == (3, 1, 2, 10)
    assert (m["truth_size"], m["pred_size"]) == (5, 4)
    assert m["dice"] == pytest.approx(6 / 9)
    assert m["f1"] == pytest.approx(6 / 9)
    assert m["iou"] == pytest.approx(3 / 6)
    assert m["precision"] == pytest.approx(3 / 4)
    assert m["recall"] == pytest.approx(3 / 5)
    assert m["specificity"] == pytest.approx(10 / 11)
    assert m["accuracy"] == pytest.approx(13 / 16)
    assert m["missed"] is False
    # torch, bool and {0,1} float inputs give the same numbers
    m_torch = image_metrics(torch.from_numpy(PRED_4x4), torch.from_numpy(TRUTH_4x4.astype(np.float32)))
    keys = ("tp", "fp", "fn", "tn", "dice", "hd95", "asd")
    assert {k: m_torch[k] for k in keys} == {k: m[k] for k in keys}


def test_both_empty_scores_perfectly() -> None:
    m = image_metrics(np.zeros((5, 6), np.uint8), np.zeros((5, 6), np.uint8))
    assert (m["tp"], m["fp"], m["fn"], m["tn"]) == (0, 0, 0, 30)
    for key in ("dice", "iou", "precision", "recall", "f1", "specificity", "accuracy"):
        assert m[key] == 1.0, key
    assert (m["hd95"], m["asd"], m["missed"]) == (0.0, 0.0, False)


def test_empty_truth_with_a_prediction() -> None:
    m = image_metrics(mask((4, 4), (1, 1), (2, 2)), np.zeros((4, 4), bool))
    assert (m["dice"], m["iou"], m["precision"], m["f1"]) == (0.0, 0.0, 0.0, 0.0)
    assert math.isnan(m["recall"])
    assert m["specificity"] == pytest.approx(14 / 16)
    assert math.isnan(m["hd95"]) and math.isnan(m["asd"])
    assert m["missed"] is False


def test_empty_prediction_on_a_tumour_is_missed() -> None:
    m = image_metrics(np.zeros((4, 4), bool), mask((4, 4), (1, 1), (1, 2), (2, 2)))
    assert (m["dice"], m["iou"], m["recall"]) == (0.0, 0.0, 0.0)
    assert math.isnan(m["precision"])
    assert m["specificity"] == 1.0
    assert m["accuracy"] == pytest.approx(13 / 16)
    assert math.isnan(m["hd95"]) and math.isnan(m["asd"])
    assert m["missed"] is True


def test_specificity_is_undefined_without_background() -> None:
    full = np.ones((3, 3), bool)
    m = image_metrics(full, full)
    assert m["dice"] == 1.0 and math.isnan(m["specificity"])


def test_confusion_counts_agree_with_monai() -> None:
    rng = np.random.default_rng(3)
    pred, truth = rng.random((2, 9, 7, 5)) > 0.6
    c = Confusion.from_masks(pred, truth)
    as_batch = [torch.as_tensor(x)[None, None].float() for x in (pred, truth)]
    tp, fp, tn, fn = get_confusion_matrix(*as_batch)[0, 0]
    assert (c.tp, c.fp, c.tn, c.fn) == (int(tp), int(fp), int(tn), int(fn))
    assert c.tp + c.fp + c.fn + c.tn == pred.size


def test_distance_between_two_voxels_along_an_anisotropic_axis() -> None:
    for k in (1, 2, 5):
        pred, truth = mask((4, 4, 8), (2, 1, 1)), mask((4, 4, 8), (2, 1, 1 + k))
        m = image_metrics(pred, truth, spacing=(0.7, 1.0, 2.5))
        assert m["hd95"] == pytest.approx(2.5 * k)
        assert m["asd"] == pytest.approx(2.5 * k)
    # along x with the x spacing, and a single number is isotropic
    m = image_metrics(mask((6, 3), (0, 1)), mask((6, 3), (4, 1)), spacing=(0.5, 3.0))
    assert m["hd95"] == pytest.approx(2.0)
    assert image_metrics(mask((6, 3), (0, 1)), mask((6, 3), (4, 1)), spacing=2.0)["hd95"] == pytest.approx(8.0)


def test_hd95_and_asd_by_hand_on_a_line_and_a_point() -> None:
    # truth: one pixel; prediction: a line of 3 pixels along y through it; y spacing 2 mm.
    # pred->truth distances [2, 0, 2], truth->pred [0]: HD95 = max(P95([0, 2, 2]), 0) = 2;
    # symmetric ASD = mean([2, 0, 2, 0]) = 1 (the mean of the two directed means would be 2/3)
    pred, truth = mask((5, 5), (2, 1), (2, 2), (2, 3)), mask((5, 5), (2, 2))
    m = image_metrics(pred, truth, spacing=(1.0, 2.0))
    assert m["hd95"] == pytest.approx(2.0)
    assert m["asd"] == pytest.approx(1.0)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("spacing", [(0.8, 1.0, 2.5), (1.0, 0.45, 0.45)])
def test_distances_match_a_brute_force_computation_3d(seed: int, spacing: tuple[float, ...]) -> None:
    rng = np.random.default_rng(seed)
    x, y, z = np.mgrid[:14, :12, :9]
    truth = ((x - 6) / 4.5) ** 2 + ((y - 6) / 3.5) ** 2 + ((z - 4) / 3) ** 2 <= 1
    pred = ((x - 7) / 4) ** 2 + ((y - 5) / 4) ** 2 + ((z - 4) / 2.5) ** 2 <= 1
    pred ^= rng.random(pred.shape) > 0.97  # scattered errors: holes and outliers
    m = image_metrics(pred, truth, spacing=spacing)
    hd95, asd = brute_force_distances(pred, truth, spacing)
    assert m["hd95"] == pytest.approx(hd95, rel=1e-4)
    assert m["asd"] == pytest.approx(asd, rel=1e-4)


def test_distances_match_a_brute_force_computation_2d_touching_the_border() -> None:
    rng = np.random.default_rng(7)
    pred, truth = rng.random((2, 10, 13)) > 0.55  # ragged shapes that touch the image border
    m = image_metrics(pred, truth, spacing=(1.5, 0.5))
    hd95, asd = brute_force_distances(pred, truth, (1.5, 0.5))
    assert m["hd95"] == pytest.approx(hd95, rel=1e-4)
    assert m["asd"] == pytest.approx(asd, rel=1e-4)


def test_bad_inputs_are_refused_with_the_reason() -> None:
    with pytest.raises(InputError, match="differs from truth shape"):
        image_metrics(np.zeros((4, 4)), np.zeros((4, 5)))
    with pytest.raises(ValueError, match="spacing must be one or 2 positive numbers"):
        image_metrics(np.zeros((4, 4)), np.zeros((4, 4)), spacing=(1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="spacing must be"):
        image_metrics(np.zeros((4, 4)), np.zeros((4, 4)), spacing=(1.0, 0.0))
    with pytest.raises(ValueError, match="pred must be a binary mask"):
        image_metrics(np.full((4, 4), 0.7), np.zeros((4, 4)))
    with pytest.raises(ValueError, match="2D or 3D"):
        image_metrics(np.zeros(4), np.zeros(4))
    with pytest.raises(ValueError, match="name must be one of"):
        Confusion().ratio("sensitivity")


# Two patients of 4x4 slices; Dice per slice in the comments.
A_TRUTH = [mask((4, 4), (0, 0), (0, 1), (1, 0), (1, 1)), mask((4, 4), (3, 0), (3, 1)), mask((4, 4))]
A_PRED = [mask((4, 4), (0, 0), (0, 1), (1, 0), (1, 1)), mask((4, 4)), mask((4, 4))]  # 1, 0 (missed), 1 (both empty)
B_TRUTH = [mask((4, 4), (2, 0), (2, 1), (2, 2)), mask((4, 4))]
B_PRED = [mask((4, 4), (2, 2), (3, 2), (3, 3)), mask((4, 4), (0, 3))]  # 1/3 (TP1 FP2 FN2), 0 (one false positive)


def test_patient_dice_is_the_dice_of_the_stacked_volume_not_the_mean_of_slices() -> None:
    slice_dice = [image_metrics(p, t)["dice"] for p, t in zip(A_PRED, A_TRUTH)]
    assert slice_dice == [1.0, 0.0, 1.0]
    m = patient_metrics(A_PRED, A_TRUTH)
    # sum(2TP) / (sum|P| + sum|T|) = 2*4 / (4 + 6)
    assert m["dice"] == pytest.approx(0.8)
    assert m["dice"] != pytest.approx(np.mean(slice_dice))  # 2/3
    assert m["dice"] == pytest.approx(image_metrics(np.stack(A_PRED, -1), np.stack(A_TRUTH, -1))["dice"])
    assert (m["tp"], m["fp"], m["fn"], m["slices"], m["slices_with_tumour"]) == (4, 0, 2, 3, 2)
    assert patient_metrics(B_PRED, B_TRUTH)["dice"] == pytest.approx(2 / 7)  # TP1, FP3, FN2
    # one 3D volume is the same patient as its slices
    assert patient_metrics(np.stack(A_PRED, -1), torch.from_numpy(np.stack(A_TRUTH, -1))) == m


def test_patient_distances_use_the_slice_spacing() -> None:
    truth = [mask((3, 3), (1, 1)), mask((3, 3)), mask((3, 3))]
    pred = [mask((3, 3)), mask((3, 3)), mask((3, 3), (1, 1))]
    assert patient_metrics(pred, truth)["hd95"] == pytest.approx(2.0)  # LGG default: (1, 1, 1)
    m = patient_metrics(pred, truth, spacing=(0.5, 0.5, 3.0))
    assert (m["hd95"], m["asd"]) == (pytest.approx(6.0), pytest.approx(6.0))


def test_patient_inputs_are_checked() -> None:
    with pytest.raises(InputError, match="differs from truth shape"):
        patient_metrics(A_PRED[:2], A_TRUTH)
    with pytest.raises(InputError, match="2D slices of one shape"):
        patient_metrics([mask((4, 4)), mask((4, 5))], [mask((4, 4)), mask((4, 5))])
    with pytest.raises(ValueError, match="2D slices or one 3D volume"):
        patient_metrics(A_PRED[0], A_TRUTH[0])
    with pytest.raises(ValueError, match="spacing must be one or 3"):
        patient_metrics(A_PRED, A_TRUTH, spacing=(1.0, 1.0))


def test_pooled_confusion_is_the_sum() -> None:
    confusions = [Confusion.from_masks(p, t) for p, t in zip(A_PRED + B_PRED, A_TRUTH + B_TRUTH)]
    total = sum(confusions, Confusion())
    assert total == Confusion(tp=5, fp=3, fn=4, tn=68)
    assert Confusion(1, 2, 3, 4) + Confusion(10, 20, 30, 40) == Confusion(11, 22, 33, 44)
    pooled = pooled_metrics(confusions)
    assert pooled["pooled_over"] == 5
    assert (pooled["tp"], pooled["fp"], pooled["fn"], pooled["tn"]) == (5, 3, 4, 68)
    assert pooled["dice"] == pytest.approx(10 / 17)
    assert pooled["precision"] == pytest.approx(5 / 8)
    # the dicts image_metrics returns pool the same way
    assert pooled_metrics([image_metrics(p, t) for p, t in zip(A_PRED + B_PRED, A_TRUTH + B_TRUTH)]) == pooled
    with pytest.raises(ValueError, match="at least one"):
        pooled_metrics([])


def test_tumour_free_slices_and_their_false_positives() -> None:
    records = [image_metrics(p, t) for p, t in zip(A_PRED + B_PRED, A_TRUTH + B_TRUTH)]
    records.append(image_metrics(mask((4, 4), (0, 0), (1, 1), (2, 2)), mask((4, 4))))  # 3 FP pixels
    assert tumour_free_metrics(records) == {
        "tumour_free": 3, "with_false_positive": 2, "false_positive_rate": pytest.approx(2 / 3),
        "false_positive_pixels": 4,
    }  # fmt: skip
    assert math.isnan(tumour_free_metrics(records[:2])["false_positive_rate"])


def test_detection_sensitivity_and_specificity() -> None:
    # (truth_size, pred_size): 3 with tumour (2 found), 4 without (1 false alarm)
    sizes = [(10, 8), (5, 0), (40, 1), (0, 0), (0, 3), (0, 0), (0, 0)]
    d = detection_metrics([{"truth_size": t, "pred_size": p} for t, p in sizes])
    assert (d["tp"], d["fn"], d["fp"], d["tn"]) == (2, 1, 1, 3)
    assert (d["n"], d["with_tumour"], d["tumour_free"]) == (7, 3, 4)
    assert d["sensitivity"] == pytest.approx(2 / 3)
    assert d["specificity"] == pytest.approx(3 / 4)
    only_tumours = detection_metrics([{"truth_size": 4, "pred_size": 1}])
    assert only_tumours["sensitivity"] == 1.0 and math.isnan(only_tumours["specificity"])


def test_size_bins() -> None:
    records = [
        {"truth_size": 50, "dice": 0.5, "recall": 0.4, "missed": False},
        {"truth_size": 100, "dice": 0.7, "recall": 0.6, "missed": False},
        {"truth_size": 101, "dice": 0.0, "recall": 0.0, "missed": True},
        {"truth_size": 3000, "dice": 0.9, "recall": 0.95, "missed": False},
        {"truth_size": 0, "dice": 0.0, "recall": math.nan, "missed": False},  # tumour-free: in no bin
    ]
    bins = size_bins(records)
    assert [b["label"] for b in bins] == ["1-100", "101-500", "501-2000", ">2000"]
    assert [b["n"] for b in bins] == [2, 1, 0, 1]
    assert bins[0]["dice_mean"] == pytest.approx(0.6) and bins[0]["recall_mean"] == pytest.approx(0.5)
    assert (bins[1]["dice_mean"], bins[1]["missed"]) == (0.0, 1)
    assert math.isnan(bins[2]["dice_mean"])
    assert bins[3]["recall_median"] == pytest.approx(0.95)
    assert [b["n"] for b in size_bins(records, edges=(0, 100, math.inf))] == [2, 2]
    with pytest.raises(ValueError, match="edges must be"):
        size_bins(records, edges=(0, 500, 100))


def test_describe_ignores_nan_and_counts() -> None:
    d = describe([1.0, math.nan, 3.0, 2.0])
    assert (d["mean"], d["median"], d["min"], d["max"], d["n"], d["undefined"]) == (2.0, 2.0, 1.0, 3.0, 3, 1)
    assert d["std"] == pytest.approx(1.0)  # sample standard deviation
    empty = describe([math.nan])
    assert math.isnan(empty["mean"]) and (empty["n"], empty["undefined"]) == (0, 1)


def test_summary_of_a_constructed_evaluation() -> None:
    per_image = [image_metrics(p, t) for p, t in zip(A_PRED + B_PRED, A_TRUTH + B_TRUTH)]
    per_patient = [patient_metrics(A_PRED, A_TRUTH), patient_metrics(B_PRED, B_TRUTH)]
    s = summarise(per_image, per_patient)
    assert (s["patients"], s["images"], s["tumour_images"]) == (2, 5, 3)
    assert s["patient_dice_mean"] == pytest.approx((0.8 + 2 / 7) / 2)
    assert s["patient_dice_median"] == pytest.approx((0.8 + 2 / 7) / 2)
    assert s["patient_dice_std"] == pytest.approx((0.8 - 2 / 7) / math.sqrt(2))
    assert s["patient_dice_min"] == pytest.approx(2 / 7)
    assert s["patient_dice_n"] == 2
    assert s["image_dice_mean"] == pytest.approx((1 + 0 + 1 / 3) / 3)  # tumour slices only
    assert s["image_dice_n"] == 3
    assert s["global_dice"] == pytest.approx(10 / 17)  # TP 5, FP 3, FN 4
    assert s["confusion"] == {"tp": 5, "fp": 3, "fn": 4, "tn": 68}
    assert s["patient_hd95_n"] == 2 and s["patient_hd95_mean"] == pytest.approx(
        (per_patient[0]["hd95"] + per_patient[1]["hd95"]) / 2
    )
    assert (s["image_hd95_n"], s["image_hd95_undefined"]) == (2, 1)  # the missed slice has no distance
    assert (s["images_missed"], s["patients_missed"]) == (1, 0)
    assert s["tumour_free"]["tumour_free"] == 2 and s["tumour_free"]["with_false_positive"] == 1
    assert s["detection"]["image"]["sensitivity"] == pytest.approx(2 / 3)
    assert s["detection"]["image"]["specificity"] == pytest.approx(1 / 2)
    assert s["detection"]["patient"]["sensitivity"] == 1.0
    assert [b["n"] for b in s["size_bins"]] == [3, 0, 0, 0]
    with pytest.raises(ValueError, match="neither"):
        summarise([], [])


def test_threshold_grid_rounds_sorts_and_refuses_bad_thresholds() -> None:
    grid = threshold_grid(np.arange(1, 20) * 0.05)
    assert grid == pytest.approx(np.arange(1, 20) * 0.05)
    assert grid[2] == 0.15  # rounded, not 0.15000000000000002
    assert list(threshold_grid([0.6, 0.4, 0.4000000001])) == [0.4, 0.6]
    assert np.array_equal(threshold_grid(DEFAULT_THRESHOLDS), DEFAULT_THRESHOLDS)
    for bad in ([0.0, 0.5], [0.5, 1.0], []):
        with pytest.raises(ValueError, match="thresholds must be numbers in \\(0, 1\\)"):
            threshold_grid(bad)


def test_best_on_curve_prefers_the_middle_then_the_lower_threshold() -> None:
    # every threshold in (0.38, 0.62] is perfect: the one closest to 0.5 wins
    assert best_on_curve([(0.35, 0.7), (0.4, 1.0), (0.5, 1.0), (0.6, 1.0), (0.65, 0.0)]) == 0.5
    # an off-centre best
    assert best_on_curve([(0.35, 16 / 20), (0.4, 1.0), (0.45, 12 / 14), (0.5, 0.8)]) == 0.4
    # 0.4 and 0.6 tie and are equally close to 0.5: the lower wins
    assert best_on_curve([(0.4, 1.0), (0.6, 1.0)]) == 0.4
