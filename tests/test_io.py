"""The read path: every format against MONAI's ITKReader/NibabelReader, DICOM series handling, errors, writing back."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from conftest import shared_path
from monai.bundle import ConfigParser
from monai.data import ITKReader, NibabelReader
from monai.transforms import Compose, EnsureChannelFirst, EnsureChannelFirstd, LoadImage, LoadImaged
from PIL import Image as PILImage
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import ExplicitVRLittleEndian

from brainseg_monai.errors import InputError
from brainseg_monai.io import (
    SAFE_DICOM_TAGS,
    SimpleITKReader,
    check_image_values,
    find_dicom_series,
    read_header,
    read_sitk,
    select_series,
    to_sitk,
    write_image,
)

RNG_SEED = 7
PATIENT_TAGS = {"0010|0010": "Doe^Jane", "0010|0020": "PID-4711", "0010|0030": "19700101"}
TILT = 0.3  # radians about x: an oblique series
OBLIQUE = (1.0, 0.0, 0.0, 0.0, np.cos(TILT), -np.sin(TILT), 0.0, np.sin(TILT), np.cos(TILT))
UID = "1.2.826.0.1.3680043.2.1125"  # root for the test UIDs
STUDY_UID = f"{UID}.900"


def _image(array: np.ndarray, spacing=None, origin=None, direction=None, vector: bool = False) -> sitk.Image:
    image = sitk.GetImageFromArray(array, isVector=vector)
    if spacing is not None:
        image.SetSpacing(spacing)
    if origin is not None:
        image.SetOrigin(origin)
    if direction is not None:
        image.SetDirection(direction)
    return image


def write_dicom_series(
    folder: Path, volume: np.ndarray, uid: str, description: str, spacing=(0.8, 0.9, 2.5),
    origin=(10.0, -20.0, 30.0), direction=OBLIQUE, names: list[str] | None = None,
) -> sitk.Image:
    """One file per slice, written by SimpleITK with the geometry tags GDCM sorts and stacks by; returns the truth."""
    folder.mkdir(parents=True, exist_ok=True)
    truth = _image(volume, spacing, origin, direction)
    axes = np.asarray(direction).reshape(3, 3)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in range(volume.shape[0]):
        slice_k = truth[:, :, k]
        tags = {
            "0008|0060": "MR", "0020|000e": uid, "0020|000d": STUDY_UID, "0008|103e": description,
            "0020|0037": "\\".join(f"{v:.10f}" for v in (*axes[:, 0], *axes[:, 1])),
            "0020|0032": "\\".join(f"{v:.8f}" for v in truth.TransformIndexToPhysicalPoint((0, 0, k))),
            "0020|0013": str(k + 1), "0018|0050": str(spacing[2]), "0008|0018": f"{uid}.{k + 1}",
            **PATIENT_TAGS,
        }  # fmt: skip
        for key, value in tags.items():
            slice_k.SetMetaData(key, value)
        writer.SetFileName(str(folder / (names[k] if names else f"im{k:03d}.dcm")))
        writer.Execute(slice_k)
    return truth


def expected_affine(image: sitk.Image) -> np.ndarray:
    """RAS affine from first principles: LPS direction x spacing, origin; x and y negated."""
    dims = image.GetDimension()
    affine = np.eye(dims + 1)
    affine[:dims, :dims] = np.asarray(image.GetDirection()).reshape(dims, dims) @ np.diag(image.GetSpacing())
    affine[:dims, dims] = image.GetOrigin()
    affine[:2] *= -1
    return affine


def read_ours(path, **kwargs) -> tuple[np.ndarray, dict]:
    reader = SimpleITKReader(**kwargs)
    return reader.get_data(reader.read(path))


def read_itk(path, **kwargs) -> tuple[np.ndarray, dict]:
    reader = ITKReader(**kwargs)
    return reader.get_data(reader.read([str(p) for p in path] if isinstance(path, list) else str(path)))


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, tuple[Path, sitk.Image]]:
    """Small files of every readable format, each with the SimpleITK image it was written from."""
    root = tmp_path_factory.mktemp("formats")
    rng = np.random.default_rng(RNG_SEED)
    volume = rng.normal(100, 20, (5, 6, 7)).astype(np.float32)
    made = {
        "rgb.tif": _image(rng.integers(0, 256, (12, 10, 3), dtype=np.uint8), vector=True),
        "grey16.tif": _image(rng.integers(0, 65536, (12, 10), dtype=np.uint16)),
        "grey.png": _image(rng.integers(0, 256, (12, 10), dtype=np.uint8)),
        "rgb.png": _image(rng.integers(0, 256, (12, 10, 3), dtype=np.uint8), vector=True),
        "smooth.jpg": _image(np.tile(np.arange(0, 240, 20, dtype=np.uint8), (16, 1))),
        "grey.bmp": _image(rng.integers(0, 256, (12, 10), dtype=np.uint8)),
        "vol.nii": _image(volume, (0.8, 0.9, 2.5), (10.0, -20.0, 30.0), OBLIQUE),
        "vol.nii.gz": _image(volume, (0.8, 0.9, 2.5), (10.0, -20.0, 30.0), OBLIQUE),
        "vol.mha": _image(volume, (0.8, 0.9, 2.5), (10.0, -20.0, 30.0), OBLIQUE),
        "vol.nrrd": _image(volume, (0.8, 0.9, 2.5), (10.0, -20.0, 30.0), OBLIQUE),
    }
    out = {}
    for name, image in made.items():
        sitk.WriteImage(image, str(root / name))
        out[name] = (root / name, image)
    series = rng.integers(-200, 1200, (5, 6, 7)).astype(np.int16)
    names = [f"x{k}.dcm" for k in rng.permutation(5)]  # file names not in slice order
    truth = write_dicom_series(root / "series", series, f"{UID}.1", "AX T1", names=names)
    out["series"] = (root / "series", truth)
    single = root / "series" / names[2]
    out["single.dcm"] = (single, sitk.ReadImage(str(single)))
    return out


@pytest.fixture(scope="module")
def two_series(tmp_path_factory) -> Path:
    """A folder holding two series (T1 with 4 slices, FLAIR with 3)."""
    folder = tmp_path_factory.mktemp("two") / "study"
    rng = np.random.default_rng(RNG_SEED + 1)
    t1, flair = rng.integers(0, 500, (4, 6, 7)).astype(np.int16), rng.integers(0, 500, (3, 6, 7)).astype(np.int16)
    write_dicom_series(folder, t1, f"{UID}.11", "AX T1 PRE", names=[f"a{k}.dcm" for k in range(4)])
    write_dicom_series(folder, flair, f"{UID}.12", "AX FLAIR", names=[f"b{k}.dcm" for k in range(3)])
    return folder


FORMATS = ["rgb.tif", "grey16.tif", "grey.png", "rgb.png", "smooth.jpg", "grey.bmp",
           "vol.nii", "vol.nii.gz", "vol.mha", "vol.nrrd", "series", "single.dcm"]  # fmt: skip


@pytest.mark.parametrize("name", FORMATS)
def test_each_format_matches_itkreader_and_truth(files, name):
    path, truth = files[name]
    array, meta = read_ours(path)
    itk_array, itk_meta = read_itk(path)
    np.testing.assert_array_equal(array, itk_array)
    assert array.dtype == itk_array.dtype
    np.testing.assert_allclose(meta["affine"], itk_meta["affine"], atol=1e-6)
    np.testing.assert_array_equal(meta["spatial_shape"], itk_meta["spatial_shape"])
    assert np.isnan(meta["original_channel_dim"]) == np.isnan(itk_meta["original_channel_dim"])
    np.testing.assert_allclose(meta["affine"], expected_affine(truth), atol=1e-5)
    on_disk = sitk.GetArrayFromImage(truth)
    written = on_disk.T if truth.GetNumberOfComponentsPerPixel() == 1 else np.moveaxis(on_disk.T, 0, -1)
    if name.endswith(".jpg"):  # lossy: close to what was written
        assert np.abs(array.astype(int) - written).mean() < 2
    elif name.endswith(".bmp"):  # SimpleITK writes grey BMP with a palette; ITK reads it back as RGB
        np.testing.assert_array_equal(array, np.repeat(written[..., None], 3, axis=-1))
    else:
        np.testing.assert_array_equal(array, written)
    assert meta["filename_or_obj"] == str(path)
    np.testing.assert_allclose(meta["spacing"], truth.GetSpacing())


@pytest.mark.parametrize("name", ["vol.nii", "vol.nii.gz"])
def test_nifti_matches_nibabel(files, name):
    path, _ = files[name]
    array, meta = read_ours(path)
    reader = NibabelReader()
    nib_array, nib_meta = reader.get_data(reader.read(str(path)))
    np.testing.assert_array_equal(array, nib_array)
    np.testing.assert_allclose(meta["affine"], nib_meta["affine"], atol=1e-5)


def test_nifti_affine_written_by_nibabel(tmp_path):
    rotation, _ = np.linalg.qr(np.random.default_rng(RNG_SEED).normal(size=(3, 3)))
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag([0.9, 1.2, 2.0])
    affine[:3, 3] = (40.0, -30.0, 12.0)
    data = np.random.default_rng(RNG_SEED).integers(0, 1000, (6, 5, 4)).astype(np.int16)
    path = tmp_path / "nib.nii.gz"
    nib.save(nib.Nifti1Image(data, affine), path)
    array, meta = read_ours(path)
    np.testing.assert_array_equal(array, data)
    np.testing.assert_allclose(meta["affine"], affine, atol=1e-5)


def test_rgb_tif_is_three_channels_first(files):
    path, truth = files["rgb.tif"]
    image = LoadImage(reader=SimpleITKReader(), image_only=True, ensure_channel_first=True)(path)
    assert tuple(image.shape) == (3, 10, 12)
    np.testing.assert_array_equal(image[1].numpy(), sitk.GetArrayFromImage(truth)[..., 1].T)


def test_reverse_indexing_means_what_it_means_in_monai(files):
    path, truth = files["vol.nii.gz"]
    array, _ = read_ours(path, reverse_indexing=True)
    np.testing.assert_array_equal(array, sitk.GetArrayFromImage(truth))
    np.testing.assert_array_equal(array, read_itk(path, reverse_indexing=True)[0])


def test_sequence_of_files_is_stacked_as_channels(files, tmp_path):
    path, truth = files["vol.nii.gz"]
    doubled = tmp_path / "doubled.nii.gz"
    sitk.WriteImage(truth * 2, str(doubled))
    array, meta = read_ours([path, doubled])
    itk_array, itk_meta = read_itk([path, doubled])
    assert array.shape == (2, 7, 6, 5)
    np.testing.assert_array_equal(array, itk_array)
    np.testing.assert_array_equal(array[1], 2 * array[0])
    assert meta["original_channel_dim"] == itk_meta["original_channel_dim"] == 0


def test_loadimaged_in_compose(files):
    image_path, _ = files["vol.nii.gz"]
    label_path, _ = files["vol.mha"]
    keys = ["image", "label"]
    pipeline = Compose([LoadImaged(keys, reader=SimpleITKReader()), EnsureChannelFirstd(keys)])
    out = pipeline({"image": str(image_path), "label": str(label_path)})
    assert tuple(out["image"].shape) == tuple(out["label"].shape) == (1, 7, 6, 5)
    np.testing.assert_allclose(out["image"].affine.numpy(), expected_affine(files["vol.nii.gz"][1]), atol=1e-5)
    assert out["image"].meta["filename_or_obj"] == str(image_path)


@pytest.mark.parametrize(
    "reader",
    ["$brainseg_monai.io.SimpleITKReader", {"_target_": "brainseg_monai.io.SimpleITKReader", "series_description": "T1"}],
)
def test_reader_from_bundle_config(files, reader):
    config = {
        "imports": ["$import brainseg_monai", "$import brainseg_monai.io"],  # what a bundle config needs for "$..."
        "load": {"_target_": "LoadImaged", "keys": ["image"], "reader": reader, "image_only": True},
    }
    parser = ConfigParser(config)
    load = parser.get_parsed_content("load")
    out = load({"image": str(files["series"][0])})
    assert tuple(out["image"].shape) == (7, 6, 5)
    assert out["image"].meta["SeriesInstanceUID"] == f"{UID}.1"  # our reader, not ITKReader


@pytest.mark.parametrize("name", ["series", "single.dcm"])
def test_dicom_meta_has_safe_tags_only(files, name):
    array, meta = read_ours(files[name][0])
    assert meta["Modality"] == "MR"
    assert meta["SeriesDescription"] == "AX T1"
    assert meta["SeriesInstanceUID"] == f"{UID}.1"
    assert meta["StudyInstanceUID"] == STUDY_UID
    text = json.dumps({k: str(v) for k, v in meta.items()})
    for tag, value in PATIENT_TAGS.items():
        assert tag not in text and value not in text
    assert set(read_sitk(files[name][0]).GetMetaDataKeys()) == set(SAFE_DICOM_TAGS)
    assert not any(key.startswith("0010|") for key in meta)


def test_non_dicom_meta_has_no_tags(files):
    _, meta = read_ours(files["vol.nii.gz"][0])
    assert not set(SAFE_DICOM_TAGS) & set(meta)


def test_series_files_are_in_slice_order(files):
    (series,) = find_dicom_series(files["series"][0])
    assert series.description == "AX T1" and series.modality == "MR" and series.study_uid == STUDY_UID
    positions = [sitk.ReadImage(f).GetOrigin() for f in series.files]
    normal = np.asarray(OBLIQUE).reshape(3, 3)[:, 2]
    heights = [float(np.dot(p, normal)) for p in positions]
    assert heights == sorted(heights) and len(heights) == 5


@pytest.mark.parametrize("damage", ["missing slice", "different image at one position"])
def test_unevenly_spaced_series_is_refused_naming_the_gap(tmp_path, damage):
    """SimpleITK would stack it with one spacing and misplace every slice after the gap; the reader refuses it."""
    volume = np.random.default_rng(RNG_SEED).integers(0, 500, (6, 5, 4)).astype(np.int16)
    folder = tmp_path / "series"
    write_dicom_series(folder, volume, f"{UID}.31", "AX T2")
    assert read_sitk(folder).GetSize() == (4, 5, 6)  # intact: read
    if damage == "missing slice":
        (folder / "im002.dcm").unlink()
        reason, pieces = "not evenly spaced", ("im001.dcm", "im003.dcm", "5 mm", "2.5 mm")
    else:  # a second echo or a repeated acquisition at the position of im002
        header = pydicom.dcmread(folder / "im003.dcm")
        header.ImagePositionPatient = pydicom.dcmread(folder / "im002.dcm").ImagePositionPatient
        header.save_as(folder / "im003.dcm")
        reason, pieces = "different images at one slice position", ("im002.dcm", "im003.dcm")
    with pytest.raises(InputError, match=reason) as error:
        read_sitk(folder)
    for piece in (str(folder), *pieces):
        assert piece in str(error.value)


def test_two_series_need_a_choice(two_series):
    found = find_dicom_series(two_series)
    assert sorted((s.description, len(s.files)) for s in found) == [("AX FLAIR", 3), ("AX T1 PRE", 4)]
    with pytest.raises(InputError) as error:
        read_sitk(two_series)
    message = str(error.value)
    assert str(two_series) in message
    for piece in (f"{UID}.11", f"{UID}.12", "AX FLAIR", "AX T1 PRE", "(3 files)", "(4 files)"):
        assert piece in message
    assert read_sitk(two_series, series_uid=f"{UID}.12").GetSize() == (7, 6, 3)
    assert read_sitk(two_series, series_description="flair").GetSize() == (7, 6, 3)
    assert select_series(two_series, series_description=r"T1\b").series_uid.endswith(".11")
    array, meta = read_ours(two_series, series_description="^AX T1")
    assert array.shape == (7, 6, 4) and meta["SeriesDescription"] == "AX T1 PRE"


@pytest.mark.parametrize(
    "choice, reason",
    [({"series_uid": "1.2.3"}, "no DICOM series matches"), ({"series_description": "^AX"}, "2 DICOM series match"),
     ({"series_description": "FLAIR", "series_uid": f"{UID}.11"}, "no DICOM series matches")],
)  # fmt: skip
def test_series_choice_matching_none_or_several(two_series, choice, reason):
    with pytest.raises(InputError, match=reason) as error:
        read_sitk(two_series, **choice)
    assert str(two_series) in str(error.value)


def test_recursive_discovery_of_a_study_tree(tmp_path, files, two_series):
    root = tmp_path / "tree"
    volume = np.zeros((2, 4, 4), np.int16)
    write_dicom_series(root / "p1" / "t1", volume, f"{UID}.21", "T1")
    write_dicom_series(root / "p2" / "mixed", volume, f"{UID}.22", "T1")
    write_dicom_series(root / "p2" / "mixed", volume + 1, f"{UID}.23", "FLAIR", names=["f0.dcm", "f1.dcm"])
    (root / "p2" / "notes.txt").write_text("not an image")
    found = find_dicom_series(root, recursive=True)
    assert [(s.folder.relative_to(root).as_posix(), s.series_uid[-2:]) for s in found] in (
        [("p1/t1", "21"), ("p2/mixed", "22"), ("p2/mixed", "23")],
        [("p1/t1", "21"), ("p2/mixed", "23"), ("p2/mixed", "22")],
    )
    assert find_dicom_series(root) == []
    with pytest.raises(InputError, match="subfolders"):
        read_sitk(root)


def test_non_image_dicom_beside_a_series_is_ignored(tmp_path):
    folder = tmp_path / "series"
    truth = write_dicom_series(folder, np.arange(60, dtype=np.int16).reshape(3, 4, 5), f"{UID}.31", "T1")
    report = Dataset()
    report.SOPClassUID = "1.2.840.10008.5.1.4.1.1.88.11"  # Basic Text SR: not a slice
    report.SOPInstanceUID = f"{UID}.32"
    report.SeriesInstanceUID = f"{UID}.33"
    report.file_meta = FileMetaDataset()
    report.file_meta.MediaStorageSOPClassUID = report.SOPClassUID
    report.file_meta.MediaStorageSOPInstanceUID = report.SOPInstanceUID
    report.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    report.save_as(folder / "report.dcm", enforce_file_format=True)
    (series,) = find_dicom_series(folder)
    assert series.broken == [] and len(series.files) == 3
    np.testing.assert_array_equal(sitk.GetArrayFromImage(read_sitk(folder)), sitk.GetArrayFromImage(truth))


@pytest.mark.parametrize("name", FORMATS)
def test_read_header_matches_the_image(files, name):
    path, _ = files[name]
    image = read_sitk(path)
    header = read_header(path)
    assert header.size == image.GetSize()
    np.testing.assert_allclose(header.spacing, image.GetSpacing(), atol=1e-6)
    np.testing.assert_allclose(header.origin, image.GetOrigin(), atol=1e-6)
    np.testing.assert_allclose(header.direction, image.GetDirection(), atol=1e-6)
    assert header.components == image.GetNumberOfComponentsPerPixel()
    assert header.pixel_type == sitk.GetArrayViewFromImage(image).dtype.name


def _truncate(source: Path, target: Path, fraction: float = 0.5) -> Path:
    data = source.read_bytes()
    target.write_bytes(data[: int(len(data) * fraction)])
    return target


def _bad_inputs(tmp: Path, files, two_series) -> dict[str, tuple[Path, str]]:
    (tmp / "empty_dir").mkdir()
    (tmp / "no_dicom").mkdir()
    (tmp / "no_dicom" / "readme.txt").write_text("hello")
    (tmp / "empty.png").write_bytes(b"")
    (tmp / "random.nii.gz").write_bytes(np.random.default_rng(0).bytes(2000))
    (tmp / "notes.xyz").write_text("x")
    broken_series = tmp / "broken_series"
    broken_series.mkdir()
    series_files = sorted(files["series"][0].iterdir())
    for f in series_files[1:]:
        (broken_series / f.name).write_bytes(f.read_bytes())
    _truncate(series_files[0], broken_series / series_files[0].name, 0.7)
    return {
        "missing": (tmp / "missing.nii.gz", "no such file"),
        "suffix": (tmp / "notes.xyz", "unsupported file type"),
        "empty file": (tmp / "empty.png", "empty"),
        "empty folder": (tmp / "empty_dir", "folder is empty"),
        "no dicom": (tmp / "no_dicom", "no DICOM series"),
        "half png": (_truncate(files["grey.png"][0], tmp / "half.png"), "corrupt or truncated"),
        "random nii.gz": (tmp / "random.nii.gz", "corrupt gzip"),
        "half nii": (_truncate(files["vol.nii"][0], tmp / "half.nii", 0.8), "truncated NIfTI"),
        "half nii.gz": (_truncate(files["vol.nii.gz"][0], tmp / "half.nii.gz", 0.8), "truncated gzip"),
        "half jpg": (_truncate(files["smooth.jpg"][0], tmp / "half.jpg", 0.8), "truncated"),
        "half bmp": (_truncate(files["grey.bmp"][0], tmp / "half.bmp", 0.8), "truncated"),
        "half tif": (_truncate(files["rgb.tif"][0], tmp / "half.tif"), "cannot read"),
        "half mha": (_truncate(files["vol.mha"][0], tmp / "half.mha"), "cannot read"),
        "truncated slice": (broken_series, "unreadable DICOM file"),
        "several series": (two_series, "holds 2 DICOM series"),
    }


BAD = ["missing", "suffix", "empty file", "empty folder", "no dicom", "half png", "random nii.gz", "half nii",
       "half nii.gz", "half jpg", "half bmp", "half tif", "half mha", "truncated slice", "several series"]  # fmt: skip


@pytest.mark.parametrize("case", BAD)
def test_bad_input_raises_input_error_naming_the_path(tmp_path, files, two_series, case):
    path, reason = _bad_inputs(tmp_path, files, two_series)[case]
    for read in (read_sitk, SimpleITKReader().read):
        with pytest.raises(InputError, match=reason) as error:
            read(path)
        assert str(path) in str(error.value)


def test_reader_arguments_are_checked():
    with pytest.raises(ValueError, match="channel_dim"):
        SimpleITKReader(channel_dim="last")
    with pytest.raises(ValueError, match="series_description"):
        SimpleITKReader(series_description="(unclosed")
    with pytest.raises(ValueError, match="pixel"):
        SimpleITKReader(pixel_type="float")


def test_verify_suffix(files, tmp_path):
    reader = SimpleITKReader()
    assert reader.verify_suffix([files["vol.nii.gz"][0], files["series"][0], files["single.dcm"][0]])
    assert not reader.verify_suffix(tmp_path / "table.csv")


def test_output_pixel_type(files):
    array, _ = read_ours(files["grey.png"][0], output_pixel_type=sitk.sitkFloat32)
    assert array.dtype == np.float32


def test_check_image_values():
    check_image_values(np.full((4, 4), 7.0), "blank.png")  # constant slices are legitimate
    check_image_values(np.arange(4, dtype=np.int16), "ints.nii")
    with pytest.raises(InputError, match="blank.nii: contains NaN values"):
        check_image_values(np.array([1.0, np.nan]), "blank.nii")
    with pytest.raises(InputError, match="infinite"):
        check_image_values(np.array([1.0, np.inf]), "inf.nii")


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".mha", ".nrrd"])
def test_volume_round_trip_keeps_geometry(files, tmp_path, suffix):
    source = files["vol.nii.gz"][0]
    array, meta = read_ours(source)
    out = write_image(array, meta["affine"], tmp_path / f"copy{suffix}", reference=source)
    again, again_meta = read_ours(out)
    np.testing.assert_array_equal(again, array)
    np.testing.assert_allclose(again_meta["affine"], meta["affine"], atol=1e-5)
    assert [p.name for p in tmp_path.iterdir()] == [out.name]  # no temporary file left behind


def test_channel_first_round_trip(files, tmp_path):
    path, _ = files["vol.nii.gz"]
    stacked = LoadImage(reader=SimpleITKReader(), image_only=True, ensure_channel_first=True)([path, path])
    out = write_image(stacked, stacked.affine, tmp_path / "two.nii.gz")
    again = EnsureChannelFirst()(LoadImage(reader=SimpleITKReader(), image_only=True)(out))
    np.testing.assert_array_equal(again.numpy(), stacked.numpy())
    np.testing.assert_allclose(again.affine.numpy(), stacked.affine.numpy(), atol=1e-5)


@pytest.mark.parametrize("name, suffix", [("grey.png", ".png"), ("rgb.tif", ".tif"), ("grey16.tif", ".tif")])
def test_2d_round_trip(files, tmp_path, name, suffix):
    load = LoadImage(reader=SimpleITKReader(), image_only=True, ensure_channel_first=True, dtype=None)
    image = load(files[name][0])
    on_disk = image.numpy().astype(sitk.GetArrayViewFromImage(files[name][1]).dtype)  # torch has no uint16: int32
    out = write_image(on_disk, image.affine, tmp_path / f"out{suffix}")
    again = load(out)
    assert again.dtype == image.dtype
    np.testing.assert_array_equal(again.numpy(), image.numpy())


def test_dicom_series_round_trip_and_mask_in_series_geometry(files, tmp_path):
    source, truth = files["series"]
    array, meta = read_ours(source)
    out = write_image(array, meta["affine"], tmp_path / "series.nii.gz")
    again, again_meta = read_ours(out)
    np.testing.assert_array_equal(again, array)
    np.testing.assert_allclose(again_meta["affine"], meta["affine"], atol=1e-4)
    mask = write_image((array > 500).astype(np.uint8), meta["affine"], tmp_path / "mask.nii.gz")
    loaded = sitk.ReadImage(str(mask))
    assert loaded.GetSize() == truth.GetSize()
    np.testing.assert_allclose(loaded.GetSpacing(), truth.GetSpacing(), atol=1e-4)
    np.testing.assert_allclose(loaded.GetOrigin(), truth.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(loaded.GetDirection(), truth.GetDirection(), atol=1e-4)


def test_to_sitk_places_voxels_where_the_affine_says(files):
    path, truth = files["vol.nii.gz"]
    array, meta = read_ours(path)
    image = to_sitk(array, meta["affine"])
    index = (3, 2, 4)
    ras = meta["affine"] @ np.array([*index, 1.0])
    lps = ras[:3] * np.array([-1, -1, 1])
    np.testing.assert_allclose(image.TransformIndexToPhysicalPoint(index), lps, atol=1e-5)
    assert image[index] == array[index]


def test_write_refuses_its_input_and_bad_arguments(files, tmp_path):
    source = tmp_path / "input.nii.gz"
    source.write_bytes(files["vol.nii.gz"][0].read_bytes())
    before = source.read_bytes()
    array, meta = read_ours(source)
    with pytest.raises(InputError, match="refusing to overwrite") as error:
        write_image(array, meta["affine"], tmp_path / "." / "input.nii.gz", reference=source)
    assert str(tmp_path) in str(error.value)
    assert source.read_bytes() == before
    with pytest.raises(ValueError, match="path must end with"):
        write_image(array, meta["affine"], tmp_path / "out.jpg")
    with pytest.raises(ValueError, match="2D uint8"):
        write_image(array, meta["affine"], tmp_path / "out.png")
    sheared = meta["affine"].copy()
    sheared[0, 1] = 0.5
    with pytest.raises(ValueError, match="shear"):
        write_image(array, sheared, tmp_path / "out.nii.gz")
    with pytest.raises(ValueError, match="spatial axes"):
        write_image(array[None, None], meta["affine"], tmp_path / "out.nii.gz")


def test_write_replaces_an_existing_output(files, tmp_path):
    array, meta = read_ours(files["vol.nii.gz"][0])
    out = tmp_path / "mask.nii.gz"
    write_image(np.zeros(array.shape, np.uint8), meta["affine"], out)
    write_image(np.ones(array.shape, np.uint8), meta["affine"], out)
    assert read_ours(out)[0].min() == 1
    assert [p.name for p in tmp_path.iterdir()] == ["mask.nii.gz"]
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    assert out.stat().st_mode & 0o777 == plain.stat().st_mode & 0o777  # permissions like any new file


# ---- encodings, multi-frame files, repeated slices, NaN in NIfTI, size limits ----


def pydicom_test_file(name: str) -> Path:
    """A file of pydicom's test data, never downloaded: the MR_small* files ship in pydicom's wheel, the others
    (the pydicom-data package) are used only when already cached, else the test is skipped with the reason."""
    found = get_testdata_file(name, download=False)
    if found is None:
        pytest.skip(f"pydicom test file {name} is not available offline")
    return Path(found)


@pytest.fixture(scope="module")
def jpeg_lossless(tmp_path_factory) -> Path:
    """MR_small.dcm in JPEG lossless (process 14, first-order prediction), encoded by GDCM: pydicom ships no MR
    file in that syntax (its JPEG-LL.dcm is a CT, downloaded on demand)."""
    path = tmp_path_factory.mktemp("jpeg") / "MR_small_jpeg_lossless.dcm"
    writer = sitk.ImageFileWriter()
    writer.SetFileName(str(path))
    writer.SetImageIO("GDCMImageIO")
    writer.SetCompressor("JPEG")
    writer.UseCompressionOn()
    writer.KeepOriginalImageUIDOn()
    writer.Execute(sitk.ReadImage(str(pydicom_test_file("MR_small.dcm"))))
    return path


LOSSLESS = {
    "MR_small_bigendian.dcm": pydicom.uid.ExplicitVRBigEndian,
    "MR_small_expb.dcm": pydicom.uid.ExplicitVRBigEndian,
    "MR_small_implicit.dcm": pydicom.uid.ImplicitVRLittleEndian,
    "MR_small_RLE.dcm": pydicom.uid.RLELossless,
    "MR_small_jpeg_ls_lossless.dcm": pydicom.uid.JPEGLSLossless,
    "MR_small_jp2klossless.dcm": pydicom.uid.JPEG2000Lossless,
    "jpeg lossless": pydicom.uid.JPEGLosslessSV1,
}


@pytest.mark.parametrize("as_series", [False, True], ids=["file", "one-file series"])
@pytest.mark.parametrize("name", list(LOSSLESS))
def test_lossless_encodings_read_like_the_uncompressed_file(tmp_path, jpeg_lossless, name, as_series):
    reference = pydicom_test_file("MR_small.dcm")
    source = jpeg_lossless if name == "jpeg lossless" else pydicom_test_file(name)
    assert pydicom.dcmread(source, stop_before_pixels=True).file_meta.TransferSyntaxUID == LOSSLESS[name]
    path = source
    if as_series:
        path = tmp_path / "series"
        path.mkdir()
        shutil.copy(source, path / source.name)
    truth = pydicom.dcmread(reference).pixel_array  # (rows, columns), decoded by pydicom, not by GDCM
    array, meta = read_ours(path)
    _, reference_meta = read_ours(reference)
    assert array.shape == (64, 64, 1) and array.dtype == np.int16
    np.testing.assert_array_equal(array[..., 0], truth.T)
    np.testing.assert_allclose(meta["affine"], reference_meta["affine"], atol=1e-6)
    assert meta["Modality"] == "MR"


def _relabel(source: Path, target: Path, syntax: str) -> Path:
    dataset = pydicom.dcmread(source)
    dataset.file_meta.TransferSyntaxUID = syntax
    pydicom.dcmwrite(target, dataset, implicit_vr=False, little_endian=True, force_encoding=True)
    return target


def test_undecodable_pixel_data_names_the_transfer_syntax(tmp_path):
    """GDCM says "Unable to determine ImageIO reader" or "Failed to change to Implicit Transfer Syntax"; the user
    needs the encoding and a way out."""
    jpeg_2000 = pydicom_test_file("MR_small_jp2klossless.dcm")
    jpeg_xl = _relabel(jpeg_2000, tmp_path / "jpeg_xl.dcm", "1.2.840.10008.1.2.4.112")  # a syntax GDCM lacks
    corrupt = pydicom.dcmread(jpeg_2000)
    corrupt.PixelData = corrupt.PixelData[: len(corrupt.PixelData) // 2].ljust(len(corrupt.PixelData), b"\0")
    corrupt.save_as(tmp_path / "corrupt_j2k.dcm")
    cases = {jpeg_xl: "1.2.840.10008.1.2.4.112", tmp_path / "corrupt_j2k.dcm": "JPEG 2000 Image Compression"}
    for path, syntax in cases.items():
        for read in (read_sitk, SimpleITKReader().read):
            with pytest.raises(InputError, match="transfer syntax") as error:
                read(path)
            for piece in (str(path), syntax, "gdcmconv --raw"):
                assert piece in str(error.value)


ENHANCED_MR = "1.2.840.10008.5.1.4.1.1.4.1"


def write_enhanced_mr(
    path: Path, volume: np.ndarray, frame_order=None, positions=None, slopes=None, spacing=(0.8, 0.9, 2.5),
    origin=(10.0, -20.0, 30.0), direction=OBLIQUE,
) -> sitk.Image:
    """An Enhanced MR file holding `volume` (slices, rows, columns) as frames in `frame_order` (slice indices,
    default slice order), each frame placed by its PlanePositionSequence (or `positions`, one per frame); returns
    the truth in slice order."""
    truth = _image(volume, spacing, origin, direction)
    order = list(range(volume.shape[0])) if frame_order is None else list(frame_order)
    axes = np.asarray(direction).reshape(3, 3)
    dataset = Dataset()
    dataset.SOPClassUID = ENHANCED_MR
    dataset.SOPInstanceUID = f"{UID}.51"
    dataset.SeriesInstanceUID = f"{UID}.52"
    dataset.StudyInstanceUID = STUDY_UID
    dataset.Modality = "MR"
    dataset.SeriesDescription = "3D T1 enhanced"
    dataset.Rows, dataset.Columns, dataset.NumberOfFrames = volume.shape[1], volume.shape[2], len(order)
    dataset.SamplesPerPixel, dataset.PhotometricInterpretation = 1, "MONOCHROME2"
    dataset.BitsAllocated, dataset.BitsStored, dataset.HighBit, dataset.PixelRepresentation = 16, 16, 15, 1
    measures, orientation = Dataset(), Dataset()
    measures.PixelSpacing = [spacing[1], spacing[0]]  # row spacing (y), column spacing (x)
    orientation.ImageOrientationPatient = [float(v) for v in (*axes[:, 0], *axes[:, 1])]
    shared = Dataset()
    shared.PixelMeasuresSequence = DicomSequence([measures])
    shared.PlaneOrientationSequence = DicomSequence([orientation])
    dataset.SharedFunctionalGroupsSequence = DicomSequence([shared])
    frames = []
    for n, k in enumerate(order):
        frame, plane = Dataset(), Dataset()
        where = truth.TransformIndexToPhysicalPoint((0, 0, k)) if positions is None else positions[n]
        plane.ImagePositionPatient = [float(v) for v in where]
        frame.PlanePositionSequence = DicomSequence([plane])
        if slopes is not None:
            rescale = Dataset()
            rescale.RescaleSlope, rescale.RescaleIntercept, rescale.RescaleType = slopes[n], 0, "US"
            frame.PixelValueTransformationSequence = DicomSequence([rescale])
        frames.append(frame)
    dataset.PerFrameFunctionalGroupsSequence = DicomSequence(frames)
    dataset.PixelData = volume[order].astype(np.int16).tobytes()
    dataset.file_meta = FileMetaDataset()
    dataset.file_meta.MediaStorageSOPClassUID = ENHANCED_MR
    dataset.file_meta.MediaStorageSOPInstanceUID = dataset.SOPInstanceUID
    dataset.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    path.parent.mkdir(parents=True, exist_ok=True)
    dataset.save_as(path, enforce_file_format=True)
    return truth


@pytest.mark.parametrize("as_series", [False, True], ids=["file", "folder"])
@pytest.mark.parametrize("frame_order", [None, (2, 0, 3, 1)], ids=["in slice order", "shuffled"])
def test_enhanced_mr_frames_are_placed_by_their_positions(tmp_path, frame_order, as_series):
    """GDCM stacks frames in file order and, unless they happen to ascend, gives 1 mm spacing and the first frame's
    position as origin; the reader places each frame by its PlanePositionSequence."""
    volume = np.random.default_rng(RNG_SEED).integers(0, 900, (4, 5, 6)).astype(np.int16)
    path = tmp_path / "enhanced" / "emr.dcm"
    truth = write_enhanced_mr(path, volume, frame_order)
    if as_series:
        path = path.parent
    image = read_sitk(path)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), volume)
    np.testing.assert_allclose(image.GetSpacing(), truth.GetSpacing(), atol=1e-6)
    np.testing.assert_allclose(image.GetOrigin(), truth.GetOrigin(), atol=1e-6)
    np.testing.assert_allclose(image.GetDirection(), truth.GetDirection(), atol=1e-6)
    array, meta = read_ours(path)
    np.testing.assert_allclose(meta["affine"], expected_affine(truth), atol=1e-5)
    assert meta["SeriesDescription"] == "3D T1 enhanced" and array.shape == (6, 5, 4)
    header = read_header(path)
    assert header.size == (6, 5, 4)
    np.testing.assert_allclose(header.spacing, truth.GetSpacing(), atol=1e-6)
    np.testing.assert_allclose(header.origin, truth.GetOrigin(), atol=1e-6)
    np.testing.assert_allclose(header.direction, truth.GetDirection(), atol=1e-6)


def _slice_point(k: float) -> tuple[float, ...]:
    """Where slice `k` of `write_enhanced_mr`'s default geometry lies."""
    grid = _image(np.zeros((8, 5, 6)), (0.8, 0.9, 2.5), (10.0, -20.0, 30.0), OBLIQUE)
    return grid.TransformContinuousIndexToPhysicalPoint((0, 0, k))


