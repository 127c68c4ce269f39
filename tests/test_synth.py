"""Synthetic phantoms: layouts, known truth, geometry, byte-for-byte reproducibility, and never overwriting data."""

from __future__ import annotations

import csv
import hashlib
import json
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
import tifffile

from brainseg_monai.errors import InputError
from brainseg_monai.synth import (
    CHANNELS,
    DICOM_FOLDERS,
    DICOM_SERIES,
    GENERATOR_VERSION,
    default_dataset,
    make_dataset,
    phantom_volume,
)

# Small sizes keep every dataset well under a second to write.
SMALL = {"lgg": (48, 48, 8), "pairs": None, "nifti": (32, 32, 16), "dicom": (32, 32, 8)}
FLAIR = CHANNELS.index("flair")
T1 = CHANNELS.index("t1")
T1C = CHANNELS.index("t1c")


def _hashes(root: Path) -> dict[str, str]:
    files = sorted(p for p in root.rglob("*") if p.is_file())
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def _rotation(about_x: float, about_y: float) -> np.ndarray:
    ax, ay = math.radians(about_x), math.radians(about_y)
    rx = np.array([[1, 0, 0], [0, math.cos(ax), -math.sin(ax)], [0, math.sin(ax), math.cos(ax)]])
    ry = np.array([[math.cos(ay), 0, math.sin(ay)], [0, 1, 0], [-math.sin(ay), 0, math.cos(ay)]])
    return rx @ ry


def _read_series(folder: Path) -> sitk.Image:
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
    return reader.Execute()


def _assert_contrasts(image: np.ndarray, mask: np.ndarray) -> None:
    """Tumour bright on FLAIR, dark on T1 and brighter on FLAIR than on T1/T1c: fails if channels were swapped."""
    total = image.sum(axis=0)
    head = total > 0.3 * np.percentile(total, 99)  # head tissue; background holds only noise
    tumour, tissue = mask > 0, head & (mask == 0)
    assert tumour.sum() > 0
    assert image[FLAIR][tumour].mean() > 1.4 * np.median(image[FLAIR][tissue])
    assert image[T1][tumour].mean() < np.median(image[T1][tissue])
    assert image[FLAIR][tumour].mean() > image[T1C][tumour].mean() > image[T1][tumour].mean()


# --- the phantom itself


def test_phantom_volume_shapes_truth_and_contrast() -> None:
    image, mask = phantom_volume(np.random.default_rng(7), size=(64, 64, 12), tumours=2)
    assert image.shape == (3, 64, 64, 12) and image.dtype == np.float32
    assert mask.shape == (64, 64, 12) and mask.dtype == np.uint8
    assert set(np.unique(mask)) == {0, 1}
    assert np.isfinite(image).all() and image.min() >= 0
    # Tumours sit in the central part of the brain: the top and bottom slices are tumour-free.
    assert not mask[:, :, 0].any() and not mask[:, :, -1].any()
    _assert_contrasts(image, mask)
    # The head is an ellipse longer in y (anterior-posterior) than in x.
    head = image[T1, :, :, 6] > 0.2
    assert np.ptp(np.nonzero(head.any(axis=0))[0]) > np.ptp(np.nonzero(head.any(axis=1))[0])


def test_phantom_volume_seeded_and_tumour_count() -> None:
    a = phantom_volume(np.random.default_rng(3), size=(32, 32, 8))
    b = phantom_volume(np.random.default_rng(3), size=(32, 32, 8))
    c = phantom_volume(np.random.default_rng(4), size=(32, 32, 8))
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0])
    free_image, free_mask = phantom_volume(np.random.default_rng(3), size=(32, 32, 8), tumours=0)
    assert not free_mask.any()
    # Without a tumour nothing is bright on FLAIR the way a tumour is.
    assert free_image[FLAIR].max() < 0.8


@pytest.mark.parametrize("size", [(32, 32), (7, 32, 8), (32, 32, 2), "abc", (32.0, 32, 8)])
def test_phantom_volume_rejects_bad_size(size) -> None:
    with pytest.raises(ValueError, match="size"):
        phantom_volume(np.random.default_rng(0), size=size)


# --- layouts


