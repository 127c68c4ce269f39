"""Scoring ``brainseg infer`` outputs against truth: predictions are perturbed truth masks written in the infer layout,
and per-patient Dice is checked against an independent computation (sum of intersections over sum of sizes)."""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import tifffile
from PIL import Image
from scipy.ndimage import binary_dilation, binary_erosion

from brainseg_monai.datalist import build_datalist, write_datalist
from brainseg_monai.errors import InputError
from brainseg_monai.evaluation import MISSING_POLICY, aggregate_folds, evaluate_predictions, write_metrics_json
from brainseg_monai.inference.writers import write_png_mask
from brainseg_monai.metrics import patient_metrics
from brainseg_monai.synth import make_dataset
from conftest import shared_path

Perturb = Callable[[int, int, np.ndarray], np.ndarray]


@pytest.fixture(scope="module")
def lgg_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("lgg") / "lgg", "lgg", cases=3, seed=3, size=(32, 32, 6))


def _slices(patient_dir: Path) -> list[tuple[Path, Path]]:
    """(image, mask) of an LGG patient folder in slice-number order."""
    images = [p for p in patient_dir.glob("*.tif") if not p.stem.endswith("_mask")]
    images.sort(key=lambda p: int(p.stem.rsplit("_", 1)[1]))
    return [(p, p.with_name(f"{p.stem}_mask.tif")) for p in images]


def perturb(patient: int, z: int, rows: np.ndarray) -> np.ndarray:
    """Patient 0 dilated, 1 shifted, 2 eroded with a false-positive square on its first slice."""
    if patient == 0:
        return binary_dilation(rows)
    if patient == 1:
        return np.roll(rows, 2, axis=1)
    out = binary_erosion(rows)
    if z == 0:
        out[2:5, 2:5] = True
    return out


def write_lgg_predictions(root: Path, pred: Path, change: Perturb) -> dict[str, list[tuple[np.ndarray, np.ndarray]]]:
    """Write ``pred/<patient>/<stem>_pred.png`` from the truth masks; returns patient -> (truth, prediction) in file
    row order, read independently of the code under test (tifffile)."""
    pairs: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {}
    for index, folder in enumerate(sorted(p for p in root.iterdir() if p.is_dir())):
        for z, (image, mask) in enumerate(_slices(folder)):
            truth = tifffile.imread(mask) > 0
            predicted = change(index, z, truth)
            write_png_mask(predicted.T.astype(np.uint8), pred / folder.name / f"{image.stem}_pred.png")
            pairs.setdefault(folder.name, []).append((truth, predicted))
    return pairs


def stacked_dice(pairs: list[tuple[np.ndarray, np.ndarray]]) -> float:
    intersection = sum(int(np.count_nonzero(t & p)) for t, p in pairs)
    sizes = sum(int(np.count_nonzero(t)) + int(np.count_nonzero(p)) for t, p in pairs)
    return 1.0 if sizes == 0 else 2.0 * intersection / sizes  # both empty: Dice 1


def mean_slice_dice(pairs: list[tuple[np.ndarray, np.ndarray]]) -> float:
    values = [2.0 * np.count_nonzero(t & p) / (np.count_nonzero(t) + np.count_nonzero(p))
              for t, p in pairs if t.any() or p.any()]
    return float(np.mean(values))


def test_lgg_per_patient_dice_is_the_stacked_dice(lgg_root: Path, tmp_path: Path) -> None:
    pairs = write_lgg_predictions(lgg_root, tmp_path / "pred", perturb)
    result = evaluate_predictions(tmp_path / "pred", lgg_root, "lgg")

    assert [p["patient"] for p in result["per_patient"]] == sorted(pairs)
    for record in result["per_patient"]:
        expected = stacked_dice(pairs[record["patient"]])
        assert record["dice"] == pytest.approx(expected, abs=1e-6)
        assert abs(record["dice"] - mean_slice_dice(pairs[record["patient"]])) > 1e-3
        assert record["slices"] == 6 and record["stacked"] and record["missing_predictions"] == 0
    # per image: the slices in number order, each scored on its own
    first = [r for r in result["per_image"] if r["patient"] == "SYN_0001"]
    assert [Path(r["image"]).name for r in first] == [f"SYN_0001_{n}.tif" for n in range(1, 7)]
    for record, (truth, predicted) in zip(first, pairs["SYN_0001"]):
        assert record["truth_size"] == np.count_nonzero(truth)
        assert record["pred_size"] == np.count_nonzero(predicted)
    summary = result["summary"]
    assert summary["patients"] == 3 and summary["images"] == 18 and summary["missing_predictions"] == 0
    assert summary["patient_dice_mean"] == pytest.approx(np.mean([stacked_dice(v) for v in pairs.values()]), abs=1e-9)
    everything = [pair for v in pairs.values() for pair in v]
    assert summary["global_dice"] == pytest.approx(stacked_dice(everything), abs=1e-9)
    assert summary["tumour_free"]["with_false_positive"] == 1  # the square on patient 2's tumour-free first slice
    assert result["settings"]["distance_unit"] == "pixel" and result["settings"]["missing_policy"] == MISSING_POLICY

    # JSON: strict (undefined values are null), and the same numbers come back
    path = write_metrics_json(result, tmp_path / "out" / "metrics.json")

    def refuse(name: str) -> None:
        raise AssertionError(f"non-standard JSON constant {name}")

    loaded = json.loads(path.read_text(), parse_constant=refuse)
    assert loaded["per_patient"][0]["dice"] == result["per_patient"][0]["dice"]
    false_alarm = loaded["per_image"][12]  # SYN_0003_1: tumour-free, the square predicted: recall and HD95 undefined
    assert false_alarm["truth_size"] == 0 and false_alarm["pred_size"] == 9
    assert false_alarm["recall"] is None and false_alarm["hd95"] is None and false_alarm["dice"] == 0.0


