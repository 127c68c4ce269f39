"""Turn what a user points ``brainseg infer`` at into cases: single images, folders of slices, volumes, DICOM studies.

A case is the unit of the batch job: it succeeds or fails on its own and owns the output folder ``DIR/<case id>``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from brainseg_monai.errors import InputError
from brainseg_monai.io import DicomSeries, find_dicom_series, is_dicom_image_file

IMAGE_2D_SUFFIXES = (".tif", ".tiff", ".png", ".jpg", ".jpeg", ".bmp")
VOLUME_SUFFIXES = (".nii", ".nii.gz", ".mha", ".mhd", ".nrrd")
DICOM_FILE_SUFFIXES = (".dcm", ".dicom", ".ima")
_MASK_NAME = re.compile(r"(_mask|_seg|_label|_pred)$", re.IGNORECASE)


@dataclass
class Case:
    """One unit of work.

    ``kind`` is ``"slices"`` (2D images, each predicted on its own and written as ``<stem>_pred.png``),
    ``"volume"`` (one volume from channel files) or ``"dicom"`` (one volume from DICOM series folders, one per
    channel; a SEG is written too). ``images`` lists the slice files (``slices``) or the channel paths.
    ``error`` is set when the case was found but cannot run (e.g. a missing channel): it is reported as failed.
    """

    case_id: str
    source: str
    kind: str
    images: list[str]
    series: list[DicomSeries] = field(default_factory=list)
    error: str | None = None


def _stem(path: Path) -> str:
    name = path.name
    for suffix in VOLUME_SUFFIXES + IMAGE_2D_SUFFIXES + DICOM_FILE_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def _natural_key(text: str) -> list:
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", text)]


def _is_2d_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_2D_SUFFIXES


def _is_volume(path: Path) -> bool:
    return any(path.name.lower().endswith(s) for s in VOLUME_SUFFIXES)


def _slices_in(folder: Path) -> list[Path]:
    """2D images of a folder in natural order; masks (``*_mask``, ``*_seg``, ``*_pred``) are truth, never inputs."""
    files = [p for p in folder.iterdir() if p.is_file() and _is_2d_image(p) and not _MASK_NAME.search(_stem(p))]
    return sorted(files, key=lambda p: _natural_key(p.name))


def _unique(case_id: str, taken: set[str]) -> str:
    candidate, n = case_id, 2
    while candidate in taken:
        candidate, n = f"{case_id}_{n}", n + 1
    taken.add(candidate)
    return candidate


def _unreadable_dicom_folders(root: Path, series: list[DicomSeries]) -> list[Path]:
    """Folders under ``root`` holding DICOM image files of which GDCM read no series at all.

    GDCM passes over files it cannot parse without a word, so a study whose every file was truncated in transfer
    would otherwise vanish from the batch instead of being reported as failed. DICOMDIR, reports and other non-image
    objects do not count (:func:`is_dicom_image_file`), nor do 2D images and volumes.
    """
    with_series = {Path(s.folder) for s in series}
    found = []
    for dirpath, _, filenames in os.walk(root):
        folder = Path(dirpath)
        if folder in with_series:
            continue
        if any(not _is_2d_image(folder / name) and not _is_volume(folder / name) and is_dicom_image_file(folder / name)
               for name in filenames):
            found.append(folder)
    return sorted(found, key=lambda p: _natural_key(str(p)))


def _holds_other_inputs(root: Path) -> bool:
    """Whether any 2D image or volume that is not a mask lies under ``root``."""
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            path = Path(dirpath) / name
            if (_is_2d_image(path) or _is_volume(path)) and not _MASK_NAME.search(_stem(path)):
                return True
    return False


def _dicom_cases(
    root: Path, series: list[DicomSeries], channels: Mapping[str, str] | None, in_channels: int, taken: set[str]
) -> list[Case]:
    """Group series into cases: by study folder matched to channels, or one case per series for 1-channel models.

    Folders of DICOM files without one readable series become failed cases (a whole study of them, or the folder
    itself for 1-channel models), so nothing in the tree is skipped silently.
    """
    def rel_id(folder: Path) -> str:
        rel = folder.relative_to(root) if folder != root else Path(root.name)
        return "_".join(rel.parts) or root.name

    def study_of(folder: Path) -> Path:
        return folder.parent if folder != root else root

    unreadable = _unreadable_dicom_folders(root, series)
    reason = "holds DICOM files but no readable series (all truncated or corrupt?): "

    if in_channels == 1:
        regex = next(iter(channels.values()), None) if channels else None
        picked = [s for s in series if regex is None or re.search(regex, s.description, re.IGNORECASE)]
        if picked:
            cases = [Case(_unique(rel_id(s.folder), taken), str(s.folder), "dicom", [str(s.folder)], [s]) for s in picked]
        else:
            listing = "; ".join(f"'{s.description}'" for s in series)
            cases = [Case(_unique(rel_id(root), taken), str(root), "dicom", [],
                          error=f"no series matches channel pattern {regex!r} (series: {listing})")]
        cases += [Case(_unique(rel_id(f), taken), str(f), "dicom", [], error=reason + str(f)) for f in unreadable]
        return sorted(cases, key=lambda c: _natural_key(c.source))

    if not channels or len(channels) != in_channels:
        raise ValueError(
            f"the model takes {in_channels} channels; give one SeriesDescription pattern per channel "
            f"(got {dict(channels or {})})."
        )
    by_study: dict[Path, list[DicomSeries]] = {}
    for s in series:
        study_folder = s.folder.parent if s.folder != root else root
        by_study.setdefault(study_folder, []).append(s)
    cases = []
    for study_folder, members in sorted(by_study.items(), key=lambda kv: _natural_key(str(kv[0]))):
        case_id = _unique(rel_id(study_folder), taken)
        chosen: list[DicomSeries] = []
        problem = None
        for name, regex in channels.items():
            hits = [s for s in members if re.search(regex, s.description, re.IGNORECASE)]
            if len(hits) != 1:
                listing = ", ".join(f"'{s.description}'" for s in members)
                what = "no series" if not hits else f"{len(hits)} series"
                problem = f"channel '{name}' (pattern {regex!r}): {what} match among {listing}"
                broken = [str(f.relative_to(study_folder)) for f in unreadable if study_of(f) == study_folder]
                if broken:
                    problem += f"; no readable series in {', '.join(broken)} (truncated or corrupt?)"
                break
            chosen.append(hits[0])
        cases.append(
            Case(case_id, str(study_folder), "dicom", [str(s.folder) for s in chosen], chosen, error=problem)
        )
    broken_studies: dict[Path, list[Path]] = {}
    for folder in unreadable:
        if study_of(folder) not in by_study:
            broken_studies.setdefault(study_of(folder), []).append(folder)
    for study_folder, folders in broken_studies.items():
        error = reason + ", ".join(str(f.relative_to(study_folder)) if f != study_folder else "." for f in folders)
        cases.append(Case(_unique(rel_id(study_folder), taken), str(study_folder), "dicom", [], error=error))
    return sorted(cases, key=lambda c: _natural_key(c.source))


def discover_cases(
    inputs: Sequence[str | os.PathLike],
    in_channels: int = 3,
    series_channels: Mapping[str, str] | None = None,
    file_channels: Mapping[str, str] | None = None,
) -> list[Case]:
    """Find the cases under ``inputs`` (files or folders), in a stable order, with unique ids.

    - a 2D image file: one ``slices`` case of one image, id = file stem;
    - a volume file (NIfTI, MHA, NRRD): one ``volume`` case, id = file stem;
    - a folder of 2D images (an LGG patient folder included; ``*_mask`` files are truth and skipped): one ``slices``
      case, id = folder name;
    - a folder of volumes: with a 1-channel model each volume is a case; with several channels the folder is one
      case whose channels are the files matching ``file_channels`` (name -> file-name regex);
    - a folder or tree holding DICOM: every series is found; with a multi-channel model a study's series are
      matched to ``series_channels`` (name -> SeriesDescription regex) and form one case; with a 1-channel model every
      series (matching the one pattern, if given) is a case;
    - a folder of case folders (e.g. an LGG root or BraTS-style cases): each sub-folder as above.

    Raises:
        InputError: when an input does not exist, or a folder holds nothing this tool can read.
    """
    cases: list[Case] = []
    taken: set[str] = set()
    for raw in inputs:
        path = Path(raw)
        if not path.exists():
            raise InputError(path, "does not exist")
        cases.extend(_discover_one(path, in_channels, series_channels, file_channels, taken))
    return cases


def _discover_one(
    path: Path,
    in_channels: int,
    series_channels: Mapping[str, str] | None,
    file_channels: Mapping[str, str] | None,
    taken: set[str],
) -> list[Case]:
    if path.is_file():
        if _is_2d_image(path):
            return [Case(_unique(_stem(path), taken), str(path), "slices", [str(path)])]
        if _is_volume(path):
            return [Case(_unique(_stem(path), taken), str(path), "volume", [str(path)])]
        if path.suffix.lower() in DICOM_FILE_SUFFIXES:
            return [Case(_unique(_stem(path), taken), str(path), "volume", [str(path)])]
        raise InputError(path, f"unsupported file type; expected one of {IMAGE_2D_SUFFIXES + VOLUME_SUFFIXES + DICOM_FILE_SUFFIXES}")
    slices = _slices_in(path)
    if slices:
        return [Case(_unique(path.name, taken), str(path), "slices", [str(p) for p in slices])]
    volumes = sorted((p for p in path.iterdir() if p.is_file() and _is_volume(p) and not _MASK_NAME.search(_stem(p))),
                     key=lambda p: _natural_key(p.name))
    if volumes and in_channels == 1:
        return [Case(_unique(_stem(p), taken), str(p), "volume", [str(p)]) for p in volumes]
    if volumes:
        return [_volume_channels_case(path, volumes, file_channels, in_channels, taken)]
    series = find_dicom_series(path, recursive=True)
    if series:
        return _dicom_cases(path, series, series_channels, in_channels, taken)
    unreadable = [] if _holds_other_inputs(path) else _unreadable_dicom_folders(path, [])
    if unreadable:
        listing = ", ".join(str(f.relative_to(path)) if f != path else "." for f in unreadable)
        raise InputError(path, f"holds DICOM files but no readable series (all truncated or corrupt?): {listing}")
    subfolders = sorted((p for p in path.iterdir() if p.is_dir()), key=lambda p: _natural_key(p.name))
    found = []
    for sub in subfolders:
        try:
            found.extend(_discover_one(sub, in_channels, series_channels, file_channels, taken))
        except InputError as err:  # one unreadable case folder must not hide the others
            found.append(Case(_unique(sub.name, taken), str(sub), "volume", [], error=err.reason))
    if not found:
        raise InputError(path, "holds no image, volume or DICOM series to segment")
    return found


def _volume_channels_case(
    folder: Path, volumes: list[Path], channels: Mapping[str, str] | None, in_channels: int, taken: set[str]
) -> Case:
    """One multi-channel volume case from a case folder: each channel is the file whose name matches its regex."""
    patterns = dict(channels) if channels else {}
    case_id = _unique(folder.name, taken)
    if len(patterns) != in_channels:
        return Case(case_id, str(folder), "volume", [], error=(
            f"the model takes {in_channels} channels; give one file-name pattern per channel (got {patterns})"))
    chosen = []
    for name, regex in patterns.items():
        hits = [v for v in volumes if re.search(regex, v.name, re.IGNORECASE)]
        if len(hits) != 1:
            listing = ", ".join(v.name for v in volumes)
            what = "no file" if not hits else f"{len(hits)} files"
            return Case(case_id, str(folder), "volume", [], error=(
                f"channel '{name}' (pattern {regex!r}): {what} match among {listing}"))
        chosen.append(str(hits[0]))
    return Case(case_id, str(folder), "volume", chosen)