ENHANCED_REFUSED = {
    "two echoes per slice": ({"positions": [_slice_point(k // 2) for k in range(4)]}, "2 distinct positions: several frames per slice"),
    "a missing frame": ({"positions": [_slice_point(k) for k in (0, 1, 2, 4)]}, "not evenly spaced"),
    "rescale per frame": ({"slopes": [1, 2, 3, 4]}, "differ in rescale"),
    "a position of two numbers": (
        {"positions": [_slice_point(0), (1.0, 2.0), _slice_point(2), _slice_point(3)]}, "wrong number of elements"
    ),
}


@pytest.mark.parametrize("case", list(ENHANCED_REFUSED))
def test_enhanced_mr_that_is_not_one_stack_is_refused(tmp_path, case):
    options, reason = ENHANCED_REFUSED[case]
    volume = np.random.default_rng(RNG_SEED).integers(0, 900, (4, 5, 6)).astype(np.int16)
    path = tmp_path / "emr.dcm"
    write_enhanced_mr(path, volume, **options)
    for read in (read_sitk, SimpleITKReader().read, read_header):
        with pytest.raises(InputError, match=reason) as error:
            read(path)
        for piece in (str(path), "Enhanced MR Image multi-frame file with 4 frames", "classic single-frame images"):
            assert piece in str(error.value)


def test_multi_frame_without_frame_positions_is_refused(tmp_path):
    volume = np.zeros((3, 5, 6), np.int16)
    path = tmp_path / "emr.dcm"
    write_enhanced_mr(path, volume)
    dataset = pydicom.dcmread(path)
    for frame in dataset.PerFrameFunctionalGroupsSequence:
        del frame.PlanePositionSequence
    dataset.save_as(path)
    with pytest.raises(InputError, match="frame 1 has no position") as error:
        read_sitk(path)
    assert str(path) in str(error.value)


@pytest.mark.parametrize("copy", ["the same file twice", "same position and pixels, another SOPInstanceUID"])
def test_exact_copies_of_a_slice_are_left_out(tmp_path, caplog, copy):
    """GDCM falls back to file-name order when two files share a position; copies are dropped, the rest read."""
    volume = np.random.default_rng(RNG_SEED).integers(0, 500, (6, 5, 4)).astype(np.int16)
    folder = tmp_path / "series"
    truth = write_dicom_series(folder, volume, f"{UID}.41", "AX T2")
    duplicate = pydicom.dcmread(folder / "im002.dcm")
    if copy != "the same file twice":
        duplicate.SOPInstanceUID = f"{UID}.41.99"
    duplicate.save_as(folder / "aa_copy.dcm")  # first by name
    shutil.copy(folder / "im004.dcm", folder / "zz_copy.dcm")  # last by name
    with caplog.at_level(logging.WARNING, logger="brainseg_monai.io"):
        image = read_sitk(folder)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), volume)
    np.testing.assert_allclose(image.GetSpacing(), truth.GetSpacing(), atol=1e-6)
    np.testing.assert_allclose(image.GetOrigin(), truth.GetOrigin(), atol=1e-6)
    np.testing.assert_allclose(image.GetDirection(), truth.GetDirection(), atol=1e-6)
    warnings = [r.getMessage() for r in caplog.records if "is a copy of" in r.getMessage()]
    assert len(warnings) == 2
    assert any("aa_copy.dcm" in w and "im002.dcm" in w for w in warnings)
    assert any("zz_copy.dcm is a copy of im004.dcm" in w for w in warnings)


@pytest.mark.parametrize("thickness", [None, "1.0"], ids=["missing", "thinner than the spacing"])
def test_series_spacing_comes_from_positions_not_slice_thickness(tmp_path, thickness):
    volume = np.random.default_rng(RNG_SEED).integers(0, 500, (5, 5, 4)).astype(np.int16)
    folder = tmp_path / "series"
    truth = write_dicom_series(folder, volume, f"{UID}.43", "AX T2", spacing=(0.8, 0.9, 3.0))
    for path in folder.iterdir():
        dataset = pydicom.dcmread(path)
        if thickness is None:
            del dataset.SliceThickness
        else:
            dataset.SliceThickness = thickness
        dataset.save_as(path)
    image = read_sitk(folder)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), volume)
    np.testing.assert_allclose(image.GetSpacing(), truth.GetSpacing(), atol=1e-6)
    np.testing.assert_allclose(read_header(folder).spacing, truth.GetSpacing(), atol=1e-6)


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf], ids=["nan", "inf", "-inf"])
def test_nan_and_inf_in_nifti_are_refused_like_check_image_values(tmp_path, suffix, bad):
    data = np.arange(60, dtype=np.float32).reshape(5, 4, 3)
    data[1, 2, 0] = bad
    path = tmp_path / f"bad{suffix}"
    nib.save(nib.Nifti1Image(data, np.eye(4)), path)
    assert np.isfinite(sitk.GetArrayFromImage(sitk.ReadImage(str(path)))).all()  # ITK hides them (as 0)
    with pytest.raises(InputError) as expected:
        check_image_values(data, path)
    for read in (read_sitk, SimpleITKReader().read):
        with pytest.raises(InputError) as error:
            read(path)
        assert str(error.value) == str(expected.value)
    data[1, 2, 0] = 0.5
    nib.save(nib.Nifti1Image(data, np.eye(4)), path)
    np.testing.assert_array_equal(read_ours(path)[0], data)  # finite floats read as they are