def test_missing_prediction_is_refused_unless_allowed_then_scored_empty(lgg_root: Path, tmp_path: Path) -> None:
    pairs = write_lgg_predictions(lgg_root, tmp_path / "pred", lambda i, z, m: m)
    # remove the prediction of SYN_0002's slice with the most tumour
    sizes = [np.count_nonzero(t) for t, _ in pairs["SYN_0002"]]
    z = int(np.argmax(sizes))
    gone = tmp_path / "pred" / "SYN_0002" / f"SYN_0002_{z + 1}_pred.png"
    gone.unlink()
    pairs["SYN_0002"][z] = (pairs["SYN_0002"][z][0], np.zeros_like(pairs["SYN_0002"][z][0]))

    with pytest.raises(InputError) as error:
        evaluate_predictions(tmp_path / "pred", lgg_root, "lgg")
    message = str(error.value)
    assert message.startswith(f"{tmp_path / 'pred'}: 1 of 18 truth items have no prediction")
    assert f"SYN_0002/SYN_0002_{z + 1}_pred.png" in message and "--allow-missing" in message

    result = evaluate_predictions(tmp_path / "pred", lgg_root, "lgg", allow_missing=True)
    assert result["summary"]["missing_predictions"] == 1 and result["settings"]["allow_missing"]
    assert result["missing"] == [{"patient": "SYN_0002", "image": str(lgg_root / "SYN_0002" / f"SYN_0002_{z + 1}.tif"),
                                  "label": str(lgg_root / "SYN_0002" / f"SYN_0002_{z + 1}_mask.tif"),
                                  "expected": str(gone)}]
    record = next(r for r in result["per_image"] if r["prediction"] is None)
    assert record["pred_size"] == 0 and record["missed"] and record["truth_size"] == sizes[z]
    patient = next(p for p in result["per_patient"] if p["patient"] == "SYN_0002")
    assert patient["missing_predictions"] == 1
    assert patient["dice"] == pytest.approx(stacked_dice(pairs["SYN_0002"]), abs=1e-6)
    assert patient["dice"] < 1.0
    assert all(p["dice"] == 1.0 for p in result["per_patient"] if p["patient"] != "SYN_0002")


def test_deleting_a_false_positive_prediction_cannot_raise_the_score_by_default(lgg_root: Path, tmp_path: Path) -> None:
    pairs = write_lgg_predictions(lgg_root, tmp_path / "pred", perturb)
    truth, predicted = pairs["SYN_0003"][0]
    assert not truth.any() and predicted.sum() == 9  # the tumour-free slice with the false-positive square
    (tmp_path / "pred" / "SYN_0003" / "SYN_0003_1_pred.png").unlink()
    with pytest.raises(InputError, match=r"1 of 18 truth items have no prediction here \(expected "
                                         r"SYN_0003/SYN_0003_1_pred.png\)"):
        evaluate_predictions(tmp_path / "pred", lgg_root, "lgg")
    # allowed, the empty prediction is perfect on that slice: the very reason it is refused by default
    allowed = evaluate_predictions(tmp_path / "pred", lgg_root, "lgg", allow_missing=True)
    patient = next(p for p in allowed["per_patient"] if p["patient"] == "SYN_0003")
    with_square = stacked_dice(pairs["SYN_0003"])
    without = stacked_dice([(truth, np.zeros_like(truth)), *pairs["SYN_0003"][1:]])
    assert patient["dice"] == pytest.approx(without, abs=1e-9) and without > with_square
    assert allowed["summary"]["tumour_free"]["with_false_positive"] == 0


