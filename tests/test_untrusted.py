"""`check_detached_data`: no image header from an untrusted place may make the reader open a file outside its folder.

Each form that names data files is tried both ways: pointing outside the upload folder (refused, naming the header
and the name it gives) and inside it (passes, and SimpleITK reads it, so the check does not refuse what is fine).
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from brainseg_monai.errors import InputError
from brainseg_monai.untrusted import MAX_PATTERN_FILES, check_detached_data

SIZE = 16  # pixels per side of the raw images


@pytest.fixture()
def layout(tmp_path: Path) -> tuple[Path, Path]:
    """An upload folder ``root`` and, beside it, a ``secret.raw`` that is not part of the upload."""
    root = tmp_path / "upload"
    root.mkdir()
    secret = tmp_path / "secret.raw"
    secret.write_bytes(bytes(range(SIZE)) * SIZE)
    return root, secret


def detached_header(path: Path, data: str, slices: int = 0, extra: str = "") -> Path:
    """A header at ``path`` (NRRD for ``.nhdr``, else MetaImage) of a 2D uint8 image (or a volume of ``slices``)
    whose data file (``data file``, ``ElementDataFile``) is ``data``; ``extra`` lines follow it."""
    dims = 3 if slices else 2
    size = f"{SIZE} {SIZE}" + (f" {slices}" if slices else "")
    if path.suffix == ".nhdr":
        text = f"NRRD0004\ntype: uint8\ndimension: {dims}\nsizes: {size}\nencoding: raw\ndata file: {data}\n"
    else:
        text = (f"ObjectType = Image\nNDims = {dims}\nDimSize = {size}\nElementType = MET_UCHAR\n"
                f"ElementDataFile = {data}\n")
    path.write_text(text + extra)
    return path


def raw(path: Path) -> Path:
    path.write_bytes(bytes(SIZE * SIZE))
    return path


def refused(path: Path, root: Path) -> str:
    with pytest.raises(InputError) as caught:
        check_detached_data(path, root)
    return str(caught.value)


def test_metaimage_outside_is_refused_before_simpleitk_reads_it(layout: tuple[Path, Path]) -> None:
    root, secret = layout
    header = detached_header(root / "scan.mhd", str(secret))
    # what the check prevents: SimpleITK follows the name and shows the file as pixels
    leaked = sitk.GetArrayFromImage(sitk.ReadImage(str(header)))
    assert leaked.tobytes() == secret.read_bytes()
    assert refused(header, root) == (
        f"{header}: names the data file '{secret}', which is outside the folder it came in; refused before reading "
        f"(an image header may only name data files beside it)")
    relative = detached_header(root / "up.mha", "../secret.raw")
    assert "names the data file '../secret.raw'" in refused(relative, root)


def test_metaimage_inside_passes_and_reads(layout: tuple[Path, Path]) -> None:
    root, _ = layout
    (root / "sub").mkdir()
    raw(root / "sub" / "pixels.raw")
    header = detached_header(root / "scan.mhd", "sub/pixels.raw")
    check_detached_data(header, root)
    assert sitk.ReadImage(str(header)).GetSize() == (SIZE, SIZE)
    local = root / "local.mha"  # pixels after the header: nothing outside
    sitk.WriteImage(sitk.Image(SIZE, SIZE, sitk.sitkUInt8), str(local))
    check_detached_data(local, root)
    check_detached_data(raw(root / "notes.raw"), root)  # not a header, not a link: nothing to check


def test_metaimage_list_and_pattern_forms(layout: tuple[Path, Path]) -> None:
    root, secret = layout
    for k in range(3):
        raw(root / f"slice{k:03d}.raw")
    listed = detached_header(root / "list.mhd", "LIST 2D", slices=3, extra=f"slice000.raw\nslice001.raw\n{secret}\n")
    assert f"names the data file '{secret}'" in refused(listed, root)
    good_list = detached_header(root / "good_list.mhd", "LIST 2D", slices=3,
                          extra="slice000.raw\nslice001.raw\nslice002.raw\n")
    check_detached_data(good_list, root)
    pattern = detached_header(root / "pattern.mhd", "slice%03d.raw 0 2 1", slices=3)
    check_detached_data(pattern, root)
    assert sitk.ReadImage(str(pattern)).GetSize() == (SIZE, SIZE, 3)
    outside = detached_header(root / "out_pattern.mhd", "../other%d.raw 1 3 1", slices=3)
    assert "names the data file '../other1.raw'" in refused(outside, root)
    unverifiable = detached_header(root / "odd.mhd", "slice%s.raw 1 3 1", slices=3)
    assert "is not a numbered file pattern this check can verify" in refused(unverifiable, root)
    endless = detached_header(root / "endless.mhd", f"s%d.raw 0 {MAX_PATTERN_FILES} 1", slices=3)
    assert f"names {MAX_PATTERN_FILES + 1:,} files" in refused(endless, root)


def test_metaimage_spellings_metaio_may_take_are_checked_too(layout: tuple[Path, Path]) -> None:
    root, secret = layout
    lower = root / "lower.mhd"  # another case and a second line: each is checked
    lower.write_text(f"NDims = 2\nelementdatafile = {secret}\nElementDataFile = LOCAL\n")
    assert "outside the folder" in refused(lower, root)
    padded = root / "padded.mhd"  # a header that hides its ElementDataFile past what is read is refused unread
    padded.write_text("NDims = 2\n" + "Comment = x\n" * 200_000 + f"ElementDataFile = {secret}\n")
    assert "has no ElementDataFile in its first" in refused(padded, root)


def test_nrrd_detached_forms(layout: tuple[Path, Path]) -> None:
    root, secret = layout
    raw(root / "pixels.raw")
    check_detached_data(detached_header(root / "good.nhdr", "pixels.raw"), root)
    assert sitk.ReadImage(str(root / "good.nhdr")).GetSize() == (SIZE, SIZE)
    assert f"names the data file '{secret}'" in refused(detached_header(root / "abs.nhdr", str(secret)), root)
    single = root / "single.nhdr"  # the old spelling 'datafile', in a file named .nrrd
    single.write_text(f"NRRD0004\ntype: uint8\ndimension: 2\nsizes: {SIZE} {SIZE}\nencoding: raw\n"
                      f"datafile: ../secret.raw\n")
    assert "'../secret.raw'" in refused(single.rename(root / "single.nrrd"), root)
    listed = detached_header(root / "list.nhdr", "LIST", slices=3, extra=f"pixels.raw\n{secret}\n")
    assert f"'{secret}'" in refused(listed, root)
    pattern = detached_header(root / "pattern.nhdr", "../p%02d.raw 1 3 1", slices=3)
    assert "'../p01.raw'" in refused(pattern, root)
    attached = root / "attached.nrrd"  # data after the blank line that ends the header: nothing named
    sitk.WriteImage(sitk.Image(SIZE, SIZE, sitk.sitkUInt8), str(attached))
    check_detached_data(attached, root)


def test_analyze_pair_and_links_out_of_the_folder(layout: tuple[Path, Path], tmp_path: Path) -> None:
    root, secret = layout
    pair = root / "pair.hdr"
    sitk.WriteImage(sitk.Image(SIZE, SIZE, 1, sitk.sitkUInt8), str(pair))  # writes pair.hdr and pair.img
    assert (root / "pair.img").is_file()
    check_detached_data(pair, root)
    linked = root / "linked.hdr"
    linked.write_bytes(pair.read_bytes())
    (root / "linked.img").symlink_to(secret)
    assert refused(linked, root) == (
        f"{linked}: names the data file 'linked.img', which is outside the folder it came in; refused before reading "
        f"(an image header may only name data files beside it)")
    volume = tmp_path / "elsewhere.nii.gz"
    volume.write_bytes(gzip.compress(b"not read"))
    (root / "scan.nii.gz").symlink_to(volume)
    assert "is a link to a file outside the folder it came in" in refused(root / "scan.nii.gz", root)
    header = tmp_path / "outside.mhd"
    detached_header(header, "pixels.raw")
    (root / "inside.mhd").symlink_to(header)  # the header itself is elsewhere: its names are read from there
    assert "is a link to a file outside" in refused(root / "inside.mhd", root)


def test_a_folder_is_checked_file_by_file(layout: tuple[Path, Path]) -> None:
    root, secret = layout
    deep = root / "patient" / "series"
    deep.mkdir(parents=True)
    raw(deep / "pixels.raw")
    detached_header(deep / "good.mhd", "pixels.raw")
    check_detached_data(root, root)
    bad = detached_header(deep / "bad.mhd", os.path.relpath(secret, deep))
    assert refused(root, root).startswith(f"{bad}: names the data file")


def test_an_unreadable_header_is_refused_with_the_reason(layout: tuple[Path, Path]) -> None:
    root, _ = layout
    (root / "gone.mhd").symlink_to(root / "deleted.mhd")  # a link inside the folder to a header that is not there
    assert "cannot be read to check the data files it names (No such file or directory)" in refused(
        root / "gone.mhd", root)


def test_pixels_read_match_the_raw_file(layout: tuple[Path, Path]) -> None:
    """The check reads header text only; the image read after it is the raw file beside it."""
    root, _ = layout
    values = np.arange(SIZE * SIZE, dtype=np.uint8).reshape(SIZE, SIZE)
    (root / "pixels.raw").write_bytes(values.tobytes())
    header = detached_header(root / "scan.mhd", "pixels.raw")
    check_detached_data(root, root)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(header))), values)
