"""Inference writers: masks back in the source geometry (NIfTI, PNG), overlay PNG and DICOM SEG, on synthetic
oblique DICOM with known truth and on the real series in ../shared/data/dicom. Every SEG written is checked with
dciodvfy (Debian package dicom3tools) where it is installed."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from conftest import assert_dciodvfy_finds_no_errors, shared_path
from highdicom.seg import Segmentation
from skimage.io import imread

from brainseg_monai import __version__
from brainseg_monai.errors import InputError
from brainseg_monai.inference.writers import (
    SegNotWritten,
    overlay_slice,
    write_dicom_seg,
    write_overlay_png,
    write_png_mask,
    write_volume_mask,
)
from brainseg_monai.io import SimpleITKReader, find_dicom_series, read_sitk
from brainseg_monai.synth import make_dataset

SIZE = (40, 28, 10)  # non-square in-plane, so a swapped x/y cannot go unnoticed
REAL_SERIES = ["C3L-03728_AX_T1_SE", "HF1139_AXIAL_FLAIR"]
TOL = 1e-4
# highdicom's UserWarning for a one-component person name ('132301'): the writer must not trigger it.
NO_PERSON_NAME_WARNING = "error:The string .* is unlikely to represent the intended person name:UserWarning"
# pydicom's warnings on reading the deliberately invalid sources of the sanitising tests.
INVALID_SOURCE_WARNINGS = (
    "ignore:Incorrect value for Specific Character Set",
    "ignore:Invalid value for VR",
    "ignore:The value length",
)


@pytest.fixture(scope="module")
def case(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One synthetic oblique DICOM case: T1_PRE, FLAIR, T1_POST series and the truth NIfTI."""
    root = make_dataset(tmp_path_factory.mktemp("synth") / "dicom", "dicom", cases=1, seed=5, size=SIZE, oblique=True)
    return root / "SYN_0001"


def _read(path: Path) -> tuple[np.ndarray, dict]:
    reader = SimpleITKReader()
    return reader.get_data(reader.read(path))


def _assert_same_grid(image: sitk.Image, source: sitk.Image) -> None:
    assert image.GetSize() == source.GetSize()
    np.testing.assert_allclose(image.GetSpacing(), source.GetSpacing(), atol=TOL)
    np.testing.assert_allclose(image.GetOrigin(), source.GetOrigin(), atol=TOL)
    np.testing.assert_allclose(image.GetDirection(), source.GetDirection(), atol=TOL)