def test_command_line_refuses_missing_predictions_unless_allowed(
    lgg_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from brainseg_monai.cli import main

    write_lgg_predictions(lgg_root, tmp_path / "pred", lambda i, z, m: m)
    (tmp_path / "pred" / "SYN_0001" / "SYN_0001_2_pred.png").unlink()
    args = ["evaluate", str(tmp_path / "pred"), "--truth", str(lgg_root), "--source", "lgg", "--n-worst", "0"]
    assert main([*args, "--out", str(tmp_path / "refused")]) == 2
    assert "1 of 18 truth items have no prediction" in capsys.readouterr().err
    assert not (tmp_path / "refused").exists()
    assert main([*args, "--out", str(tmp_path / "report"), "--allow-missing"]) == 0
    assert "missing predictions 1" in capsys.readouterr().out
    assert json.loads((tmp_path / "report" / "metrics.json").read_text())["settings"]["allow_missing"] is True


def test_wrong_size_prediction_names_both_files(lgg_root: Path, tmp_path: Path) -> None:
    write_lgg_predictions(lgg_root, tmp_path / "pred", lambda i, z, m: m)
    wrong = tmp_path / "pred" / "SYN_0003" / "SYN_0003_2_pred.png"
    write_png_mask(np.zeros((16, 32), dtype=np.uint8), wrong)
    with pytest.raises(InputError) as error:
        evaluate_predictions(tmp_path / "pred", lgg_root, "lgg")
    assert str(wrong) in str(error.value) and str(lgg_root / "SYN_0003" / "SYN_0003_2_mask.tif") in str(error.value)
    assert "(16, 32)" in str(error.value) and "(32, 32)" in str(error.value)


def test_datalist_json_split_fold_and_item_list(lgg_root: Path, tmp_path: Path) -> None:
    pairs = write_lgg_predictions(lgg_root, tmp_path / "pred", perturb)
    folds = write_datalist(build_datalist("lgg", lgg_root, folds=3, seed=0), tmp_path / "folds.json")
    fold_patients = {}
    for k in range(3):
        result = evaluate_predictions(tmp_path / "pred", folds, fold=k)
        assert len(result["per_patient"]) == 1 and result["summary"]["images"] == 6
        patient = result["per_patient"][0]
        assert patient["dice"] == pytest.approx(stacked_dice(pairs[patient["patient"]]), abs=1e-6)
        assert result["settings"]["fold"] == k and result["summary"]["unmatched_predictions"] == 12
        fold_patients[k] = patient["patient"]
    assert sorted(fold_patients.values()) == sorted(pairs)
    with pytest.raises(InputError, match="3 folds"):
        evaluate_predictions(tmp_path / "pred", folds)  # the validation list of a folds datalist is empty

    split = write_datalist(build_datalist("lgg", lgg_root, val=0.34, seed=1), tmp_path / "split.json")
    validation = {it["patient"] for it in json.loads(split.read_text())["validation"]}
    result = evaluate_predictions(tmp_path / "pred", split)
    assert {p["patient"] for p in result["per_patient"]} == validation
    assert evaluate_predictions(tmp_path / "pred", split, split="all")["summary"]["patients"] == 3

    items = [it for it in json.loads(split.read_text())["training"] if it["patient"] == "SYN_0003"]
    (tmp_path / "items.json").write_text(json.dumps(items))
    result = evaluate_predictions(tmp_path / "pred", tmp_path / "items.json")
    assert result["per_patient"][0]["dice"] == pytest.approx(stacked_dice(pairs["SYN_0003"]), abs=1e-6)


def test_pairs_predictions_in_any_case_folder_and_ambiguity(tmp_path: Path) -> None:
    root = make_dataset(tmp_path / "pairs", "pairs", cases=2, seed=4, size=(32, 32, 4))
    pred = tmp_path / "pred"
    for mask in sorted((root / "masks").iterdir()):
        truth = np.asarray(Image.open(mask)) > 0
        if mask.stem == "SYN_0001_01":  # one image predicted on its own: case = its stem
            write_png_mask(truth.T.astype(np.uint8), pred / mask.stem / f"{mask.stem}_pred.png")
        else:  # the rest predicted as the folder images/: case = "images"
            write_png_mask(truth.T.astype(np.uint8), pred / "images" / f"{mask.stem}_pred.png")
    result = evaluate_predictions(pred, root)  # source recognised from the layout
    assert result["settings"]["source"] == "pairs"
    assert [p["patient"] for p in result["per_patient"]] == ["SYN_0001", "SYN_0002"]
    assert all(p["dice"] == 1.0 and p["images"] == 4 for p in result["per_patient"])
    assert result["summary"]["missing_predictions"] == 0

    shutil.copy(pred / "images" / "SYN_0002_03_pred.png", pred / "SYN_0001_01" / "SYN_0002_03_pred.png")
    with pytest.raises(InputError, match="SYN_0002_03_pred.png .* several case folders"):
        evaluate_predictions(pred, root)


def test_pairs_group_that_is_no_patient_is_pooled_not_stacked(tmp_path: Path) -> None:
    # figshare's layout: no pid, so each image's patient is its cv_fold group; here cvfold1 holds SYN_0001 and SYN_0006
    root = make_dataset(tmp_path / "pairs", "pairs", cases=6, seed=4, size=(32, 32, 4))
    table = (root / "cases.csv").read_text().splitlines()
    (root / "cases.csv").write_text("\n".join([table[0]] + [re.sub(r"^([^,]*),[^,]*,", r"\1,,", row)
                                                          for row in table[1:]]) + "\n")
    pairs: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {}
    for index, mask in enumerate(sorted((root / "masks").iterdir())):
        truth = np.asarray(Image.open(mask)) > 0
        shifted = np.roll(truth, 2, axis=1)
        write_png_mask(shifted.T.astype(np.uint8), tmp_path / "pred" / "images" / f"{mask.stem}_pred.png")
        group = f"cvfold{int(mask.stem.split('_')[1]) % 5 or 5}"  # SYN_000k is case k - 1, cv_fold (k - 1) % 5 + 1
        pairs.setdefault(group, []).append((truth, shifted))

    result = evaluate_predictions(tmp_path / "pred", root, "pairs")
    assert sorted(p["patient"] for p in result["per_patient"]) == [f"cvfold{k}" for k in range(1, 6)]
    for record in result["per_patient"]:
        assert not record["stacked"] and record["hd95"] is None and record["asd"] is None and record["spacing"] is None
        assert record["dice"] == pytest.approx(stacked_dice(pairs[record["patient"]]), abs=1e-9)
    assert next(p for p in result["per_patient"] if p["patient"] == "cvfold1")["images"] == 8
    assert result["summary"]["patients_pooled"] == 5 and result["summary"]["patient_hd95_n"] == 0
    assert all(r["hd95"] is not None for r in result["per_image"] if r["truth_size"])  # per image they are defined
    assert "cvfold<k>" in result["settings"]["patient_definition"]

    # with patient ids, each patient's numbered slices SYN_000k_<n> are one stacked volume again
    (root / "cases.csv").write_text("\n".join(table) + "\n")
    stacked = evaluate_predictions(tmp_path / "pred", root, "pairs")
    assert all(p["stacked"] and p["hd95"] is not None for p in stacked["per_patient"])
    assert stacked["summary"]["patients_pooled"] == 0


def test_spacing_of_2d_images_needs_the_slice_spacing_for_patient_distances(lgg_root: Path, tmp_path: Path) -> None:
    pairs = write_lgg_predictions(lgg_root, tmp_path / "pred", perturb)
    volumes = {patient: ([p.T for _, p in v], [t.T for t, _ in v]) for patient, v in pairs.items()}  # (x, y) order

    pixels = evaluate_predictions(tmp_path / "pred", lgg_root, "lgg")
    assert pixels["settings"]["distance_unit"] == "pixel" and pixels["settings"]["spacing"] is None
    assert pixels["settings"]["image_spacing"] == [1, 1] and pixels["settings"]["patient_spacing"] == [1, 1, 1]
    in_plane = evaluate_predictions(tmp_path / "pred", lgg_root, "lgg", spacing=0.5)
    assert in_plane["settings"]["distance_unit"] == "mm" and in_plane["settings"]["spacing"] == [0.5]
    assert in_plane["settings"]["image_spacing"] == [0.5, 0.5] and in_plane["settings"]["patient_spacing"] is None
    assert "give x y z" in in_plane["settings"]["distances"]
    full = evaluate_predictions(tmp_path / "pred", lgg_root, "lgg", spacing=(0.5, 0.5, 5.0))
    assert full["settings"]["patient_spacing"] == [0.5, 0.5, 5.0]
    for a, b, c in zip(pixels["per_patient"], in_plane["per_patient"], full["per_patient"]):
        preds, truths = volumes[a["patient"]]
        assert a["hd95"] == pytest.approx(patient_metrics(preds, truths, (1, 1, 1))["hd95"], abs=1e-9)
        # no slice spacing: a stack has no 3D distance rather than one with a made-up z
        assert b["stacked"] and b["hd95"] is None and b["asd"] is None and b["spacing"] is None
        assert b["dice"] == a["dice"] == c["dice"]
        assert c["hd95"] == pytest.approx(patient_metrics(preds, truths, (0.5, 0.5, 5.0))["hd95"], abs=1e-9)
        assert c["spacing"] == [0.5, 0.5, 5.0]
    for a, b in zip(pixels["per_image"], in_plane["per_image"]):  # slices: (x, y) only, halved
        assert (a["hd95"] is None and b["hd95"] is None) or b["hd95"] == pytest.approx(a["hd95"] / 2, abs=1e-9)

    # a patient of one image keeps its 2D distances
    one = [{"image": str(lgg_root / "SYN_0002" / f"SYN_0002_{n}.tif"),
            "label": str(lgg_root / "SYN_0002" / f"SYN_0002_{n}_mask.tif")} for n in range(3, 5)]
    (tmp_path / "items.json").write_text(json.dumps(one))
    single = evaluate_predictions(tmp_path / "pred", tmp_path / "items.json", spacing=(0.5, 0.5))
    for patient, image in zip(single["per_patient"], single["per_image"]):
        assert patient["patient"] == Path(image["image"]).stem and patient["spacing"] == [0.5, 0.5]
        assert patient["hd95"] == image["hd95"] is not None and patient["slices"] == 1


@pytest.fixture(scope="module")
def nifti_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("nifti") / "nifti", "nifti", cases=2, seed=5, size=(32, 32, 8))