def _decoding_forbidden(*_args, **_kwargs):
    raise AssertionError("pixels decoded before the size check")


@pytest.mark.parametrize(
    "name, size, mode, shape, count",
    [("huge.png", (10_000, 10_000), "1", "10000 x 10000", "100,000,000"),
     ("big.jpg", (6_000, 5_000), "L", "6000 x 5000", "30,000,000")],
    ids=["png", "jpeg"],
)  # fmt: skip
def test_huge_image_is_refused_from_its_header(tmp_path, monkeypatch, name, size, mode, shape, count):
    """A 350 KB 10000 x 10000 PNG took inference past 17 GB: refused from the header, nothing decoded."""
    path = tmp_path / name
    PILImage.new(mode, size).save(path)
    assert path.stat().st_size < 2_000_000
    monkeypatch.setattr(sitk.ImageFileReader, "Execute", _decoding_forbidden)
    monkeypatch.setattr(PILImage.Image, "load", _decoding_forbidden)
    for read in (read_sitk, SimpleITKReader().read):
        with pytest.raises(InputError, match="image too large") as error:
            read(path)
        message = str(error.value)
        for piece in (str(path), f"{shape} is {count} pixels per plane", "limit of 25,000,000", "BRAINSEG_MAX_PIXELS"):
            assert piece in message