def test_lgg_layout_values_and_truth(tmp_path: Path) -> None:
    out = make_dataset(tmp_path / "lgg", "lgg", cases=3, seed=1, size=SMALL["lgg"])
    assert out == (tmp_path / "lgg").absolute()
    patients = sorted(p.name for p in out.iterdir() if p.is_dir())
    assert patients == ["SYN_0001", "SYN_0002", "SYN_0003"]
    assert json.loads((out / "synth.json").read_text())["format"] == "lgg"
    tumour_slices = free_slices = 0
    for pid in patients:
        names = sorted(p.name for p in (out / pid).iterdir())
        assert names == sorted([f"{pid}_{n}.tif" for n in range(1, 9)] + [f"{pid}_{n}_mask.tif" for n in range(1, 9)])
        slices, masks = [], []
        for n in range(1, 9):
            rgb = tifffile.imread(out / pid / f"{pid}_{n}.tif")
            mask = tifffile.imread(out / pid / f"{pid}_{n}_mask.tif")
            assert rgb.shape == (48, 48, 3) and rgb.dtype == np.uint8
            assert mask.shape == (48, 48) and mask.dtype == np.uint8
            assert set(np.unique(mask)) <= {0, 255}
            tumour_slices += bool(mask.any())
            free_slices += not mask.any()
            slices.append(rgb)
            masks.append(mask)
        # A patient's slices stack into one volume: the head is widest in the middle slices.
        areas = [(s.sum(axis=2) > 30).sum() for s in slices]
        assert areas[0] < max(areas) and areas[-1] < max(areas)
        if any(m.any() for m in masks):
            _assert_contrasts(np.moveaxis(np.stack(slices), -1, 0).astype(np.float32), np.stack(masks))
    assert tumour_slices > 0 and free_slices > 0


def test_pairs_layout_csv_and_mixed_sizes(tmp_path: Path) -> None:
    out = make_dataset(tmp_path / "pairs", "pairs", cases=6, seed=2)
    with open(out / "cases.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == ["name", "pid", "label", "label_name", "cv_fold"]
    assert len(rows) == 6 * 8
    assert sorted(p.stem for p in (out / "images").glob("*.png")) == sorted(r["name"] for r in rows)
    assert sorted(p.stem for p in (out / "masks").glob("*.png")) == sorted(r["name"] for r in rows)
    folds = {r["pid"]: r["cv_fold"] for r in rows}
    assert len(folds) == 6 and set(folds.values()) == {"1", "2", "3", "4", "5"}
    assert all(r["cv_fold"] == folds[r["pid"]] for r in rows)  # folds are by patient
    sizes, labels = set(), []
    for row in rows:
        image = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "images" / f"{row['name']}.png")))
        mask = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "masks" / f"{row['name']}.png")))
        assert image.dtype == np.uint8 and image.ndim == 2 and mask.shape == image.shape
        assert set(np.unique(mask)) <= {0, 255}
        assert row["label"] == str(int(mask.any())) and row["label_name"] == ("tumour" if mask.any() else "no_tumour")
        sizes.add(image.shape)
        labels.append(row["label"])
    assert sizes == {(128, 128), (96, 96)}
    assert set(labels) == {"0", "1"}


def test_nifti_layout_geometry_and_truth(tmp_path: Path) -> None:
    out = make_dataset(tmp_path / "nifti", "nifti", cases=2, seed=5, size=SMALL["nifti"])
    for pid in ("SYN_0001", "SYN_0002"):
        names = sorted(p.name for p in (out / pid).iterdir())
        assert names == sorted([f"{pid}_{c}.nii.gz" for c in CHANNELS] + [f"{pid}_seg.nii.gz"])
        seg = nib.load(out / pid / f"{pid}_seg.nii.gz")
        assert seg.get_data_dtype() == np.uint8 and seg.shape == (32, 32, 16)
        assert set(np.unique(np.asarray(seg.dataobj))) <= {0, 1}
        channels = []
        for channel in CHANNELS:
            img = nib.load(out / pid / f"{pid}_{channel}.nii.gz")
            assert img.get_data_dtype() == np.float32 and img.shape == (32, 32, 16)
            assert np.allclose(img.affine, seg.affine)
            channels.append(np.asarray(img.dataobj))
            itk = sitk.ReadImage(str(out / pid / f"{pid}_{channel}.nii.gz"))
            assert np.allclose(itk.GetSpacing(), (1.0, 1.0, 1.5))
            assert np.allclose(itk.GetDirection(), np.eye(3).ravel(), atol=1e-6)
        mask = np.asarray(seg.dataobj)
        if mask.any():
            _assert_contrasts(np.stack(channels), mask)