def _write_volume_prediction(label: Path, path: Path, shift: int) -> tuple[np.ndarray, np.ndarray]:
    """Write the label shifted by ``shift`` slices on the label's grid; returns (truth, prediction) via nibabel."""
    truth_image = sitk.ReadImage(str(label))
    predicted = sitk.GetImageFromArray(np.roll(sitk.GetArrayFromImage(truth_image), shift, axis=0))
    predicted.CopyInformation(truth_image)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(predicted, str(path))
    return np.asarray(nib.load(label).dataobj) > 0, np.asarray(nib.load(path).dataobj) > 0


def test_nifti_volumes_dice_spacing_and_geometry(nifti_root: Path, tmp_path: Path) -> None:
    pred = tmp_path / "pred"
    volumes = {}
    for shift, case in zip((1, -1), sorted(p for p in nifti_root.iterdir() if p.is_dir())):
        label = case / f"{case.name}_seg.nii.gz"
        volumes[case.name] = _write_volume_prediction(label, pred / case.name / "mask.nii.gz", shift)
    result = evaluate_predictions(pred, nifti_root, "nifti")
    assert result["settings"]["kind"] == "volumes" and result["settings"]["distance_unit"] == "mm"
    for record in result["per_patient"]:
        truth, predicted = volumes[record["patient"]]
        assert record["dice"] == pytest.approx(stacked_dice([(truth, predicted)]), abs=1e-6)
        # distances use the file's spacing (1, 1, 1.5 mm), not voxels
        assert record["hd95"] == pytest.approx(patient_metrics(predicted, truth, spacing=(1, 1, 1.5))["hd95"], abs=1e-6)
        assert record["hd95"] != pytest.approx(patient_metrics(predicted, truth)["hd95"], abs=1e-3)
    slices = [r for r in result["per_image"] if r["patient"] == "SYN_0001"]
    assert [r["slice"] for r in slices] == list(range(8))
    assert all(Path(r["image"]).name == "SYN_0001_flair.nii.gz" for r in slices)  # the channel overlays show

    # a prediction on another grid names both files; a missing one lists where it was looked for
    moved = sitk.ReadImage(str(pred / "SYN_0002" / "mask.nii.gz"))
    moved.SetOrigin((5.0, 0.0, 0.0))
    sitk.WriteImage(moved, str(pred / "SYN_0002" / "mask.nii.gz"))
    with pytest.raises(InputError) as error:
        evaluate_predictions(pred, nifti_root, "nifti")
    assert str(pred / "SYN_0002" / "mask.nii.gz") in str(error.value) and "SYN_0002_seg.nii.gz" in str(error.value)
    assert "origin" in str(error.value)
    shutil.rmtree(pred / "SYN_0002")
    with pytest.raises(InputError, match=r"1 of 2 truth items have no prediction here \(expected SYN_0002/mask.nii.gz "):
        evaluate_predictions(pred, nifti_root, "nifti")
    result = evaluate_predictions(pred, nifti_root, "nifti", allow_missing=True)
    assert result["summary"]["missing_predictions"] == 1
    assert str(pred / "SYN_0002" / "mask.nii.gz") in result["missing"][0]["expected"]
    assert result["per_patient"][1]["dice"] == 0.0 and result["per_patient"][1]["missed"]