def test_size_limits_from_environment_and_argument(files, monkeypatch):
    png, volume, series = files["grey.png"][0], files["vol.nii.gz"][0], files["series"][0]
    monkeypatch.setenv("BRAINSEG_MAX_PIXELS", "100")
    monkeypatch.setenv("BRAINSEG_MAX_VOXELS", "200")
    with monkeypatch.context() as patched:
        patched.setattr(sitk.ImageFileReader, "Execute", _decoding_forbidden)
        patched.setattr(sitk.ImageSeriesReader, "Execute", _decoding_forbidden)
        with pytest.raises(InputError, match="10 x 12 is 120 pixels per plane, above the limit of 100"):
            read_sitk(png)
        for path, shape in ((volume, "7 x 6 x 5"), (series, "7 x 6 x 5")):
            with pytest.raises(InputError, match=f"{shape} is 210 voxels, above the limit of 200") as error:
                read_sitk(path)
            assert str(path) in str(error.value) and "BRAINSEG_MAX_VOXELS" in str(error.value)
    assert read_sitk(png, max_pixels=120).GetSize() == (10, 12)  # the argument wins over the environment
    assert read_ours(series, max_voxels=210)[0].shape == (7, 6, 5)
    monkeypatch.setenv("BRAINSEG_MAX_VOXELS", "lots")
    with pytest.raises(ValueError, match="BRAINSEG_MAX_VOXELS must be a positive whole number but is 'lots'"):
        read_sitk(volume)
    with pytest.raises(ValueError, match="max_pixels must be a positive whole number but is 0"):
        SimpleITKReader(max_pixels=0)


