"""Datalists: every item listed once, patient-level splits and folds, numeric slice order, and bad input named."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import tifffile
from conftest import shared_path
from monai.data import load_decathlon_datalist

from brainseg_monai.datalist import (
    DEFAULT_DICOM_CHANNELS,
    build_datalist,
    load_datalist,
    load_lgg_volume,
    training_split,
    write_datalist,
)
from brainseg_monai.errors import InputError
from brainseg_monai.synth import make_dataset

SETS = ("training", "validation", "testing")


# ---------------------------------------------------------------- writers of tiny datasets with known content


def _lgg_slice_image(n: int, size=(6, 8)) -> np.ndarray:
    """(H, W, 3) uint8 whose channels are n, n + 100 and the row index: the slice number is readable back."""
    h, w = size
    image = np.zeros((h, w, 3), np.uint8)
    image[..., 0] = n
    image[..., 1] = n + 100
    image[..., 2] = np.arange(h)[:, None]
    return image


def _lgg_mask(n: int, size=(6, 8)) -> np.ndarray:
    """{0, 255} mask: a tumour on even slices only, at row n % size[0]."""
    mask = np.zeros(size, np.uint8)
    if n % 2 == 0:
        mask[n % size[0], 1:3] = 255
    return mask


def write_lgg(root: Path, patients: dict[str, list[int]]) -> Path:
    """ROOT/<patient>/<patient>_<n>.tif (+ _mask.tif) and a data.csv, like kaggle_3m."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "data.csv").write_text("Patient,grade\n" + "".join(f"{p},2\n" for p in patients))
    for patient, numbers in patients.items():
        (root / patient).mkdir()
        for n in numbers:
            tifffile.imwrite(root / patient / f"{patient}_{n}.tif", _lgg_slice_image(n), photometric="rgb")
            tifffile.imwrite(root / patient / f"{patient}_{n}_mask.tif", _lgg_mask(n))
    return root