def _asymmetric_mask(shape: tuple[int, ...], slices: list[int]) -> np.ndarray:
    """An L-shaped blob on the given z slices, growing with k: no flip, transpose or slice swap maps it to itself."""
    mask = np.zeros(shape, dtype=np.uint8)
    x0, y0 = shape[0] // 4, shape[1] // 3
    for n, k in enumerate(slices):
        mask[x0 : x0 + shape[0] // 3 + n, y0 : y0 + 3, k] = 1
        mask[x0 : x0 + 3, y0 : y0 + shape[1] // 3, k] = 1
    return mask


# ---------------------------------------------------------------- volume masks


def test_volume_mask_of_synthetic_oblique_series_has_the_series_geometry(case: Path, tmp_path: Path) -> None:
    folder = case / "FLAIR"
    array, meta = _read(folder)
    mask = _asymmetric_mask(array.shape, [2, 3, 7])
    out = write_volume_mask(mask, meta["affine"], tmp_path / "c" / "mask.nii.gz", reference=folder)
    written = sitk.ReadImage(str(out))
    _assert_same_grid(written, read_sitk(folder))
    assert written.GetPixelID() == sitk.sitkUInt8
    np.testing.assert_array_equal(sitk.GetArrayFromImage(written).T, mask)


@pytest.mark.realdata
@pytest.mark.parametrize("name", REAL_SERIES)
def test_volume_mask_of_real_series_has_the_series_geometry(name: str, tmp_path: Path) -> None:
    folder = shared_path("dicom", name)
    array, meta = _read(folder)
    mask = (array > np.percentile(array, 90)).astype(np.uint8)
    mask[: array.shape[0] // 2] = 0  # one-sided, so a left-right flip would show
    out = write_volume_mask(mask, meta["affine"], tmp_path / "mask.nii.gz", reference=folder)
    written = sitk.ReadImage(str(out))
    _assert_same_grid(written, read_sitk(folder))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(written).T, mask)


def test_truth_written_from_reader_arrays_equals_the_truth_nifti(case: Path, tmp_path: Path) -> None:
    truth_path = case / "SYN_0001_seg.nii.gz"
    truth_array, truth_meta = _read(truth_path)
    _, series_meta = _read(case / "FLAIR")
    assert truth_array.any()
    truth = sitk.ReadImage(str(truth_path))
    for name, affine in (("own", truth_meta["affine"]), ("series", series_meta["affine"])):
        written = sitk.ReadImage(str(write_volume_mask(truth_array, affine, tmp_path / f"{name}.nii.gz")))
        _assert_same_grid(written, truth)
        np.testing.assert_array_equal(sitk.GetArrayFromImage(written), sitk.GetArrayFromImage(truth))


def test_volume_mask_accepts_a_channel_and_refuses_bad_input(case: Path, tmp_path: Path) -> None:
    truth_path = case / "SYN_0001_seg.nii.gz"
    before = truth_path.read_bytes()
    array, meta = _read(truth_path)
    out = write_volume_mask(array[None].astype(bool), meta["affine"], tmp_path / "mask.nii.gz")
    np.testing.assert_array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(out))).T, array)
    with pytest.raises(InputError, match="refusing to overwrite"):
        write_volume_mask(array, meta["affine"], truth_path, reference=truth_path)
    assert truth_path.read_bytes() == before
    with pytest.raises(ValueError, match="binary"):
        write_volume_mask(array * 255, meta["affine"], tmp_path / "bad.nii.gz")
    with pytest.raises(ValueError, match="3 spatial axes"):
        write_volume_mask(array[..., 0], meta["affine"], tmp_path / "bad.nii.gz")
    with pytest.raises(ValueError, match="nii"):
        write_volume_mask(array, meta["affine"], tmp_path / "mask.png")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mask.nii.gz"]  # nothing half-written


# ---------------------------------------------------------------- PNG masks


def test_png_mask_has_the_input_pixel_grid_and_orientation(tmp_path: Path) -> None:
    rows, cols = 20, 33
    picture = np.zeros((rows, cols), dtype=np.uint8)
    picture[2:15, 3:6] = 200  # a vertical bar near the left edge
    picture[12:15, 3:25] = 200  # and a foot to the right: an L that no flip or transpose preserves
    picture[0, cols - 1] = 90  # a dim corner pixel below the threshold
    source = tmp_path / "slice.png"
    sitk.WriteImage(sitk.GetImageFromArray(picture), str(source))
    array, _ = _read(source)
    assert array.shape == (cols, rows)  # reader order (x, y)
    out = write_png_mask(array > 100, tmp_path / "out" / "slice_pred.png", reference=source)
    expected = np.where(picture > 100, 255, 0).astype(np.uint8)
    for loaded in (imread(out), sitk.GetArrayFromImage(sitk.ReadImage(str(out)))):
        assert loaded.dtype == np.uint8
        np.testing.assert_array_equal(loaded, expected)
    # what the reader returns for the PNG is the mask as given
    np.testing.assert_array_equal(_read(out)[0], (array > 100).astype(np.uint8) * 255)


def test_png_mask_refuses_the_input_and_bad_masks(tmp_path: Path) -> None:
    source = tmp_path / "slice.png"
    sitk.WriteImage(sitk.GetImageFromArray(np.full((6, 9), 7, dtype=np.uint8)), str(source))
    before = source.read_bytes()
    mask = np.zeros((9, 6), dtype=np.uint8)
    with pytest.raises(InputError, match="refusing to overwrite"):
        write_png_mask(mask, source, reference=source)
    assert source.read_bytes() == before
    with pytest.raises(ValueError, match="binary"):
        write_png_mask(mask + 2, tmp_path / "a.png")
    with pytest.raises(ValueError, match="2 spatial axes"):
        write_png_mask(np.zeros((9, 6, 2), dtype=np.uint8), tmp_path / "a.png")
    with pytest.raises(ValueError, match=r"\.png"):
        write_png_mask(mask, tmp_path / "a.tif")