# ---- real data (../shared/data) ----

REAL = {
    "oblique series": ("dicom", "C3L-03728_AX_T1_SE"),
    "flair series": ("dicom", "HF1139_AXIAL_FLAIR"),
    "lgg tif": ("lgg", "kaggle_3m", "TCGA_CS_4941_19960909", "TCGA_CS_4941_19960909_10.tif"),
    "lgg mask": ("lgg", "kaggle_3m", "TCGA_CS_4941_19960909", "TCGA_CS_4941_19960909_10_mask.tif"),
    "figshare png": ("figshare", "images", "1.png"),
    "brats nifti": ("brats2015", "brats_2013_pat0001_1", "brats_2013_pat0001_1_flair.nii.gz"),
}


@pytest.mark.realdata
@pytest.mark.parametrize("name", list(REAL))
def test_real_data_matches_itkreader(name):
    path = shared_path(*REAL[name])
    array, meta = read_ours(path)
    itk_array, itk_meta = read_itk(path)
    assert array.dtype == itk_array.dtype
    np.testing.assert_array_equal(array, itk_array)
    np.testing.assert_allclose(meta["affine"], itk_meta["affine"], atol=1e-6)
    header = read_header(path)
    assert header.size == tuple(meta["spatial_shape"])
    np.testing.assert_allclose(header.spacing, meta["spacing"], atol=1e-6)