def write_pairs(root: Path, stems: list[str], cases: list[tuple[str, str, str]] | None = None) -> Path:
    """ROOT/images/<stem>.png + ROOT/masks/<stem>.png and optionally cases.csv (name, pid, cv_fold)."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for i, stem in enumerate(stems):
        sitk.WriteImage(sitk.GetImageFromArray(np.full((5, 7), i, np.uint8)), str(root / "images" / f"{stem}.png"))
        mask = np.zeros((5, 7), np.uint8)
        mask[1:3, 2:4] = 255
        sitk.WriteImage(sitk.GetImageFromArray(mask), str(root / "masks" / f"{stem}.png"))
    if cases is not None:
        rows = "".join(f"{name},{pid},1,meningioma,{fold}\n" for name, pid, fold in cases)
        (root / "cases.csv").write_text("name,pid,label,label_name,cv_fold\n" + rows)
    return root


def _write_volume(path: Path, array: np.ndarray) -> None:
    sitk.WriteImage(sitk.GetImageFromArray(array), str(path))


def write_nifti(root: Path, cases: list[str], channels=("t1", "flair", "t1c"), shape=(4, 5, 6)) -> Path:
    """ROOT/<case>/<case>_<channel>.nii.gz + <case>_seg.nii.gz (labels 0-2) + a brainmask, BraTS-like."""
    for case in cases:
        (root / case).mkdir(parents=True)
        for c in channels:
            _write_volume(root / case / f"{case}_{c}.nii.gz", np.random.default_rng(0).random(shape, np.float32))
        seg = np.zeros(shape, np.uint8)
        seg[1:3, 1:3, 1:3] = 1
        seg[2, 2, 2] = 2
        _write_volume(root / case / f"{case}_seg.nii.gz", seg)
        _write_volume(root / case / f"{case}_brainmask.nii.gz", np.ones(shape, np.uint8))
    return root


def write_series(folder: Path, description: str, series_uid: str, study_uid: str, size=(6, 5, 3)) -> Path:
    """One DICOM MR series (a file per slice) written with SimpleITK, with the given SeriesDescription."""
    folder.mkdir(parents=True)
    nx, ny, nz = size
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for z in range(nz):
        image = sitk.GetImageFromArray(np.full((ny, nx), z, np.int16))
        tags = {
            "0008|0060": "MR", "0020|000d": study_uid, "0020|000e": series_uid, "0008|103e": description,
            "0020|0032": f"0\\0\\{z}", "0020|0013": str(z + 1), "0020|0037": "1\\0\\0\\0\\1\\0",
            "0008|0016": "1.2.840.10008.5.1.4.1.1.4", "0008|0018": f"{series_uid}.{z + 1}",
        }  # fmt: skip
        for tag, value in tags.items():
            image.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"IM{z:03d}.dcm"))
        writer.Execute(image)
    return folder


def write_dicom_study(root: Path, study: str, descriptions: dict[str, str], label_shape=(3, 5, 6)) -> Path:
    """ROOT/<study>/<folder>/IM*.dcm per series, and ROOT/<study>/<study>_seg.nii.gz ((z, y, x) = label_shape)."""
    uid = f"1.2.826.0.1.{abs(hash(study)) % 10**8}"
    for i, (folder, description) in enumerate(descriptions.items()):
        write_series(root / study / folder, description, f"{uid}.{i + 1}", uid)
    if label_shape is not None:
        seg = np.zeros(label_shape, np.uint8)
        seg[1, 1:3, 1:3] = 1
        _write_volume(root / study / f"{study}_seg.nii.gz", seg)
    return root / study


def _all_items(dl: dict) -> list[dict]:
    return [it for key in SETS for it in dl[key]]


def _patients(items: list[dict]) -> set[str]:
    return {it["patient"] for it in items}


# ---------------------------------------------------------------- lgg


@pytest.fixture()
def lgg_root(tmp_path: Path) -> Path:
    patients = {f"P{i:02d}": [1, 2, 3, 10, 11] if i % 2 else [2, 10, 1] for i in range(10)}
    return write_lgg(tmp_path / "lgg", patients)


def test_lgg_lists_every_slice_once_in_numeric_order(lgg_root: Path) -> None:
    dl = build_datalist("lgg", lgg_root, val=0.2, seed=0)
    items = _all_items(dl)
    assert len(items) == 5 * 5 + 5 * 3
    assert len({it["image"] for it in items}) == len(items)
    assert not any(it["image"].endswith("_mask.tif") for it in items)
    assert all(it["label"] == it["image"][: -len(".tif")] + "_mask.tif" for it in items)
    assert all(Path(it["image"]).is_absolute() and Path(it["label"]).is_absolute() for it in items)
    assert all(Path(it["image"]).parent.name == it["patient"] for it in items)
    assert dl["channels"] == ["t1", "flair", "t1c"]
    assert dl["skipped"] == []
    for key in SETS:  # within a set, a patient's slices are listed in slice-number order (2 before 10)
        for patient in _patients(dl[key]):
            numbers = [int(Path(it["image"]).stem.rsplit("_", 1)[1]) for it in dl[key] if it["patient"] == patient]
            assert numbers == sorted(numbers)
            assert numbers in ([1, 2, 3, 10, 11], [1, 2, 10])


def test_split_is_by_patient_deterministic_and_seeded(lgg_root: Path) -> None:
    dl = build_datalist("lgg", lgg_root, val=0.2, test=0.2, seed=3)
    sets = [_patients(dl[key]) for key in SETS]
    assert [len(s) for s in sets] == [6, 2, 2]
    assert not (sets[0] & sets[1]) and not (sets[0] & sets[2]) and not (sets[1] & sets[2])
    assert set.union(*sets) == {f"P{i:02d}" for i in range(10)}
    again = build_datalist("lgg", lgg_root, val=0.2, test=0.2, seed=3)
    assert json.dumps(again) == json.dumps(dl)
    other = build_datalist("lgg", lgg_root, val=0.2, test=0.2, seed=4)
    assert [_patients(other[key]) for key in SETS] != sets
    assert (dl["seed"], dl["val"], dl["test"], dl["folds"]) == (3, 0.2, 0.2, None)


def test_small_fraction_still_gets_one_patient(tmp_path: Path) -> None:
    root = write_lgg(tmp_path / "lgg", {"A": [1], "B": [1, 2]})
    dl = build_datalist("lgg", root, val=0.1, seed=0)
    assert len(_patients(dl["validation"])) == 1 and len(_patients(dl["training"])) == 1
    with pytest.raises(InputError, match="leave none for training") as error:
        build_datalist("lgg", root, val=0.2, test=0.2)
    assert str(root) in str(error.value)


def test_folds_are_disjoint_covering_and_balanced(lgg_root: Path) -> None:
    dl = build_datalist("lgg", lgg_root, folds=3, test=0.2, seed=1)
    assert dl["validation"] == [] and dl["folds"] == 3
    assert len(_patients(dl["testing"])) == 2
    fold_patients = [{it["patient"] for it in dl["training"] if it["fold"] == k} for k in range(3)]
    assert sorted(len(f) for f in fold_patients) == [2, 3, 3]
    assert set.union(*fold_patients) | _patients(dl["testing"]) == {f"P{i:02d}" for i in range(10)}
    assert sum(len(f) for f in fold_patients) == len(set.union(*fold_patients))
    assert not set.union(*fold_patients) & _patients(dl["testing"])
    assert {it["fold"] for it in dl["training"]} == {0, 1, 2}
    for k in range(3):
        train, valid = training_split(dl, fold=k)
        assert _patients(valid) == fold_patients[k]
        assert not _patients(train) & _patients(valid)
        assert len(train) + len(valid) == len(dl["training"])


def test_training_split_without_folds_and_errors(lgg_root: Path, tmp_path: Path) -> None:
    dl = build_datalist("lgg", lgg_root, val=0.3, seed=0)
    path = write_datalist(dl, tmp_path / "out" / "datalist.json")
    assert load_datalist(path) == dl
    assert not [p for p in path.parent.iterdir() if p != path]  # no temporary file left behind
    train, valid = training_split(path)
    assert (train, valid) == (dl["training"], dl["validation"])
    assert load_decathlon_datalist(path, data_list_key="validation") == dl["validation"]  # MONAI reads it as is
    assert len(_patients(valid)) == 3
    with pytest.raises(ValueError, match="no folds"):
        training_split(dl, fold=0)
    folded = build_datalist("lgg", lgg_root, folds=4, seed=0)
    with pytest.raises(ValueError, match="fold must be in 0..3"):
        training_split(folded, fold=4)
    folded_path = write_datalist(folded, tmp_path / "folded.json")
    with pytest.raises(InputError, match="validation set is empty") as error:
        training_split(folded_path)
    assert str(folded_path) in str(error.value)
    leaky = {**dl, "validation": dl["validation"] + dl["training"][:1]}
    with pytest.raises(InputError, match="both training and validation"):
        training_split(leaky)


def test_load_datalist_errors_name_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "none.json"
    with pytest.raises(InputError, match="does not exist") as error:
        load_datalist(missing)
    assert str(missing) in str(error.value)
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(InputError) as error:
        load_datalist(broken)
    assert str(broken) in str(error.value)


def test_load_lgg_volume_stacks_slices_in_number_order(lgg_root: Path) -> None:
    image, mask, files = load_lgg_volume(lgg_root / "P01")
    assert image.shape == (3, 8, 6, 5) and mask.shape == (8, 6, 5)
    assert [Path(f).name for f in files] == [f"P01_{n}.tif" for n in (1, 2, 3, 10, 11)]
    for i, n in enumerate((1, 2, 3, 10, 11)):
        np.testing.assert_array_equal(image[..., i], _lgg_slice_image(n).transpose(2, 1, 0))
        np.testing.assert_array_equal(mask[..., i], (_lgg_mask(n) > 0).T)
    assert mask.dtype == np.uint8 and set(np.unique(mask)) == {0, 1}


def test_lgg_bad_inputs_raise_naming_the_file(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="does not exist") as error:
        build_datalist("lgg", tmp_path / "absent")
    assert str(tmp_path / "absent") in str(error.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="empty") as error:
        build_datalist("lgg", tmp_path / "empty")
    assert str(tmp_path / "empty") in str(error.value)
    only_csv = write_lgg(tmp_path / "csv_only", {})
    with pytest.raises(InputError, match="no LGG cases found: expected ROOT/<patient>") as error:
        build_datalist("lgg", only_csv)
    assert str(only_csv) in str(error.value)

    def fresh(name: str) -> Path:
        return write_lgg(tmp_path / name, {"A": [1, 2], "B": [1, 2]})

    root = fresh("no_mask")
    (root / "A" / "A_2_mask.tif").unlink()
    with pytest.raises(InputError, match="image without a mask: expected A_2_mask.tif") as error:
        build_datalist("lgg", root, check=False)
    assert str(root / "A" / "A_2.tif") in str(error.value)

    root = fresh("no_image")
    (root / "B" / "B_1.tif").unlink()
    with pytest.raises(InputError, match="mask without an image") as error:
        build_datalist("lgg", root)
    assert str(root / "B" / "B_1_mask.tif") in str(error.value)

    root = fresh("size")
    tifffile.imwrite(root / "B" / "B_2_mask.tif", np.zeros((4, 4), np.uint8))
    with pytest.raises(InputError, match=r"mask size \(4, 4\) differs from its image size \(8, 6\)") as error:
        build_datalist("lgg", root)
    assert str(root / "B" / "B_2_mask.tif") in str(error.value)

    root = fresh("values")
    tifffile.imwrite(root / "A" / "A_1_mask.tif", np.arange(48, dtype=np.uint8).reshape(6, 8))
    with pytest.raises(InputError, match="not background/foreground") as error:
        build_datalist("lgg", root)
    assert str(root / "A" / "A_1_mask.tif") in str(error.value)
    with pytest.raises(InputError, match="not background/foreground"):
        load_lgg_volume(root / "A")

    root = fresh("corrupt")
    (root / "B" / "B_1.tif").write_bytes(b"not a tiff at all")
    with pytest.raises(InputError) as error:
        build_datalist("lgg", root)
    assert str(root / "B" / "B_1.tif") in str(error.value)

    root = fresh("duplicate")
    tifffile.imwrite(root / "A" / "A_01.tif", _lgg_slice_image(1), photometric="rgb")
    with pytest.raises(InputError, match="slice number 1 is also used") as error:
        build_datalist("lgg", root)
    assert "A_01.tif" in str(error.value) or "A_1.tif" in str(error.value)


def test_lgg_mask_values_0_1_are_accepted(tmp_path: Path) -> None:
    root = write_lgg(tmp_path / "lgg", {"A": [1, 2], "B": [1]})
    tifffile.imwrite(root / "A" / "A_2_mask.tif", (_lgg_mask(2) > 0).astype(np.uint8))
    assert len(_all_items(build_datalist("lgg", root, val=0.5))) == 3


def test_argument_errors_name_the_argument(lgg_root: Path) -> None:
    with pytest.raises(ValueError, match="source must be one of lgg, pairs, nifti, dicom but is 'png'"):
        build_datalist("png", lgg_root)
    with pytest.raises(ValueError, match="val must be a fraction"):
        build_datalist("lgg", lgg_root, val=1.5)
    with pytest.raises(ValueError, match="folds must be an integer >= 2"):
        build_datalist("lgg", lgg_root, folds=1)
    with pytest.raises(InputError, match="folds=11 needs at least 11"):
        build_datalist("lgg", lgg_root, folds=11)
    with pytest.raises(ValueError, match="seed must be a non-negative integer"):
        build_datalist("lgg", lgg_root, seed=-1)


# ---------------------------------------------------------------- pairs


def test_pairs_group_by_pid_then_cv_fold_then_stem(tmp_path: Path) -> None:
    stems = ["1", "2", "10", "11", "20"]
    cases = [("1", "", "1"), ("2", "", "1"), ("10", "p7", "2"), ("11", "", "2"), ("20", "", "")]
    dl = build_datalist("pairs", write_pairs(tmp_path / "pairs", stems, cases), val=0.25, seed=0)
    patient_of = {Path(it["image"]).stem: it["patient"] for it in _all_items(dl)}
    assert patient_of == {"1": "cvfold1", "2": "cvfold1", "10": "p7", "11": "cvfold2", "20": "20"}
    assert dl["channels"] == ["image"]
    assert all(Path(it["label"]).parent.name == "masks" and Path(it["label"]).name == Path(it["image"]).name
               for it in _all_items(dl))
    no_csv = build_datalist("pairs", write_pairs(tmp_path / "plain", ["a", "b"]), val=0.5)
    assert sorted(it["patient"] for it in _all_items(no_csv)) == ["a", "b"]


def test_pairs_bad_inputs_raise_naming_the_file(tmp_path: Path) -> None:
    root = write_pairs(tmp_path / "no_mask", ["1", "2"])
    (root / "masks" / "2.png").unlink()
    with pytest.raises(InputError, match="image without a mask") as error:
        build_datalist("pairs", root)
    assert str(root / "images" / "2.png") in str(error.value)

    root = write_pairs(tmp_path / "no_image", ["1", "2"])
    (root / "images" / "1.png").unlink()
    with pytest.raises(InputError, match="mask without an image") as error:
        build_datalist("pairs", root)
    assert str(root / "masks" / "1.png") in str(error.value)

    root = write_pairs(tmp_path / "size", ["1", "2"])
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((9, 9), np.uint8)), str(root / "masks" / "2.png"))
    with pytest.raises(InputError, match="differs from its image size") as error:
        build_datalist("pairs", root)
    assert str(root / "masks" / "2.png") in str(error.value)

    root = write_pairs(tmp_path / "values", ["1", "2"])
    sitk.WriteImage(sitk.GetImageFromArray(np.full((5, 7), 128, np.uint8)), str(root / "masks" / "1.png"))
    with pytest.raises(InputError, match="not background/foreground") as error:
        build_datalist("pairs", root)
    assert str(root / "masks" / "1.png") in str(error.value)

    root = write_pairs(tmp_path / "unlisted", ["1", "2"], [("1", "", "1")])
    with pytest.raises(InputError, match="not listed, e.g. 2") as error:
        build_datalist("pairs", root)
    assert str(root / "cases.csv") in str(error.value)

    (tmp_path / "layout").mkdir()
    (tmp_path / "layout" / "x.png").write_bytes(b"")
    with pytest.raises(InputError, match="no pairs found: expected ROOT/images") as error:
        build_datalist("pairs", tmp_path / "layout")
    assert str(tmp_path / "layout") in str(error.value)


# ---------------------------------------------------------------- nifti


def test_nifti_cases_default_and_given_channels(tmp_path: Path) -> None:
    root = write_nifti(tmp_path / "nii", ["C1", "C2", "C3"])
    dl = build_datalist("nifti", root, val=0.34, seed=0)
    assert dl["channels"] == ["t1", "flair", "t1c"]
    items = _all_items(dl)
    assert sorted(it["patient"] for it in items) == ["C1", "C2", "C3"]
    for it in items:
        case = it["patient"]
        assert [Path(p).name for p in it["image"]] == [f"{case}_{c}.nii.gz" for c in ("t1", "flair", "t1c")]
        assert Path(it["label"]).name == f"{case}_seg.nii.gz"
    given = build_datalist("nifti", root, channels={"t1c": "*_T1C.nii*", "flair": "*_flair.nii*"}, val=0.34)
    assert given["channels"] == ["t1c", "flair"]
    assert all([Path(p).name.split("_")[1] for p in it["image"]] == ["t1c.nii.gz", "flair.nii.gz"]
               for it in _all_items(given))


def test_nifti_bad_inputs_raise_naming_the_file(tmp_path: Path) -> None:
    root = write_nifti(tmp_path / "float", ["C1", "C2"])
    _write_volume(root / "C2" / "C2_seg.nii.gz", np.full((4, 5, 6), 0.5, np.float32))
    with pytest.raises(InputError, match="non-integer") as error:
        build_datalist("nifti", root)
    assert str(root / "C2" / "C2_seg.nii.gz") in str(error.value)

    root = write_nifti(tmp_path / "negative", ["C1", "C2"])
    _write_volume(root / "C1" / "C1_seg.nii.gz", np.full((4, 5, 6), -1, np.int16))
    with pytest.raises(InputError, match="negative") as error:
        build_datalist("nifti", root)
    assert str(root / "C1" / "C1_seg.nii.gz") in str(error.value)

    root = write_nifti(tmp_path / "size", ["C1", "C2"])
    _write_volume(root / "C2" / "C2_seg.nii.gz", np.zeros((4, 5, 7), np.uint8))
    with pytest.raises(InputError, match=r"label size \(7, 5, 4\) differs from its image size \(6, 5, 4\)") as error:
        build_datalist("nifti", root)
    assert str(root / "C2" / "C2_seg.nii.gz") in str(error.value)

    root = write_nifti(tmp_path / "channel", ["C1", "C2"])
    (root / "C2" / "C2_flair.nii.gz").unlink()
    with pytest.raises(InputError, match="channel 'flair': expected one file matching") as error:
        build_datalist("nifti", root)
    assert str(root / "C2") in str(error.value)

    root = write_nifti(tmp_path / "label", ["C1", "C2"])
    (root / "C1" / "C1_seg.nii.gz").unlink()
    with pytest.raises(InputError, match="expected one label file") as error:
        build_datalist("nifti", root)
    assert str(root / "C1") in str(error.value)

    root = write_nifti(tmp_path / "corrupt", ["C1", "C2"])
    (root / "C1" / "C1_t1c.nii.gz").write_bytes(b"garbage")
    with pytest.raises(InputError) as error:
        build_datalist("nifti", root)
    assert str(root / "C1" / "C1_t1c.nii.gz") in str(error.value)


# ---------------------------------------------------------------- dicom

SYN_DESCRIPTIONS = {"T1_PRE": "AX T1 PRE", "FLAIR": "AX FLAIR", "T1_POST": "AX T1 POST GD"}


def test_dicom_channels_one_item_per_study_and_bad_studies_skipped(tmp_path: Path) -> None:
    root = tmp_path / "dicom"
    for study in ("SYN_0000", "SYN_0001", "SYN_0002"):
        write_dicom_study(root, study, SYN_DESCRIPTIONS)
    write_dicom_study(root, "SYN_0003", SYN_DESCRIPTIONS, label_shape=None)
    write_dicom_study(root, "NO_FLAIR", {"T1_PRE": "AX T1 PRE", "T1_POST": "AX T1 POST GD"})
    write_dicom_study(root, "TWO_FLAIR", {**SYN_DESCRIPTIONS, "FLAIR2": "SAG FLAIR"})
    write_dicom_study(root, "BAD_LABEL", SYN_DESCRIPTIONS, label_shape=(3, 5, 5))
    dl = build_datalist("dicom", root, channels=DEFAULT_DICOM_CHANNELS, val=0.25, seed=0)
    assert dl["channels"] == ["t1", "flair", "t1c"]
    items = {it["patient"]: it for it in _all_items(dl)}
    assert sorted(items) == ["SYN_0000", "SYN_0001", "SYN_0002", "SYN_0003"]
    for study, item in items.items():
        assert item["image"] == [str(root / study / folder) for folder in ("T1_PRE", "FLAIR", "T1_POST")]
    assert items["SYN_0000"]["label"] == str(root / "SYN_0000" / "SYN_0000_seg.nii.gz")
    assert "label" not in items["SYN_0003"]
    skipped = {Path(s["path"]).name: s["reason"] for s in dl["skipped"]}
    assert set(skipped) == {"NO_FLAIR", "TWO_FLAIR", "BAD_LABEL_seg.nii.gz"}
    assert "channel 'flair'" in skipped["NO_FLAIR"] and "no series matches" in skipped["NO_FLAIR"]
    assert "'AX T1 PRE'" in skipped["NO_FLAIR"] and "'AX T1 POST GD'" in skipped["NO_FLAIR"]
    assert "2 series match" in skipped["TWO_FLAIR"] and "'SAG FLAIR'" in skipped["TWO_FLAIR"]
    assert "differs from its image size" in skipped["BAD_LABEL_seg.nii.gz"]
    by_name = build_datalist("dicom", root, channels=["flair", "t1c"], val=0.25, seed=0)
    assert [Path(p).name for p in by_name["training"][0]["image"]] == ["FLAIR", "T1_POST"]


def test_dicom_without_channels_lists_each_series(tmp_path: Path) -> None:
    root = tmp_path / "dicom"
    write_dicom_study(root, "S1", SYN_DESCRIPTIONS)
    write_dicom_study(root, "S2", {"ONLY": "AX FLAIR"})
    dl = build_datalist("dicom", root, val=0.5, seed=0)
    items = _all_items(dl)
    assert sorted(it["image"] for it in items) == sorted(
        [str(root / "S1" / f) for f in SYN_DESCRIPTIONS] + [str(root / "S2" / "ONLY")]
    )
    assert sorted(it["patient"] for it in items) == ["S1", "S1", "S1", "S2"]
    # A label is attached only where the study has one series: with three, which one it annotates is unknown.
    assert [it.get("label") for it in items if it["patient"] == "S2"] == [str(root / "S2" / "S2_seg.nii.gz")]
    assert all("label" not in it for it in items if it["patient"] == "S1")


def test_dicom_all_studies_bad_raises(tmp_path: Path) -> None:
    root = tmp_path / "dicom"
    write_dicom_study(root, "A", {"FLAIR": "AX FLAIR"})
    with pytest.raises(InputError, match="no usable DICOM study") as error:
        build_datalist("dicom", root, channels=DEFAULT_DICOM_CHANNELS)
    assert str(root) in str(error.value) and "'AX FLAIR'" in str(error.value)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("no DICOM here")
    with pytest.raises(InputError, match="no DICOM series found") as error:
        build_datalist("dicom", tmp_path / "notes")
    assert str(tmp_path / "notes") in str(error.value)


@pytest.mark.parametrize("fmt", ["lgg", "pairs", "nifti", "dicom"])
def test_synth_datasets_list_every_case(tmp_path: Path, fmt: str) -> None:
    root = Path(make_dataset(tmp_path / fmt, fmt, cases=3, seed=0, size=(32, 32, 12)))
    dl = build_datalist(fmt, root, channels=DEFAULT_DICOM_CHANNELS if fmt == "dicom" else None, val=0.34, seed=0)
    items = _all_items(dl)
    assert _patients(items) == {"SYN_0001", "SYN_0002", "SYN_0003"} and dl["skipped"] == []
    assert [len(_patients(dl[key])) for key in SETS] == [2, 1, 0]
    assert dl["channels"] == (["image"] if fmt == "pairs" else ["t1", "flair", "t1c"])
    if fmt in ("lgg", "pairs"):
        images = sorted(str(p) for p in root.rglob("*.*") if p.suffix in (".tif", ".png") and "mask" not in str(p))
        assert sorted(it["image"] for it in items) == images
        assert all(Path(it["image"]).name.startswith(it["patient"] + "_") for it in items)
        if fmt == "lgg":  # 12 slices per patient, listed 1, 2, ..., 10, 11, 12
            numbers = [int(Path(it["image"]).stem.rsplit("_", 1)[1]) for it in dl["validation"]]
            assert numbers == list(range(1, 13))
    else:
        names = ["T1_PRE", "FLAIR", "T1_POST"] if fmt == "dicom" else None
        for it in items:
            case = it["patient"]
            expected = names or [f"{case}_{c}.nii.gz" for c in ("t1", "flair", "t1c")]
            assert [Path(p).name for p in it["image"]] == expected
            assert it["label"] == str(root / case / f"{case}_seg.nii.gz")


# ---------------------------------------------------------------- real data


@pytest.fixture(scope="module")
def real_lgg() -> dict:
    return build_datalist("lgg", shared_path("lgg", "kaggle_3m"), val=0.2, test=0.1, seed=0)


@pytest.mark.realdata
def test_real_lgg_all_slices_no_leakage(real_lgg: dict) -> None:
    items = _all_items(real_lgg)
    assert len(items) == 2720 and len({it["image"] for it in items}) == 2720
    assert len(_patients(items)) == 87
    assert not any(it["image"].endswith("_mask.tif") for it in items)
    sets = [_patients(real_lgg[key]) for key in SETS]
    assert [len(s) for s in sets] == [61, 17, 9]
    assert not (sets[0] & sets[1] or sets[0] & sets[2] or sets[1] & sets[2])
    with_tumour = sum(bool(tifffile.imread(it["label"]).any()) for it in items)
    # SOURCE.md says 1,007; the shared masks themselves hold 946 with a nonzero pixel (tifffile and SimpleITK agree)
    assert with_tumour == 946


@pytest.mark.realdata
def test_real_lgg_folds_and_volume(real_lgg: dict) -> None:
    root = Path(real_lgg["root"])
    patient = "TCGA_CS_4941_19960909"
    numbers = [int(Path(it["image"]).stem.rsplit("_", 1)[1]) for it in _all_items(real_lgg) if it["patient"] == patient]
    assert numbers == list(range(1, len(numbers) + 1))
    image, mask, files = load_lgg_volume(root / patient)
    assert image.shape == (3, 256, 256, len(numbers)) and mask.shape == (256, 256, len(numbers))
    assert [Path(f).name for f in files] == [f"{patient}_{n}.tif" for n in numbers]
    for i in (1, 9, len(numbers) - 1):  # _2 and _10 among them: numeric, not text, order
        np.testing.assert_array_equal(image[..., i], tifffile.imread(files[i]).transpose(2, 1, 0))
        np.testing.assert_array_equal(mask[..., i], tifffile.imread(files[i][:-4] + "_mask.tif").T > 0)


@pytest.mark.realdata
def test_real_figshare_pairs_grouped_by_cv_fold() -> None:
    dl = build_datalist("pairs", shared_path("figshare"), folds=5, seed=0, check=False)
    items = _all_items(dl)
    assert len(items) == 120 and dl["validation"] == []
    assert _patients(items) == {f"cvfold{k}" for k in range(1, 6)}
    sizes = sorted(sum(it["patient"] == f"cvfold{k}" for it in items) for k in range(1, 6))
    assert sizes == [15, 19, 25, 27, 34]
    for k in range(5):
        assert len({it["patient"] for it in dl["training"] if it["fold"] == k}) == 1
    checked = build_datalist("pairs", shared_path("figshare"), val=0.2, seed=0)
    assert len(_patients(checked["validation"])) == 1 and len(_all_items(checked)) == 120


@pytest.mark.realdata
def test_real_brats_nifti() -> None:
    dl = build_datalist("nifti", shared_path("brats2015"), val=0.34, seed=0)
    items = _all_items(dl)
    assert dl["channels"] == ["flair", "t1c"]
    assert sorted(it["patient"] for it in items) == [f"brats_2013_pat000{i}_1" for i in (1, 2, 3)]
    assert all(len(it["image"]) == 2 and "brainmask" not in "".join(it["image"]) for it in items)
    assert len(dl["validation"]) == 1


@pytest.mark.realdata
def test_real_dicom_series_without_channels() -> None:
    root = shared_path("dicom").resolve()
    dl = build_datalist("dicom", root, val=0.5, seed=0)
    items = _all_items(dl)
    assert sorted(it["image"] for it in items) == [str(root / "C3L-03728_AX_T1_SE"), str(root / "HF1139_AXIAL_FLAIR")]
    assert sorted(it["patient"] for it in items) == ["C3L-03728_AX_T1_SE", "HF1139_AXIAL_FLAIR"]
    assert all("label" not in it for it in items)


def test_one_lgg_patient_folder_is_a_dataset_of_one_patient(tmp_path: Path) -> None:
    """What ``brainseg infer`` is pointed at for one patient is also a truth ``brainseg evaluate`` can read."""
    root = write_lgg(tmp_path / "lgg", {"A": [1, 2, 10], "B": [1]})
    datalist = build_datalist("lgg", root / "A", val=0.0)
    items = datalist["training"]
    assert [Path(it["image"]).name for it in items] == ["A_1.tif", "A_2.tif", "A_10.tif"]
    assert {it["patient"] for it in items} == {"A"} and datalist["validation"] == []