# ---------------------------------------------------------------- overlays


def _expected_grey(plane: np.ndarray) -> np.ndarray:
    low, high = np.percentile(plane.astype(np.float64), [1, 99])
    return np.rint(np.clip((plane - low) / (high - low), 0, 1) * 255).astype(np.uint8)


def test_overlay_of_a_volume_shows_the_slice_with_most_tumour(tmp_path: Path) -> None:
    x, y, z = 30, 22, 7
    rng = np.random.default_rng(0)
    image = np.stack(
        [
            rng.normal(size=(x, y, z)),  # t1: noise, must not be shown
            np.broadcast_to(np.arange(x, dtype=np.float64)[:, None, None] * 10.0, (x, y, z)).copy(),  # flair: ramp in x
            rng.normal(size=(x, y, z)),  # t1c
        ]
    )
    image[1, 0, 0, 5] = 1e6  # a hot voxel on the shown slice; the 99th percentile ignores it
    mask = np.zeros((x, y, z), dtype=np.uint8)
    mask[4:10, 3:6, 2] = 1  # 18 voxels
    mask[15:25, 10:18, 5] = 1  # 80 voxels: the slice to show
    truth = np.zeros_like(mask)
    truth[12:26, 8:20, 5] = 1
    assert overlay_slice(mask) == 5
    out = write_overlay_png(image, mask, tmp_path / "overlay.png", truth=truth)
    rgb = imread(out)
    assert rgb.shape == (y, x, 3) and rgb.dtype == np.uint8
    red = mask[..., 5].T.astype(bool)
    r, g, b = (rgb[..., c].astype(int) for c in range(3))
    outline = (g == 255) & (r == 0) & (b == 0)
    assert outline.sum() > 0 and not (outline & red).any()  # the truth outline runs outside the prediction here
    assert ((r > g) & (g == b))[red].all()
    grey = ~red & ~outline
    np.testing.assert_array_equal(r[grey], g[grey])
    np.testing.assert_array_equal(g[grey], b[grey])
    expected = _expected_grey(image[1, :, :, 5]).T
    np.testing.assert_array_equal(r[grey], expected[grey])
    # inside the mask: red over the grey at opacity 0.5
    np.testing.assert_allclose(g[red], np.rint(0.5 * expected[red].astype(float)), atol=1)
    np.testing.assert_allclose(r[red], np.rint(0.5 * expected[red].astype(float) + 127.5), atol=1)


def test_overlay_of_an_empty_volume_shows_the_middle_slice(tmp_path: Path) -> None:
    image = np.zeros((1, 12, 9, 7))
    image[0, :, :, 3] = np.arange(12 * 9).reshape(12, 9)
    mask = np.zeros((12, 9, 7), dtype=np.uint8)
    assert overlay_slice(mask) == 3
    rgb = imread(write_overlay_png(image, mask, tmp_path / "overlay.png"))
    np.testing.assert_array_equal(rgb[..., 0], _expected_grey(image[0, :, :, 3]).T)
    np.testing.assert_array_equal(rgb[..., 0], rgb[..., 2])


def test_overlay_of_a_2d_image_uses_the_input_orientation(tmp_path: Path) -> None:
    image = np.zeros((1, 16, 10), dtype=np.float32)  # (C, x, y)
    image[0] = np.arange(10)[None, :] * 3.0
    mask = np.zeros((16, 10), dtype=np.uint8)
    mask[1:4, 6:9] = 1  # top-left columns, bottom rows
    rgb = imread(write_overlay_png(image, mask, tmp_path / "overlay.png", channel=0, opacity=1.0))
    assert rgb.shape == (10, 16, 3)
    red = np.all(rgb == (255, 0, 0), axis=-1)
    np.testing.assert_array_equal(red, mask.T.astype(bool))