@pytest.mark.realdata
def test_real_oblique_series():
    path = shared_path("dicom", "C3L-03728_AX_T1_SE")
    array, meta = read_ours(path)
    assert array.shape == (512, 512, 28) and array.dtype == np.float64
    direction = meta["affine"][:3, :3] / np.asarray(meta["spacing"])
    assert not np.allclose(direction, np.diag([-1.0, -1.0, 1.0]), atol=1e-3)  # oblique: 2.6 degrees about x
    assert np.degrees(np.arccos(direction[1, 1] * -1)) == pytest.approx(2.6, abs=0.1)
    assert meta["Modality"] == "MR" and meta["SeriesDescription"] == "AX T1 SE"
    assert meta["SeriesInstanceUID"].startswith("1.3.6.1.4.1.14519")
    source = pydicom.dcmread(next(path.iterdir()), stop_before_pixels=True)
    identifying = [str(source.get(k, "")).strip() for k in ("PatientName", "PatientID", "PatientBirthDate")]
    assert any(identifying)  # the files do carry them
    text = json.dumps({k: str(v) for k, v in meta.items() if k != "filename_or_obj"})  # the folder is named by ID
    assert not any(value and value in text for value in identifying)


@pytest.mark.realdata
def test_real_flair_series_is_int16():
    array, meta = read_ours(shared_path("dicom", "HF1139_AXIAL_FLAIR"))
    assert array.shape == (256, 256, 53) and array.dtype == np.int16
    np.testing.assert_allclose(meta["spacing"], (0.938, 0.938, 3.0), atol=1e-3)


