"""Turn what a user points ``brainseg infer`` at into cases: single images, folders of slices, volumes, DICOM studies.

A case is the unit of the batch job: it succeeds or fails on its own and owns the output folder ``DIR/<case id>``.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pydicom

from brainseg_monai.channel_roles import InputRoles, plan_dicom_channels, role_from_name, single_channel_fills
from brainseg_monai.errors import InputError, shown_pattern
from brainseg_monai.inference.outputs import LOCK_NAME, SUMMARY_NAME, is_case_output
from brainseg_monai.io import (
    DICOM_FILE_SUFFIXES,
    IMAGE_2D_SUFFIXES,
    VOLUME_SUFFIXES,
    DicomSeries,
    file_stem,
    find_dicom_series,
    is_dicom_image_file,
    natural_key,
    series_header,
)
from brainseg_monai.sequences import classify_series

logger = logging.getLogger(__name__)

_RESERVED_IDS = {SUMMARY_NAME, LOCK_NAME}
#: a case id's most bytes: with the runner's ``.<id>.<random>`` temporary folders well below a file name's 255
_MAX_ID_BYTES = 200
MASK_STEM_SUFFIXES = ("_pred", "_mask", "_seg", "_label")
"""A file whose stem ends so is a mask (``brainseg infer``'s own, or truth), never an input image."""
_MASK_NAME = re.compile(f"({'|'.join(MASK_STEM_SUFFIXES)})$", re.IGNORECASE)
_UNREADABLE = "holds DICOM files but no readable series (all truncated or corrupt?): "


@dataclass
class Case:
    """One unit of work.

    ``kind`` is ``"slices"`` (2D images, each predicted on its own and written as ``<stem>_pred.png``),
    ``"volume"`` (one volume from channel files) or ``"dicom"`` (one volume from DICOM series, one per channel; a SEG
    is written too). ``images`` lists the slice files (``slices``) or the channel paths (for DICOM, the folder of
    each series in ``series``, which says which series of that folder is read). ``error`` is set when the case was
    found but cannot run (e.g. a missing channel): it is reported as failed. A channel filled from another (a
    missing sequence) repeats that channel's path and series.
    """

    case_id: str
    source: str
    kind: str
    images: list[str]
    series: list[DicomSeries] = field(default_factory=list)
    error: str | None = None
    #: how the inputs fill the model's channels (``case.json``'s ``channels``): each channel's series or file and why
    roles: dict = field(default_factory=dict)
    #: index into ``images``/``series`` of the model's primary channel: the grid of the mask, the series of the SEG
    primary: int = 0
    #: for a one-channel input given to a multi-channel model: model channel -> the role the input plays
    fills: dict[str, str] = field(default_factory=dict)

    def inputs(self) -> list[str]:
        """What exactly the case reads (absolute paths, ``folder#SeriesInstanceUID`` per series): its identity.

        ``--resume`` skips a case only when the finished case on disk read these same inputs, not just one with the
        same id (two ``img.png`` in different folders get the ids ``img`` and ``img_2`` in the order given).
        """
        if self.series:
            return list(dict.fromkeys(f"{os.path.abspath(s.folder)}#{s.series_uid}" for s in self.series))
        return [os.path.abspath(p) for p in self.images] or [os.path.abspath(self.source)]

    def files(self) -> list[str]:
        """Every file the case reads, once each (absolute paths): its slices, its channel files with the data file a
        MetaImage header names, or the files of its series. ``--resume`` fingerprints their contents."""
        if self.series:
            paths = [f for s in self.series for f in s.files]
        else:
            paths = [p for image in self.images for p in (image, *_detached_data(Path(image)))]
        return list(dict.fromkeys(os.path.abspath(p) for p in paths))


def _detached_data(header: Path) -> list[Path]:
    """The data file a MetaImage header (``.mhd``) keeps its voxels in: its content is the image's as much as the
    header's. None for other files, data inside the header, or file lists and patterns."""
    if header.suffix.lower() != ".mhd":
        return []
    try:
        text = header.read_text(errors="replace")[:65536]
    except OSError:
        return []  # reading the header reports it
    found = re.search(r"^\s*ElementDataFile\s*=\s*(.+?)\s*$", text, re.MULTILINE)
    if found is None or found[1].upper() in ("LOCAL", "LIST") or "%" in found[1]:
        return []
    return [header.parent / found[1]]


def cannot_read(error: OSError) -> str:
    """The reason of a summary row for a file or folder that cannot be opened: ``cannot be read: permission denied``."""
    return f"cannot be read: {(error.strerror or str(error)).lower()}"


def read_problem(path: Path) -> str | None:
    """Why ``path`` cannot be opened for reading (see :func:`cannot_read`), or None when it can."""
    try:
        with open(path, "rb"):
            return None
    except OSError as err:
        return cannot_read(err)


def _is_2d_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_2D_SUFFIXES


def _is_volume(path: Path) -> bool:
    return any(path.name.lower().endswith(s) for s in VOLUME_SUFFIXES)


def _listing(folder: Path) -> tuple[list[Path], list[Path]]:
    """The files and the sub-folders of ``folder`` (a symlink counts as what it points to).

    Raises:
        InputError: naming the folder when it cannot be listed (``cannot be read: permission denied``).
    """
    try:
        entries = list(folder.iterdir())
        return [p for p in entries if p.is_file()], [p for p in entries if p.is_dir()]
    except OSError as err:
        raise InputError(folder, cannot_read(err)) from err


def _slices_in(files: list[Path]) -> list[Path]:
    """2D images among a folder's files in natural order; masks (``*_mask``, ``*_seg``, ``*_pred``) are truth, never
    inputs."""
    found = [p for p in files if _is_2d_image(p) and not _MASK_NAME.search(file_stem(p))]
    return sorted(found, key=lambda p: natural_key(p.name))


def _volumes_in(files: list[Path]) -> list[Path]:
    found = [p for p in files if _is_volume(p) and not _MASK_NAME.search(file_stem(p))]
    return sorted(found, key=lambda p: natural_key(p.name))


def safe_case_id(name: str) -> str:
    """``name`` made safe as the name of a case's folder in the output folder.

    Ids come from file and folder names: ``..tif`` named a case ``.`` (the output folder itself) and
    ``summary.csv.tif`` a folder ``summary.csv`` in the place of the summary. So path separators and control
    characters become ``_``; leading dots go (hidden names are the runner's own: temporary folders, the lock, rank
    summaries); an empty name becomes ``case``; a name the output folder uses for itself gets ``_`` for its dots; and
    the name is cut to :data:`_MAX_ID_BYTES` bytes.
    """
    text = re.sub(r"[\x00-\x1f\x7f/\\]", "_", name).lstrip(".")
    text = text.encode()[:_MAX_ID_BYTES].decode(errors="ignore") or "case"
    return text.replace(".", "_") if text.lower() in _RESERVED_IDS else text


def _unique(case_id: str, taken: set[str]) -> str:
    """``case_id`` made safe (:func:`safe_case_id`) and unique among ``taken`` (``img``, ``img_2``, ...), then taken."""
    base = safe_case_id(case_id)
    candidate, n = base, 2
    while candidate in taken:
        candidate, n = f"{base}_{n}", n + 1
    taken.add(candidate)
    return candidate


class _Skipped:
    """Folders discovery never enters: the output folder, finished cases of ``brainseg infer`` and hidden folders.

    An output folder inside an input (``infer lgg --out lgg/pred``) would otherwise be read back in as cases on the
    next run (its overlays as images, its SEGs as series). Hidden folders are not data: the runner's unfinished cases,
    ``.git`` and the like.
    """

    def __init__(self, exclude: Sequence[str | os.PathLike]) -> None:
        self.excluded = {Path(os.path.abspath(p)) for p in exclude}
        #: the links a walk did not follow, each named once in the log though both walks of a tree meet it
        self.links_named: set[str] = set()

    def __call__(self, folder: Path) -> bool:
        """Whether to leave out ``folder``, a sub-folder of an input (walks check each level, top down)."""
        return folder.name.startswith(".") or Path(os.path.abspath(folder)) in self.excluded or is_case_output(folder)

    @staticmethod
    def is_output(path: Path) -> bool:
        """Whether a path given as input is a finished case of ``brainseg infer`` or lies in one."""
        path = Path(os.path.abspath(path))
        return any(is_case_output(f) for f in [path, *path.parents])


class _FolderOnce:
    """The real folders a walk has entered, by device and inode: a symlink to one of them (a loop back up the tree,
    or a second link to one folder) is not followed again. One loop made one patient 41 cases; two hung discovery."""

    def __init__(self, skip: _Skipped) -> None:
        self.seen: set[tuple[int, int]] = set()
        self.skip = skip

    def first_visit(self, folder: Path) -> bool:
        """Whether ``folder`` is entered: False, with a warning naming it, when its real folder was entered before."""
        try:
            info = folder.stat()
        except OSError:
            return True  # listing it reports the reason
        key = (info.st_dev, info.st_ino)
        if key not in self.seen:
            self.seen.add(key)
            return True
        if str(folder) not in self.skip.links_named:
            self.skip.links_named.add(str(folder))
            logger.warning("%s: not followed: it leads to %s, a folder already read (a symlink loop, or a second link "
                           "to one folder)", folder, os.path.realpath(folder))
        return False


def _may_be_dicom(path: Path) -> bool:
    """A file GDCM may read: a DICOM suffix, none (exports without a preamble), or the DICM preamble; a file that
    cannot be opened may be one too."""
    if _is_2d_image(path) or _is_volume(path):
        return False
    if path.suffix == "" or path.suffix.lower() in DICOM_FILE_SUFFIXES:
        return True
    try:
        return pydicom.misc.is_dicom(path)
    except OSError:
        return True


def _dicom_in_tree(root: Path, skip: _Skipped) -> tuple[list[DicomSeries], list[Path], dict[Path, str]]:
    """Every DICOM series under ``root``, the folders holding DICOM image files of which GDCM read no series, and the
    folders holding a file that may be DICOM but cannot be opened, each with the reason naming that file.

    Only folders holding files that may be DICOM are handed to GDCM (an LGG tree of TIFs is not scanned). GDCM passes
    over files it cannot parse without a word, so a study whose every file was truncated in transfer would otherwise
    vanish from the batch instead of being reported as failed, and a series would lose a slice it may not open: such
    folders are not scanned. DICOMDIR, reports and other non-image objects do not count (:func:`is_dicom_image_file`).
    Symlinked folders are followed, each real folder once. A folder that cannot be listed is reported by
    :func:`_discover_folder`, which lists the same folders.
    """
    folders: list[tuple[Path, list[Path]]] = []
    denied: dict[Path, str] = {}
    once = _FolderOnce(skip)
    once.first_visit(root)
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        folder = Path(dirpath)
        dirnames[:] = [d for d in sorted(dirnames, key=natural_key) if not skip(folder / d)
                       and once.first_visit(folder / d)]
        candidates = [folder / name for name in filenames if _may_be_dicom(folder / name)]
        problem = next(((path, reason) for path in candidates if (reason := read_problem(path))), None)
        if problem is not None:
            denied[folder] = f"{problem[0]}: {problem[1]}"
        elif candidates:
            folders.append((folder, candidates))
    series: list[DicomSeries] = []
    unreadable = []
    for folder, candidates in sorted(folders, key=lambda item: natural_key(str(item[0]))):
        found = find_dicom_series(folder)
        series.extend(found)
        if not found and any(is_dicom_image_file(path) for path in candidates):
            unreadable.append(folder)
    return series, unreadable, denied


def _rel_id(root: Path, folder: Path) -> str:
    """A case id from a folder's path below ``root`` (``study_series``), or ``root``'s name for ``root`` itself."""
    rel = folder.relative_to(root) if folder != root else Path(root.name)
    return "_".join(rel.parts) or root.name


def _unreadable_cases(root: Path, unreadable: list[Path], taken: set[str]) -> list[Case]:
    """One failed case per folder of DICOM files without a readable series."""
    return [Case(_unique(_rel_id(root, f), taken), str(f), "dicom", [], error=_UNREADABLE + str(f)) for f in unreadable]


def _label(text: str) -> str:
    """A SeriesDescription as part of a case id: letters, digits and underscores."""
    return re.sub(r"[^0-9A-Za-z]+", "_", text).strip("_")


def _study_key(series: DicomSeries) -> tuple[str, str]:
    return series.patient_id, series.study_uid


def _dicom_cases(
    root: Path, series: list[DicomSeries], unreadable: list[Path], roles: InputRoles, taken: set[str]
) -> list[Case]:
    """Group series into cases: a study's series matched to the model's channels, or one case per series for
    1-channel models.

    A folder holding several series is a study exported flat (one folder, every series); a folder holding one
    series is a series folder of the study above it. Within a study folder, series are grouped by PatientID and
    StudyInstanceUID, never across them: two patients' series copied into one folder are two cases. Each case keeps
    its series, so exactly those are read. Folders of DICOM files without one readable series become failed cases
    (a whole study of them, or the folder itself for 1-channel models), so nothing in the tree is skipped silently.
    """
    per_folder: dict[Path, int] = {}
    for s in series:
        per_folder[s.folder] = per_folder.get(s.folder, 0) + 1

    def study_of(folder: Path) -> Path:
        return folder if folder == root or per_folder.get(folder, 0) > 1 else folder.parent

    if len(roles.channels) == 1:
        return _one_channel_dicom_cases(root, series, unreadable, roles, per_folder, taken)

    by_study: dict[tuple[Path, tuple[str, str]], list[DicomSeries]] = {}
    for s in series:
        by_study.setdefault((study_of(s.folder), _study_key(s)), []).append(s)
    studies_per_folder: dict[Path, int] = {}
    for folder, _ in by_study:
        studies_per_folder[folder] = studies_per_folder.get(folder, 0) + 1
    cases = []
    for (study_folder, key), members in sorted(by_study.items(), key=lambda kv: (natural_key(str(kv[0][0])), kv[0][1])):
        name = _rel_id(root, study_folder)
        if studies_per_folder[study_folder] > 1:  # the folder's name alone would not say which patient and study
            name = f"{name}_{_label(key[0]) or 'patient'}_{_label(key[1])[-8:] or 'study'}"
        plan = plan_dicom_channels(members, roles.channels, roles.primary, roles.fallbacks, roles.overrides,
                                   roles.rules)
        problem = plan.error
        if problem:
            broken = [str(f.relative_to(study_folder)) for f in unreadable if study_of(f) == study_folder]
            if broken:
                problem += f"; no readable series in {', '.join(broken)} (truncated or corrupt?)"
        chosen = [] if problem else plan.series
        primary = roles.channels.index(roles.primary)
        cases.append(Case(_unique(name, taken), str(study_folder), "dicom", [str(s.folder) for s in chosen], chosen,
                          error=problem, roles=plan.record(), primary=primary))
    broken_studies: dict[Path, list[Path]] = {}
    for folder in unreadable:
        if not any(study_of(folder) == study for study, _ in by_study):
            broken_studies.setdefault(study_of(folder), []).append(folder)
    for study_folder, folders in broken_studies.items():
        error = _UNREADABLE + ", ".join(str(f.relative_to(study_folder)) if f != study_folder else "." for f in folders)
        cases.append(Case(_unique(_rel_id(root, study_folder), taken), str(study_folder), "dicom", [], error=error))
    return sorted(cases, key=lambda c: natural_key(c.source))


def _one_channel_dicom_cases(root: Path, series: list[DicomSeries], unreadable: list[Path], roles: InputRoles,
                             per_folder: Mapping[Path, int], taken: set[str]) -> list[Case]:
    """Every series (matching the one ``--channel`` pattern, if given) is a case of a 1-channel model."""
    regex = next(iter(roles.overrides.values()), None)
    picked = [s for s in series if regex is None or re.search(regex, s.description, re.IGNORECASE)]
    if picked:
        cases = []
        for s in picked:
            name = _rel_id(root, s.folder)
            if per_folder[s.folder] > 1:  # the folder's name alone would not say which series
                name = f"{name}_{_label(s.description) or 'series'}"
            cases.append(Case(_unique(name, taken), str(s.folder), "dicom", [str(s.folder)], [s]))
    else:
        listing = "; ".join(f"'{s.description}'" for s in series)
        cases = [Case(_unique(_rel_id(root, root), taken), str(root), "dicom", [],
                      error=f"no series matches channel pattern {shown_pattern(regex)} (series: {listing})")]
    cases += _unreadable_cases(root, unreadable, taken)
    return sorted(cases, key=lambda c: natural_key(c.source))


def discover_cases(
    inputs: Sequence[str | os.PathLike],
    roles: InputRoles,
    exclude: Sequence[str | os.PathLike] = (),
) -> list[Case]:
    """Find the cases under ``inputs`` (files or folders), in a stable order, with unique ids.

    - a 2D image file: one ``slices`` case of one image, id = file stem;
    - a volume file (NIfTI, MHA, NRRD) or a DICOM file (by suffix or by its preamble): one ``volume`` case, id = stem;
    - a folder's 2D images (an LGG patient folder included; ``*_mask`` files are truth and skipped): one ``slices``
      case, id = folder name;
    - a folder's volumes: with a 1-channel model each volume is a case; with several channels the folder is one
      case whose channels are the files matching each role's file-name pattern (``--channel``, or
      ``<case>_<role>.nii.gz``), a missing optional channel filled from its fallback;
    - the DICOM in a folder's tree: every series is found; with a multi-channel model a study's series (one patient,
      one StudyInstanceUID) are matched to the model's roles by :func:`plan_dicom_channels` and form one case; with
      a 1-channel model every series (matching the one pattern, if given) is a case;
    - each sub-folder as above (an LGG root, BraTS-style case folders).

    A one-channel image given to a multi-channel model plays the role its name or ``--channel`` gives it (``fills``);
    one whose role nothing says is refused when read, with the command that would run it.

    A folder may hold several of these kinds (a series beside a NIfTI and a PNG thumbnail): each becomes its own
    case. The user pointed at all of it, and a case too many costs a row in the summary, while picking one kind would
    skip the others without a word. ``exclude`` (the output folder), finished cases of ``brainseg infer`` and hidden
    folders are never entered.

    An input that cannot be used (missing, unsupported, holding nothing to segment, unreadable) becomes a failed
    case, so the other inputs still run; so does a sub-folder that cannot be listed, and a DICOM case whose folder
    holds a file that cannot be opened. Symlinked folders are followed, each real folder once: a link back to a
    folder already read (a loop) is skipped and named in the log. Case ids are safe folder names
    (:func:`safe_case_id`).

    Raises:
        InputError: when no input can be used at all (the message names each input and why).
    """
    cases: list[Case] = []
    taken: set[str] = set()
    skip = _Skipped(exclude)
    problems: list[InputError] = []
    for raw in inputs:
        path = Path(raw)
        try:
            cases.extend(_discover_one(path, roles, taken, skip))
        except InputError as err:
            problems.append(err)
            kind = "slices" if _is_2d_image(path) else "volume"
            cases.append(Case(_unique(file_stem(path) or path.name or "input", taken), str(path), kind, [],
                              error=err.reason))
    if problems and len(problems) == len(inputs):
        if len(problems) == 1:
            raise problems[0]
        raise InputError(None, "none of the inputs can be segmented: " + "; ".join(str(e) for e in problems))
    return cases


def _fills(name: str, roles: InputRoles, header_role: str | None = None) -> dict[str, str]:
    """Channel -> role for a possibly one-channel input named ``name`` (empty when nothing says its role)."""
    if len(roles.channels) == 1:
        return {}
    role = role_from_name(name, roles.channels, roles.overrides) or (
        header_role if header_role in roles.channels else None)
    if role is None:
        return {}
    fills = single_channel_fills(role, roles.channels, roles.fallbacks)
    return fills if isinstance(fills, dict) else {}


def _file_case(path: Path, kind: str, roles: InputRoles, taken: set[str]) -> Case:
    """A case of one file; a DICOM file's header may say which sequence it is."""
    header_role = None
    if kind == "volume" and not _is_volume(path):
        header = series_header(path)  # empty for a damaged file: reading it fails later with the reason
        header_role = classify_series(header, str(header.get("SeriesDescription", "")), None).role
    return Case(_unique(file_stem(path), taken), str(path), kind, [str(path)], fills=_fills(path.name, roles, header_role))


def _discover_one(path: Path, roles: InputRoles, taken: set[str], skip: _Skipped) -> list[Case]:
    """The cases of one input path; raises InputError when it cannot be used at all."""
    try:
        exists, is_file = path.exists(), path.is_file()
    except OSError as err:  # in a folder that cannot be entered
        raise InputError(path, cannot_read(err)) from err
    if not exists:
        raise InputError(path, "does not exist")
    if skip.is_output(path):
        raise InputError(path, "is an output of brainseg infer, not an input")
    if is_file:
        problem = read_problem(path)
        if problem:
            raise InputError(path, problem)
        if _is_2d_image(path):
            return [_file_case(path, "slices", roles, taken)]
        if _is_volume(path) or path.suffix.lower() in DICOM_FILE_SUFFIXES or pydicom.misc.is_dicom(path):
            return [_file_case(path, "volume", roles, taken)]
        raise InputError(path, f"unsupported file type; expected one of "
                               f"{IMAGE_2D_SUFFIXES + VOLUME_SUFFIXES + DICOM_FILE_SUFFIXES} or a DICOM file")
    series, unreadable, denied = _dicom_in_tree(path, skip)
    dicom: list[Case] = []
    if series:
        dicom = _dicom_cases(path, series, unreadable, roles, taken)
    once = _FolderOnce(skip)
    once.first_visit(path)
    found = _discover_folder(path, roles, taken, skip, bool(series or unreadable or denied), once)
    if not series and unreadable:
        if not found and not denied:  # nothing else to run: the folder as a whole is unusable
            listing = ", ".join(str(f.relative_to(path)) if f != path else "." for f in unreadable)
            raise InputError(path, _UNREADABLE + listing)
        dicom = _unreadable_cases(path, unreadable, taken)
    cases = _fail_denied(path, dicom, denied, taken) + found
    if not cases:
        raise InputError(path, "holds no image, volume or DICOM series to segment")
    return cases


def _fail_denied(root: Path, cases: list[Case], denied: Mapping[Path, str], taken: set[str]) -> list[Case]:
    """The DICOM ``cases`` of ``root``, failed where their folder holds a file that cannot be opened (GDCM would leave
    it out of its series without a word), and a failed case for each such folder in no case, each naming the file."""
    covered: set[Path] = set()
    for case in cases:
        source = Path(case.source)
        hits = [folder for folder in denied if folder == source or source in folder.parents]
        if hits:
            covered.update(hits)
            case.error = denied[hits[0]]
    cases = cases + [Case(_unique(_rel_id(root, folder), taken), str(folder), "dicom", [], error=reason)
                     for folder, reason in denied.items() if folder not in covered]
    return sorted(cases, key=lambda c: natural_key(c.source))


def _discover_folder(folder: Path, roles: InputRoles, taken: set[str], skip: _Skipped, dicom_tree: bool,
                     once: _FolderOnce) -> list[Case]:
    """The slices and volume cases in ``folder`` and below it (DICOM is found once for the whole tree).

    A sub-folder holding nothing to segment is a failed case, unless the tree holds DICOM: there such folders are
    part of a study (reports, a DICOMDIR's folders) and not cases. A sub-folder that cannot be listed is a failed
    case with the reason; symlinked folders are followed, each real folder once (``once``).

    Raises:
        InputError: when ``folder`` itself cannot be listed.
    """
    files, folders = _listing(folder)
    found: list[Case] = []
    slices = _slices_in(files)
    if slices:
        fills = _fills(folder.name, roles) or _fills(slices[0].name, roles)
        found.append(Case(_unique(folder.name, taken), str(folder), "slices", [str(p) for p in slices], fills=fills))
    volumes = _volumes_in(files)
    if volumes and len(roles.channels) == 1:
        found.extend(Case(_unique(file_stem(p), taken), str(p), "volume", [str(p)]) for p in volumes)
    elif volumes:
        found.append(_volume_channels_case(folder, volumes, roles, taken))
    subfolders = sorted((p for p in folders if not skip(p)), key=lambda p: natural_key(p.name))
    for sub in subfolders:
        if not once.first_visit(sub):
            continue
        try:
            below = _discover_folder(sub, roles, taken, skip, dicom_tree, once)
        except InputError as err:
            found.append(Case(_unique(sub.name, taken), str(sub), "volume", [], error=err.reason))
            continue
        if not below and not dicom_tree:
            below = [Case(_unique(sub.name, taken), str(sub), "volume", [],
                          error="holds no image, volume or DICOM series to segment")]
        found.extend(below)
    return found


def _volume_channels_case(folder: Path, volumes: list[Path], roles: InputRoles, taken: set[str]) -> Case:
    """One multi-channel volume case from a case folder: each role is the file whose name matches its pattern, a
    missing optional role filled from its fallback (the same roles and ``--channel`` overrides as DICOM)."""
    case_id = _unique(folder.name, taken)
    listing = ", ".join(v.name for v in volumes)
    chosen: dict[str, Path] = {}
    for role in roles.channels:
        pattern = roles.file_pattern(role)
        hits = [v for v in volumes if re.search(pattern, v.name, re.IGNORECASE)]
        if len(hits) > 1:
            return Case(case_id, str(folder), "volume", [], error=(
                f"channel '{role}' (file-name pattern {shown_pattern(pattern)}): {len(hits)} files match among "
                f"{listing}; "
                f"name one with --channel '{role}=REGEX'"))
        if hits:
            chosen[role] = hits[0]
    records, paths = [], []
    for role in roles.channels:
        source = role if role in chosen else roles.fallbacks.get(role)
        if source not in chosen:
            flags = " ".join(f"--channel '{r}=REGEX'" for r in roles.channels if r not in chosen)
            return Case(case_id, str(folder), "volume", [], error=(
                f"no file for the required channel '{role}' (file-name pattern "
                f"{shown_pattern(roles.file_pattern(role))}) among "
                f"{listing}; name the files with {flags}"))
        paths.append(str(chosen[source]))
        record = {"channel": role, "file": chosen[source].name,
                  "reason": f"file name matches {shown_pattern(roles.file_pattern(source))}"}
        if source != role:
            record.update(filled_from=source, reason=f"no {role} file: filled from {source}, as the model was trained for")
        records.append(record)
    return Case(case_id, str(folder), "volume", paths, roles={"primary": roles.primary, "roles": records},
                primary=roles.channels.index(roles.primary))