def test_overlay_refuses_bad_arguments(tmp_path: Path) -> None:
    image = np.zeros((3, 8, 6, 4))
    mask = np.zeros((8, 6, 4), dtype=np.uint8)
    with pytest.raises(ValueError, match="channel"):
        write_overlay_png(image, mask, tmp_path / "o.png", channel=3)
    with pytest.raises(ValueError, match="opacity"):
        write_overlay_png(image, mask, tmp_path / "o.png", opacity=0.0)
    with pytest.raises(ValueError, match="spatial shape"):
        write_overlay_png(image, mask[:, :5], tmp_path / "o.png")
    with pytest.raises(ValueError, match="truth"):
        write_overlay_png(image, mask, tmp_path / "o.png", truth=mask[..., :2])


# ---------------------------------------------------------------- DICOM SEG


def _check_seg(seg_path: Path, mask: np.ndarray, files: list[str]) -> Segmentation:
    """Read the SEG back and check frames, segment, references, positions and the decoded mask per instance."""
    sources = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    uids = [str(s.SOPInstanceUID) for s in sources]
    raw = pydicom.dcmread(seg_path)
    seg = Segmentation.from_dataset(raw)
    assert raw.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.4" and raw.Modality == "SEG"
    assert raw.SegmentationType == "BINARY"
    assert len(raw.SegmentSequence) == 1
    segment = raw.SegmentSequence[0]
    assert segment.SegmentLabel == "tumour" and segment.SegmentAlgorithmType == "AUTOMATIC"
    assert segment.SegmentAlgorithmName == "brainseg-monai"
    assert segment.SegmentedPropertyTypeCodeSequence[0].CodeValue == "108369006"  # SCT Neoplasm
    algorithm = segment.SegmentationAlgorithmIdentificationSequence[0]
    assert algorithm.AlgorithmName == "brainseg-monai" and algorithm.AlgorithmVersion == __version__
    with_mask = int(np.count_nonzero(mask.any(axis=(0, 1))))
    assert int(raw.NumberOfFrames) == (with_mask or len(files))
    referenced = raw.ReferencedSeriesSequence[0]
    assert referenced.SeriesInstanceUID == sources[0].SeriesInstanceUID
    assert sorted(i.ReferencedSOPInstanceUID for i in referenced.ReferencedInstanceSequence) == sorted(uids)
    assert raw.StudyInstanceUID == sources[0].StudyInstanceUID
    assert raw.FrameOfReferenceUID == sources[0].FrameOfReferenceUID
    # each frame lies where its source instance lies (oblique positions included)
    position_of = {str(s.SOPInstanceUID): np.array(s.ImagePositionPatient, dtype=float) for s in sources}
    for frame in raw.PerFrameFunctionalGroupsSequence:
        source_uid = frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        position = np.array(frame.PlanePositionSequence[0].ImagePositionPatient, dtype=float)
        np.testing.assert_allclose(position, position_of[source_uid], atol=1e-3)
    decoded = seg.get_pixels_by_source_instance(uids, combine_segments=True, assert_missing_frames_are_empty=True)
    np.testing.assert_array_equal(decoded.transpose(2, 1, 0), mask)
    return seg


def _rewritten_series(
    folder: Path, out: Path, edit: Callable[[pydicom.Dataset, int], None], *, slices: int | None = None
) -> list[Path]:
    """The series in `folder` (in series order; the first `slices` only, when given) rewritten into `out` after
    ``edit(dataset, k)`` on slice k: a source with the faults that real scanners write."""
    out.mkdir(parents=True)
    files = []
    for k, source_file in enumerate(find_dicom_series(folder)[0].files[:slices]):
        dataset = pydicom.dcmread(source_file)
        edit(dataset, k)
        files.append(out / f"{k:03d}.dcm")
        with warnings.catch_warnings():  # pydicom warns about the invalid values written on purpose
            warnings.simplefilter("ignore")
            dataset.save_as(files[-1])
    return files