@pytest.mark.realdata
def test_real_lgg_tif_channel_first():
    path = shared_path(*REAL["lgg tif"])
    image = LoadImage(reader=SimpleITKReader(), image_only=True, ensure_channel_first=True)(path)
    assert tuple(image.shape) == (3, 256, 256)


@pytest.mark.realdata
def test_real_brats_matches_nibabel():
    path = shared_path(*REAL["brats nifti"])
    array, meta = read_ours(path)
    reader = NibabelReader()
    nib_array, nib_meta = reader.get_data(reader.read(str(path)))
    np.testing.assert_array_equal(array, nib_array)
    np.testing.assert_allclose(meta["affine"], nib_meta["affine"], atol=1e-5)


@pytest.mark.realdata
def test_real_oblique_series_round_trip(tmp_path):
    path = shared_path("dicom", "C3L-03728_AX_T1_SE")
    series = read_sitk(path)
    array, meta = read_ours(path)
    out = write_image(array, meta["affine"], tmp_path / "series.nii.gz", reference=path)
    again, again_meta = read_ours(out)
    np.testing.assert_array_equal(again, array)
    np.testing.assert_allclose(again_meta["affine"], meta["affine"], atol=1e-4)
    mask = write_image((array > np.percentile(array, 90)).astype(np.uint8), meta["affine"], tmp_path / "mask.nii.gz")
    loaded = sitk.ReadImage(str(mask))
    assert loaded.GetSize() == series.GetSize()
    np.testing.assert_allclose(loaded.GetSpacing(), series.GetSpacing(), atol=1e-4)
    np.testing.assert_allclose(loaded.GetOrigin(), series.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(loaded.GetDirection(), series.GetDirection(), atol=1e-4)