@pytest.mark.parametrize("oblique", [False, True])
def test_dicom_series_geometry_tags_and_truth(tmp_path: Path, oblique: bool) -> None:
    out = make_dataset(tmp_path / "dicom", "dicom", cases=1, seed=6, size=SMALL["dicom"], oblique=oblique)
    case = out / "SYN_0001"
    assert sorted(p.name for p in case.iterdir()) == sorted(["SYN_0001_seg.nii.gz", *DICOM_FOLDERS.values()])
    direction = _rotation(12.0, 5.0) if oblique else np.eye(3)
    origin = np.array([-41.25, -58.5, 23.75]) if oblique else np.zeros(3)
    seg = sitk.ReadImage(str(case / "SYN_0001_seg.nii.gz"))
    mask = sitk.GetArrayFromImage(seg)
    assert set(np.unique(mask)) <= {0, 1} and mask.any()
    study_uids, frame_uids, series_uids = set(), set(), set()
    for channel in CHANNELS:
        folder = case / DICOM_FOLDERS[channel]
        assert sorted(p.name for p in folder.iterdir()) == [f"IM{k:04d}.dcm" for k in range(1, 9)]
        ds = pydicom.dcmread(folder / "IM0001.dcm")
        assert ds.file_meta.MediaStorageSOPClassUID == ds.SOPClassUID == pydicom.uid.MRImageStorage
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        assert ds.SeriesDescription == DICOM_SERIES[channel] and ds.Modality == "MR"
        assert str(ds.PatientName) == "SYNTH^0001" and ds.PatientID == "SYN_0001"
        assert ds.pixel_array.dtype == np.int16 and ds.RescaleSlope != 1
        study_uids.add(ds.StudyInstanceUID)
        frame_uids.add(ds.FrameOfReferenceUID)
        series_uids.add(ds.SeriesInstanceUID)

        series = _read_series(folder)
        assert series.GetSize() == (32, 32, 8)
        assert np.allclose(series.GetSpacing(), (0.9375, 0.9375, 3.0), atol=1e-6)
        assert np.allclose(series.GetOrigin(), origin, atol=1e-6)
        assert np.allclose(np.reshape(series.GetDirection(), (3, 3)), direction, atol=1e-8)
        # The truth lies in exactly the series' geometry (NIfTI stores it in float32).
        assert seg.GetSize() == series.GetSize()
        assert np.allclose(seg.GetSpacing(), series.GetSpacing(), atol=1e-5)
        assert np.allclose(seg.GetOrigin(), series.GetOrigin(), atol=1e-4)
        assert np.allclose(seg.GetDirection(), series.GetDirection(), atol=1e-6)
        if channel == "flair":  # and it overlays the tumour: FLAIR is bright inside it
            values = sitk.GetArrayFromImage(series)
            head = values > 100
            assert values[mask > 0].mean() > 1.4 * np.median(values[head & (mask == 0)])
    assert len(study_uids) == 1 and len(frame_uids) == 1 and len(series_uids) == 3


# --- reproducibility


@pytest.mark.parametrize("fmt", ["lgg", "pairs", "nifti", "dicom"])
def test_same_seed_same_bytes_other_seed_differs(tmp_path: Path, fmt: str) -> None:
    oblique = fmt in ("nifti", "dicom")
    first = _hashes(make_dataset(tmp_path / "a", fmt, cases=2, seed=11, size=SMALL[fmt], oblique=oblique))
    second = _hashes(make_dataset(tmp_path / "b" / "nested", fmt, cases=2, seed=11, size=SMALL[fmt], oblique=oblique))
    other = _hashes(make_dataset(tmp_path / "c", fmt, cases=2, seed=12, size=SMALL[fmt], oblique=oblique))
    assert len(first) > 5 and first == second
    changed = [name for name in first if name != "synth.json" and first[name] != other.get(name)]
    assert len(changed) > len(first) // 2