def test_dicom_studies_are_listed_with_their_labels(tmp_path: Path) -> None:
    root = make_dataset(tmp_path / "dicom", "dicom", cases=1, seed=12, size=(24, 24, 6))
    label = root / "SYN_0001" / "SYN_0001_seg.nii.gz"
    truth, predicted = _write_volume_prediction(label, tmp_path / "pred" / "SYN_0001" / "mask.nii.gz", 1)
    result = evaluate_predictions(tmp_path / "pred", root, "dicom")
    assert result["per_patient"][0]["dice"] == pytest.approx(stacked_dice([(truth, predicted)]), abs=1e-6)
    assert Path(result["per_image"][0]["image"]).name == "FLAIR"  # the series folder overlays show


def test_argument_errors(lgg_root: Path, tmp_path: Path) -> None:
    with pytest.raises(InputError, match="prediction folder does not exist"):
        evaluate_predictions(tmp_path / "nowhere", lgg_root)
    (tmp_path / "pred").mkdir()
    with pytest.raises(ValueError, match="source must be one of"):
        evaluate_predictions(tmp_path / "pred", lgg_root, "png")
    with pytest.raises(ValueError, match="spacing"):
        evaluate_predictions(tmp_path / "pred", lgg_root, spacing=(1, -1))
    with pytest.raises(ValueError, match="split and fold apply to a datalist"):
        evaluate_predictions(tmp_path / "pred", lgg_root, fold=0)
    with pytest.raises(ValueError, match="allow_missing must be a bool"):
        evaluate_predictions(tmp_path / "pred", lgg_root, allow_missing="yes")