def test_dicom_seg_of_synthetic_oblique_series(case: Path, tmp_path: Path) -> None:
    series = find_dicom_series(case / "FLAIR")[0]
    truth, _ = _read(case / "SYN_0001_seg.nii.gz")  # the truth is on the series grid
    assert 0 < np.count_nonzero(truth.any(axis=(0, 1))) < truth.shape[2]  # some slices without tumour
    out = tmp_path / "a" / "seg.dcm"
    assert write_dicom_seg(truth, series.files, out) == []  # a valid source: nothing changed
    seg = _check_seg(out, truth, series.files)
    assert seg.ContentDate == "20000101" and seg.ContentTime == "120000"  # the source's, not the clock's
    assert "InstanceCreationDate" not in seg and "InstanceCreationTime" not in seg
    for item in seg.ContributingEquipmentSequence:
        assert "ContributionDateTime" not in item
    # same inputs -> same bytes; another mask -> another instance of the same series
    write_dicom_seg(truth, series.files, tmp_path / "b" / "seg.dcm")
    assert out.read_bytes() == (tmp_path / "b" / "seg.dcm").read_bytes()
    other = _asymmetric_mask(truth.shape, [1, 4])
    write_dicom_seg(other, series.files, tmp_path / "c" / "seg.dcm")
    other_seg = pydicom.dcmread(tmp_path / "c" / "seg.dcm")
    assert other_seg.SeriesInstanceUID == seg.SeriesInstanceUID
    assert other_seg.SOPInstanceUID != seg.SOPInstanceUID
    _check_seg(tmp_path / "c" / "seg.dcm", other, series.files)
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["seg.dcm"]  # no temporary left behind
    assert_dciodvfy_finds_no_errors(out)


def test_dicom_seg_of_an_empty_mask(case: Path, tmp_path: Path) -> None:
    series = find_dicom_series(case / "T1_POST")[0]
    empty = np.zeros((SIZE[0], SIZE[1], len(series.files)), dtype=np.uint8)
    out = tmp_path / "seg.dcm"
    assert write_dicom_seg(empty, series.files, out) == []
    _check_seg(out, empty, series.files)
    write_dicom_seg(empty, series.files, tmp_path / "again.dcm")
    assert (tmp_path / "again.dcm").read_bytes() == out.read_bytes()
    assert_dciodvfy_finds_no_errors(out)


def test_dicom_seg_refuses_the_input_and_bad_masks(case: Path, tmp_path: Path) -> None:
    series = find_dicom_series(case / "T1_PRE")[0]
    target = Path(series.files[0])
    before = target.read_bytes()
    mask = np.zeros((SIZE[0], SIZE[1], len(series.files)), dtype=np.uint8)
    with pytest.raises(InputError, match="refusing to overwrite"):
        write_dicom_seg(mask, series.files, target.with_suffix(".dcm"))
    assert target.read_bytes() == before
    with pytest.raises(ValueError, match=r"\(Columns, Rows, number of files\)"):
        write_dicom_seg(mask.transpose(1, 0, 2), series.files, tmp_path / "seg.dcm")
    with pytest.raises(ValueError, match="binary"):
        write_dicom_seg(mask + 3, series.files, tmp_path / "seg.dcm")
    with pytest.raises(ValueError, match="segment_label"):
        write_dicom_seg(mask, series.files, tmp_path / "seg.dcm", segment_label="")
    with pytest.raises(InputError, match="cannot read"):
        write_dicom_seg(mask[..., :1], [case / "SYN_0001_seg.nii.gz"], tmp_path / "seg.dcm")
    assert not (tmp_path / "seg.dcm").exists()


def _philips_faults(dataset: pydicom.Dataset, k: int) -> None:
    """The faults of the issue's Philips study, and more that clinical exports carry."""
    dataset.PatientSex = "0000"
    dataset.SpecificCharacterSet = "ISO-IR 100"  # misspelt ISO_IR 100; pydicom still decodes it as Latin-1
    dataset.PatientName = "Müller"  # one component, outside ASCII
    dataset.PatientBirthDate = "19xx0101"
    dataset.StudyID = "STUDY-0001-OF-2024"  # 18 characters, SH allows 16
    dataset.StudyTime = "12:00:00"  # the retired ACR-NEMA form
    del dataset.SliceThickness, dataset.SeriesDescription