# --- never overwrite, repeat is a no-op


def test_refuses_non_empty_foreign_folder(tmp_path: Path) -> None:
    out = tmp_path / "user"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match="refusing to overwrite") as error:
        make_dataset(out, "lgg", cases=1, size=(16, 16, 4))
    assert str(out) in str(error.value)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"] and (out / "notes.txt").read_text() == "mine"
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(InputError, match="not a folder"):
        make_dataset(a_file, "lgg", cases=1, size=(16, 16, 4))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "user"]  # no temporary folder left behind


def test_refuses_dataset_with_other_settings_and_repeat_is_noop(tmp_path: Path) -> None:
    out = make_dataset(tmp_path / "data", "lgg", cases=2, seed=0, size=(16, 16, 4))
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    assert make_dataset(tmp_path / "data", "lgg", cases=2, seed=0, size=(16, 16, 4)) == out
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == stamps
    with pytest.raises(InputError, match="other settings"):
        make_dataset(out, "lgg", cases=2, seed=1, size=(16, 16, 4))
    with pytest.raises(InputError, match="other settings"):
        make_dataset(out, "pairs", cases=2, seed=0, size=(16, 16, 4))
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == stamps


def test_empty_existing_folder_is_filled(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    out = make_dataset(tmp_path / "empty", "lgg", cases=1, size=(16, 16))
    assert len(list((out / "SYN_0001").glob("*_mask.tif"))) == 16  # (x, y) keeps 16 slices per patient
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"fmt": "png"}, "png"),
        ({"fmt": "lgg", "cases": 0}, "cases"),
        ({"fmt": "lgg", "seed": -1}, "seed"),
        ({"fmt": "lgg", "oblique": True}, "oblique"),
        ({"fmt": "nifti", "size": (32, 32)}, "size"),
    ],
)
def test_rejects_bad_arguments(tmp_path: Path, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make_dataset(tmp_path / "out", **kwargs)
    assert not (tmp_path / "out").exists()


def test_default_dataset_made_once_under_env_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BRAINSEG_DATA_DIR", str(tmp_path / "cache"))
    out = default_dataset("pairs")
    assert out == tmp_path / "cache" / f"synth-v{GENERATOR_VERSION}-pairs-seed0"
    marker = json.loads((out / "synth.json").read_text())
    assert marker["seed"] == 0 and marker["cases"] == 12 and marker["format"] == "pairs"
    stamp = (out / "synth.json").stat().st_mtime_ns
    assert default_dataset("pairs") == out and (out / "synth.json").stat().st_mtime_ns == stamp
    assert default_dataset("pairs", root=tmp_path / "other") == tmp_path / "other" / f"synth-v{GENERATOR_VERSION}-pairs-seed0"
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [f"synth-v{GENERATOR_VERSION}-pairs-seed0"]


# --- cross-check through the project's reader


def test_reader_sees_synth_geometry_and_layout(tmp_path: Path) -> None:
    from brainseg_monai.io import SimpleITKReader

    lgg = make_dataset(tmp_path / "lgg", "lgg", cases=1, seed=1, size=(40, 32, 4))
    tif = lgg / "SYN_0001" / "SYN_0001_2.tif"
    array, _ = SimpleITKReader().get_data(SimpleITKReader().read(tif))
    assert array.shape == (40, 32, 3)  # ITK index order (x, y), RGB last
    assert np.array_equal(array, tifffile.imread(tif).transpose(1, 0, 2))

    dicom = make_dataset(tmp_path / "dicom", "dicom", cases=1, seed=6, size=SMALL["dicom"], oblique=True)
    reader = SimpleITKReader()
    series, series_meta = reader.get_data(reader.read(dicom / "SYN_0001" / "FLAIR"))
    seg, seg_meta = reader.get_data(reader.read(dicom / "SYN_0001" / "SYN_0001_seg.nii.gz"))
    assert series.shape == seg.shape == (32, 32, 8)
    assert np.allclose(series_meta["affine"], seg_meta["affine"], atol=1e-4)
    assert series[seg > 0].mean() > 1.4 * np.median(series[(series > 100) & (seg == 0)])