@pytest.mark.realdata
def test_real_lgg_perfect_and_perturbed_predictions(tmp_path: Path) -> None:
    root = shared_path("lgg", "kaggle_3m")
    items = build_datalist("lgg", root, val=0.0, check=False)["training"]
    patients = sorted({it["patient"] for it in items})[:3]
    chosen = [it for it in items if it["patient"] in patients]
    (tmp_path / "items.json").write_text(json.dumps(chosen))
    pairs: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {}
    for it in chosen:
        truth = tifffile.imread(it["label"]) > 0
        name = f"{Path(it['image']).stem}_pred.png"
        write_png_mask(truth.T.astype(np.uint8), tmp_path / "perfect" / it["patient"] / name)
        shifted = np.roll(binary_dilation(truth, iterations=2), 3, axis=0)
        write_png_mask(shifted.T.astype(np.uint8), tmp_path / "shifted" / it["patient"] / name)
        pairs.setdefault(it["patient"], []).append((truth, shifted))

    perfect = evaluate_predictions(tmp_path / "perfect", tmp_path / "items.json")
    assert [p["patient"] for p in perfect["per_patient"]] == patients
    assert all(p["dice"] == 1.0 and p["hd95"] == 0.0 for p in perfect["per_patient"])
    assert perfect["summary"]["images"] == len(chosen) and perfect["summary"]["global_dice"] == 1.0

    shifted = evaluate_predictions(tmp_path / "shifted", tmp_path / "items.json")
    for record in shifted["per_patient"]:
        assert record["dice"] == pytest.approx(stacked_dice(pairs[record["patient"]]), abs=1e-6)
        assert abs(record["dice"] - mean_slice_dice(pairs[record["patient"]])) > 1e-3


def test_prediction_values_other_than_a_binary_mask_are_refused_unless_label_maps(
        lgg_root: Path, nifti_root: Path, tmp_path: Path) -> None:
    write_lgg_predictions(lgg_root, tmp_path / "pred", lambda i, z, m: m)
    odd = next(p for p in sorted((tmp_path / "pred" / "SYN_0002").glob("*_pred.png"))
               if np.asarray(Image.open(p)).any())
    tumour = np.asarray(Image.open(odd)) > 0
    labels = np.where(tumour, 77, 0).astype(np.uint8)
    labels[tumour & (np.indices(tumour.shape)[1] % 2 == 0)] = 3  # a label map: {0, 3, 77}, all of it tumour
    Image.fromarray(labels).save(odd)
    with pytest.raises(InputError) as error:
        evaluate_predictions(tmp_path / "pred", lgg_root, "lgg")
    assert str(error.value) == (
        f"{odd}: prediction mask holds the values 0, 3, 77 (3 distinct), not 0 and 1 (volumes) or 0 and 255 (PNG) as "
        f"brainseg infer writes them; is it a label map or a probability map? To count every non-zero value as "
        f"tumour, pass --label-maps (label_maps=True)")
    allowed = evaluate_predictions(tmp_path / "pred", lgg_root, "lgg", label_maps=True)
    assert all(p["dice"] == 1.0 for p in allowed["per_patient"]) and allowed["settings"]["label_maps"] is True
    with pytest.raises(ValueError, match="label_maps must be a bool"):
        evaluate_predictions(tmp_path / "pred", lgg_root, "lgg", label_maps="yes")

    # a volume: a probability map is refused too; 0/1 and 0/255 masks are taken
    case = nifti_root / "SYN_0001"
    truth = sitk.ReadImage(str(case / "SYN_0001_seg.nii.gz"))
    pred = tmp_path / "volumes"
    for name in ("SYN_0001", "SYN_0002"):
        _write_volume_prediction(nifti_root / name / f"{name}_seg.nii.gz", pred / name / "mask.nii.gz", 0)
    assert evaluate_predictions(pred, nifti_root, "nifti")["summary"]["patient_dice_mean"] == 1.0
    scaled = sitk.Cast(truth > 0, sitk.sitkUInt8) * 255
    sitk.WriteImage(scaled, str(pred / "SYN_0001" / "mask.nii.gz"))
    assert evaluate_predictions(pred, nifti_root, "nifti")["summary"]["patient_dice_mean"] == 1.0
    probability = sitk.Cast(truth > 0, sitk.sitkFloat32) * 0.9
    sitk.WriteImage(probability, str(pred / "SYN_0001" / "mask.nii.gz"))
    with pytest.raises(InputError, match=r"mask.nii.gz: prediction mask holds the values 0, 0.9 \(2 distinct\)"):
        evaluate_predictions(pred, nifti_root, "nifti")