def _check_patient_and_study_emptied(seg: Segmentation, source: pydicom.Dataset) -> None:
    assert seg.PatientSex == "" and seg.PatientBirthDate == "" and seg.StudyID == "" and seg.StudyTime == ""
    assert seg.SpecificCharacterSet == "ISO_IR 192"
    assert str(seg.PatientName) == "Müller^" and seg.PatientName.family_name == "Müller"
    assert seg.PatientID == source.PatientID == "SYN_0001"
    assert seg.StudyInstanceUID == source.StudyInstanceUID and seg.StudyDate == source.StudyDate == "20000101"
    assert float(seg.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].SliceThickness) == 3.0


def _invalid_optional_values(dataset: pydicom.Dataset, k: int) -> None:
    del dataset.SpecificCharacterSet  # the default repertoire (ASCII), yet a name outside it
    dataset.PatientName = "Müller^Hans"
    dataset.PatientIdentityRemoved = "MAYBE"
    dataset.AccessionNumber = ["A1", "A2"]  # two values where one is allowed
    dataset.SpacingBetweenSlices = "-3"


def _check_optional_left_out_and_character_set_widened(seg: Segmentation, source: pydicom.Dataset) -> None:
    assert "PatientIdentityRemoved" not in seg and seg.AccessionNumber == ""
    assert seg.SpecificCharacterSet == "ISO_IR 192" and str(seg.PatientName) == "Müller^Hans"
    measures = seg.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0]
    assert float(measures.SliceThickness) == 3.0
    # not the source's -3 but what highdicom measures between the evenly spaced slices
    assert float(measures.SpacingBetweenSlices) == pytest.approx(3.0, abs=1e-6)


@pytest.mark.filterwarnings(NO_PERSON_NAME_WARNING, *INVALID_SOURCE_WARNINGS)
@pytest.mark.parametrize("series, faults, mask_of, changes, check", [
    pytest.param("FLAIR", _philips_faults, lambda case, slices: _read(case / "SYN_0001_seg.nii.gz")[0], [
        "PatientBirthDate is not a date (YYYYMMDD): left empty",
        "PatientSex '0000' is not M/F/O: left empty",
        "StudyID is longer than the 16 characters SH allows: left empty",
        "StudyTime is not a time (HHMMSS.FFFFFF): left empty",
        "SpecificCharacterSet 'ISO-IR 100' is not a DICOM character set: the SEG uses ISO_IR 192",
        "SliceThickness is missing in the source: the SEG gives the slice spacing, 3.0 mm",
    ], _check_patient_and_study_emptied, id="invalid patient and study values"),
    pytest.param("T1_POST", _invalid_optional_values,
                 lambda case, slices: _asymmetric_mask((SIZE[0], SIZE[1], slices), [2, 3]), [
        "PatientIdentityRemoved 'MAYBE' is not YES/NO: left out",
        "AccessionNumber holds 2 values where one is allowed: left empty",
        "SpacingBetweenSlices '-3' is not a positive number: not copied",
        "the SEG's text does not fit the source's SpecificCharacterSet (none: ASCII): the SEG uses ISO_IR 192",
    ], _check_optional_left_out_and_character_set_widened, id="invalid optional values, a name outside ASCII"),
])
def test_dicom_seg_sanitises_invalid_source_values(
    case: Path, tmp_path: Path, series: str, faults: Callable[[pydicom.Dataset, int], None],
    mask_of: Callable[[Path, int], np.ndarray], changes: list[str],
    check: Callable[[Segmentation, pydicom.Dataset], None],
) -> None:
    files = _rewritten_series(case / series, tmp_path / "source", faults)
    before = {f: f.read_bytes() for f in files}
    mask = mask_of(case, len(files))
    out = tmp_path / "seg.dcm"
    assert write_dicom_seg(mask, files, out) == changes
    assert {f: f.read_bytes() for f in files} == before  # the sources are never changed
    seg = _check_seg(out, mask, [str(f) for f in files])
    check(seg, pydicom.dcmread(files[0], stop_before_pixels=True))
    assert_dciodvfy_finds_no_errors(out)