def test_one_predicted_patient_against_the_dataset_root_or_its_own_folder(
    lgg_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """What the README's Evaluate section does after ``brainseg infer PATIENT``: the root as truth with
    --only-predicted (the other patients left out and counted), or the patient's folder as truth."""
    from brainseg_monai.cli import main

    pairs = write_lgg_predictions(lgg_root, tmp_path / "all", perturb)
    shutil.copytree(tmp_path / "all" / "SYN_0002", tmp_path / "pred" / "SYN_0002")
    expected = stacked_dice(pairs["SYN_0002"])

    with pytest.raises(InputError, match="12 of 18 truth items have no prediction here .*--only-predicted"):
        evaluate_predictions(tmp_path / "pred", lgg_root, "lgg")
    result = evaluate_predictions(tmp_path / "pred", lgg_root, only_predicted=True)
    assert [p["patient"] for p in result["per_patient"]] == ["SYN_0002"]
    assert result["per_patient"][0]["dice"] == pytest.approx(expected, abs=1e-6)
    assert result["left_out"] == [{"patient": "SYN_0001", "items": 6}, {"patient": "SYN_0003", "items": 6}]
    summary = result["summary"]
    assert (summary["left_out_patients"], summary["left_out_items"], summary["missing_predictions"]) == (2, 12, 0)
    assert result["settings"]["only_predicted"] is True and result["settings"]["items"] == 6

    alone = evaluate_predictions(tmp_path / "pred", lgg_root / "SYN_0002")  # source detected: one LGG patient
    assert alone["settings"]["source"] == "lgg" and [p["patient"] for p in alone["per_patient"]] == ["SYN_0002"]
    assert alone["per_patient"][0]["dice"] == pytest.approx(expected, abs=1e-6)
    assert alone["summary"]["left_out_patients"] == 0 and alone["left_out"] == []

    args = ["evaluate", str(tmp_path / "pred"), "--truth", str(lgg_root), "--n-worst", "0", "--only-predicted"]
    assert main([*args, "--out", str(tmp_path / "report")]) == 0
    out = capsys.readouterr().out
    assert out.startswith("1 patients: patient Dice mean") and "left out (--only-predicted): 2 patients (12 " in out
    stored = json.loads((tmp_path / "report" / "metrics.json").read_text())
    assert stored["summary"]["left_out_items"] == 12 and len(stored["left_out"]) == 2
    assert "Left out (--only-predicted): 2 patients" in (tmp_path / "report" / "report.md").read_text(encoding="utf-8")
    assert main(["evaluate", str(tmp_path / "pred"), "--truth", str(lgg_root / "SYN_0002"), "--n-worst", "0",
                 "--out", str(tmp_path / "report_patient")]) == 0


def test_only_predicted_still_refuses_a_patient_with_predictions_missing(lgg_root: Path, tmp_path: Path) -> None:
    """Leaving out a deleted slice's truth could raise a patient's score: only whole unpredicted patients leave."""
    write_lgg_predictions(lgg_root, tmp_path / "pred", perturb)
    shutil.rmtree(tmp_path / "pred" / "SYN_0001")
    (tmp_path / "pred" / "SYN_0003" / "SYN_0003_1_pred.png").unlink()
    with pytest.raises(InputError, match=r"1 of 12 truth items have no prediction here \(expected "
                                         r"SYN_0003/SYN_0003_1_pred.png\)"):
        evaluate_predictions(tmp_path / "pred", lgg_root, "lgg", only_predicted=True)
    result = evaluate_predictions(tmp_path / "pred", lgg_root, "lgg", only_predicted=True, allow_missing=True)
    assert result["summary"]["missing_predictions"] == 1 and result["left_out"] == [{"patient": "SYN_0001",
                                                                                     "items": 6}]
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputError, match="no truth item of .* has a prediction here"):
        evaluate_predictions(empty, lgg_root, "lgg", only_predicted=True)
    with pytest.raises(ValueError, match="only_predicted must be a bool"):
        evaluate_predictions(tmp_path / "pred", lgg_root, "lgg", only_predicted="yes")


def test_command_line_takes_label_maps(lgg_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from brainseg_monai.cli import main

    write_lgg_predictions(lgg_root, tmp_path / "pred", lambda i, z, m: m)
    odd = next(p for p in sorted((tmp_path / "pred" / "SYN_0001").glob("*_pred.png")) if np.asarray(Image.open(p)).any())
    Image.fromarray(np.where(np.asarray(Image.open(odd)) > 0, 4, 0).astype(np.uint8)).save(odd)  # label 4: tumour
    args = ["evaluate", str(tmp_path / "pred"), "--truth", str(lgg_root), "--n-worst", "0"]
    assert main([*args, "--out", str(tmp_path / "refused")]) == 2
    assert "pass --label-maps" in capsys.readouterr().err
    assert main([*args, "--out", str(tmp_path / "report"), "--label-maps"]) == 0
    stored = json.loads((tmp_path / "report" / "metrics.json").read_text())
    assert stored["settings"]["label_maps"] is True and stored["summary"]["patient_dice_mean"] == 1.0


def _metrics(folder: Path, summary: dict, patients: dict[str, float | None], **settings: object) -> Path:
    folder.mkdir(parents=True)
    per_patient = [{"patient": p, "dice": d, "tp": 8, "fp": 2, "fn": 0 if d else 8, "tn": 90}
                   for p, d in patients.items()]
    path = folder / "metrics.json"
    report = {"summary": summary, "per_patient": per_patient, "per_image": []}
    path.write_text(json.dumps({**report, "settings": settings} if settings else report))
    return path


def test_aggregate_folds_mean_spread_and_pooled(tmp_path: Path) -> None:
    first = _metrics(tmp_path / "f0", {"patients": 2, "patient_dice_mean": 0.8, "global_dice": 0.7, "detection": {}},
                     {"a": 0.7, "b": 0.9})
    _metrics(tmp_path / "f1", {"patients": 2, "patient_dice_mean": 0.6, "global_dice": None}, {"c": 0.6, "d": None})
    result = aggregate_folds([first, tmp_path / "f1"])  # a metrics.json or the folder holding it
    assert result["metrics"]["patient_dice_mean"]["mean"] == pytest.approx(0.7)
    assert result["metrics"]["patient_dice_mean"]["std"] == pytest.approx(np.std([0.8, 0.6], ddof=1))
    assert result["metrics"]["global_dice"]["mean"] == 0.7 and result["metrics"]["global_dice"]["undefined"] == 1
    assert "detection" not in result["metrics"]
    pooled = result["pooled"]
    assert pooled["patients"] == 4
    assert pooled["patient_dice"]["mean"] == pytest.approx(np.mean([0.7, 0.9, 0.6]))
    assert pooled["patient_dice"]["undefined"] == 1
    # confusions summed over all patients: tp 32, fp 8, fn 8 -> 64 / 80
    assert pooled["global_dice"] == pytest.approx(2 * 32 / (2 * 32 + 8 + 8))
    assert [f["fold"] for f in result["folds"]] == [0, 1] and result["folds"][1]["global_dice"] is None

    _metrics(tmp_path / "f2", {"patients": 1}, {"a": 0.5})
    with pytest.raises(InputError, match="'a' is also scored"):
        aggregate_folds([first, tmp_path / "f2"])
    with pytest.raises(InputError, match="metrics.json not found"):
        aggregate_folds([first, tmp_path / "nowhere"])
    with pytest.raises(ValueError, match="at least two folds"):
        aggregate_folds([first])


def test_aggregate_folds_numbers_folds_by_their_reports_and_refuses_unlike_ones(tmp_path: Path) -> None:
    alike = {"kind": "slices", "distance_unit": "pixel", "spacing": None}
    second = _metrics(tmp_path / "b", {"patients": 1, "patient_hd95_mean": 4.0}, {"c": 0.6}, fold=1, **alike)
    first = _metrics(tmp_path / "a", {"patients": 1, "patient_hd95_mean": 2.0}, {"a": 0.8}, fold=0, **alike)
    result = aggregate_folds([second, first])
    assert [(f["fold"], f["path"]) for f in result["folds"]] == [(0, str(first)), (1, str(second))]
    assert result["per_patient"] == [{"fold": 0, "patient": "a", "dice": 0.8}, {"fold": 1, "patient": "c", "dice": 0.6}]
    assert result["settings"] == alike and result["metrics"]["patient_hd95_mean"]["mean"] == 3.0

    again = _metrics(tmp_path / "c", {"patients": 1}, {"d": 0.5}, fold=1, **alike)
    with pytest.raises(InputError, match=f"fold 1 is also the fold of {second}"):
        aggregate_folds([first, second, again])
    unnumbered = _metrics(tmp_path / "d", {"patients": 1}, {"e": 0.5}, **alike)  # no fold: its place in the list
    with pytest.raises(InputError, match="fold 0 is also the fold of"):
        aggregate_folds([unnumbered, first])
    assert [f["fold"] for f in aggregate_folds([first, unnumbered])["folds"]] == [0, 1]
    in_mm = _metrics(tmp_path / "e", {"patients": 1, "patient_hd95_mean": 1.0}, {"f": 0.5}, fold=2, kind="slices",
                     distance_unit="mm", spacing=[0.5])
    with pytest.raises(InputError, match=rf"^{in_mm}: scored unlike the other folds \(distance_unit 'mm' there, "
                                         rf"'pixel' in {first}; spacing \[0.5\] there, None in {first}\)"):
        aggregate_folds([first, in_mm])
    volumes = _metrics(tmp_path / "f", {"patients": 1}, {"g": 0.5}, fold=2, **{**alike, "kind": "volumes"})
    with pytest.raises(InputError, match="kind 'volumes' there, 'slices' in"):
        aggregate_folds([first, second, volumes])