def test_dicom_seg_leaves_out_slices_that_repeat_a_position(case: Path, tmp_path: Path) -> None:
    def repeat_slice_4(dataset: pydicom.Dataset, k: int) -> None:
        if k == 5:
            dataset.ImagePositionPatient = pydicom.dcmread(files_before[4]).ImagePositionPatient

    files_before = find_dicom_series(case / "FLAIR")[0].files
    files = _rewritten_series(case / "FLAIR", tmp_path / "source", repeat_slice_4)
    mask = _asymmetric_mask((SIZE[0], SIZE[1], len(files)), [3, 4, 5, 6])
    out = tmp_path / "seg.dcm"
    lost = int(np.count_nonzero(mask[..., 5]))
    assert write_dicom_seg(mask, files, out) == [
        f"slices z=5 repeat an earlier slice's position: left out of the SEG ({lost} mask voxels on them)"
    ]
    # the SEG is the mask and the references of the other slices
    _check_seg(out, np.delete(mask, 5, axis=2), [str(f) for k, f in enumerate(files) if k != 5])
    assert_dciodvfy_finds_no_errors(out)


def _no_frame_of_reference(dataset: pydicom.Dataset, k: int) -> None:
    del dataset.FrameOfReferenceUID


def _no_sop_class(dataset: pydicom.Dataset, k: int) -> None:
    del dataset.SOPClassUID


def _no_slice_thickness(dataset: pydicom.Dataset, k: int) -> None:
    del dataset.SliceThickness


@pytest.mark.parametrize(
    ("edit", "slices", "reason"),
    [
        (_no_frame_of_reference, None, "Source images have no Frame Of Reference UID, but it is required by the IOD"),
        (_no_sop_class, None, "has no SOPClassUID, which a SEG needs"),
        (_no_slice_thickness, 1, "no valid SliceThickness and no second slice position to measure the slice spacing"),
    ],
)
def test_dicom_seg_that_cannot_be_written_raises_seg_not_written(
    case: Path, tmp_path: Path, edit: Callable[[pydicom.Dataset, int], None], slices: int | None, reason: str
) -> None:
    files = _rewritten_series(case / "FLAIR", tmp_path / "source", edit, slices=slices)
    mask = _asymmetric_mask((SIZE[0], SIZE[1], len(files)), [0])
    out = tmp_path / "out" / "seg.dcm"
    with pytest.raises(SegNotWritten) as raised:
        write_dicom_seg(mask, files, out)
    message = str(raised.value)
    assert reason in message and "\n" not in message
    assert not out.parent.exists() or list(out.parent.iterdir()) == []  # nothing half-written


@pytest.mark.realdata
@pytest.mark.filterwarnings(NO_PERSON_NAME_WARNING)
@pytest.mark.parametrize("name", REAL_SERIES)
def test_dicom_seg_of_real_series(name: str, tmp_path: Path) -> None:
    folder = shared_path("dicom", name)
    series = find_dicom_series(folder)[0]
    size = read_sitk(folder).GetSize()
    mask = _asymmetric_mask(size, [3, 4, 9])
    out = tmp_path / "seg.dcm"
    assert write_dicom_seg(mask, series.files, out) == []
    seg = _check_seg(out, mask, series.files)
    source = pydicom.dcmread(series.files[0], stop_before_pixels=True)
    np.testing.assert_allclose(
        [float(v) for v in seg.SharedFunctionalGroupsSequence[0].PlaneOrientationSequence[0].ImageOrientationPatient],
        [float(v) for v in source.ImageOrientationPatient],
        atol=1e-6,
    )
    assert seg.ContentDate == source.ContentDate
    # patient and study: only what the SEG IOD requires, copied from the source; nothing optional
    assert seg.PatientID == source.PatientID and seg.StudyInstanceUID == source.StudyInstanceUID
    # both names have one component ('132301', 'C3L-03728'): the same name, in the unambiguous form
    assert "^" not in str(source.PatientName) and str(seg.PatientName) == f"{source.PatientName}^"
    for keyword in ("PatientAge", "PatientWeight", "PatientComments", "PatientState", "StudyDescription",
                    "ClinicalTrialTimePointID", "InstitutionName", "StationName"):
        assert keyword not in seg
    assert [item.ManufacturerModelName for item in seg.ContributingEquipmentSequence] == ["highdicom"]
    write_dicom_seg(mask, series.files, tmp_path / "again.dcm")
    assert (tmp_path / "again.dcm").read_bytes() == out.read_bytes()
    assert_dciodvfy_finds_no_errors(out)
