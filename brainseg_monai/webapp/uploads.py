"""Uploaded files on disk: safe names, a size budget, zip archives unpacked, truth masks told apart from inputs.

Everything lands in the request's temporary folder; names are reduced to a plain file name so an upload can never
be written outside it, and `ShownNames` names every file as the user uploaded it in what the page shows.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from brainseg_monai.errors import InputError
from brainseg_monai.io import DICOM_FILE_SUFFIXES, IMAGE_2D_SUFFIXES, VOLUME_SUFFIXES

__all__ = ["ACCEPTED_SUFFIXES", "ShownNames", "SizeBudget", "UploadTooLarge", "Uploads", "sort_uploads", "store_upload",
           "unpack_zip"]

ACCEPTED_SUFFIXES = IMAGE_2D_SUFFIXES + VOLUME_SUFFIXES + DICOM_FILE_SUFFIXES + (".zip",)
_TRUTH_STEM = re.compile(r"[_-](mask|seg|label|truth|gt)$", re.IGNORECASE)
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
_CHUNK = 1 << 20


class UploadTooLarge(Exception):
    """The upload (or a zip's content) exceeds the configured size limit."""

    def __init__(self, limit_bytes: int, what: str = "upload") -> None:
        self.limit_bytes = limit_bytes
        super().__init__(f"the {what} is larger than the limit of {limit_bytes / 2**20:.0f} MB")


class SizeBudget:
    """Bytes an upload may still take; ``charge`` raises `UploadTooLarge` once they are spent.

    Args:
        limit_bytes: the whole upload's limit.

    Raises:
        ValueError: when ``limit_bytes`` is not positive.
    """

    def __init__(self, limit_bytes: int) -> None:
        if limit_bytes <= 0:
            raise ValueError(f"limit_bytes must be positive but is {limit_bytes!r}.")
        self.limit_bytes = self.left = int(limit_bytes)

    def charge(self, size: int) -> None:
        self.left -= size
        if self.left < 0:
            raise UploadTooLarge(self.limit_bytes)


def suffix_of(name: str) -> str:
    """The accepted suffix ``name`` ends with (``.nii.gz`` counts as one), or ``""``."""
    lower = name.lower()
    return next((s for s in sorted(ACCEPTED_SUFFIXES, key=len, reverse=True) if lower.endswith(s)), "")


def stem_of(name: str) -> str:
    suffix = suffix_of(name)
    return name[: -len(suffix)] if suffix else Path(name).stem


def safe_name(filename: str) -> str:
    """The file name part of an uploaded name, with anything but letters, digits, ``._-`` replaced by ``_``."""
    name = _UNSAFE.sub("_", Path(filename.replace("\\", "/")).name).lstrip(".")
    return name or "upload"


def store_upload(filename: str, stream: BinaryIO, folder: Path, budget: SizeBudget) -> Path:
    """Copy one uploaded file into ``folder`` under its safe name, charging its size to ``budget``.

    Raises:
        InputError: when the file type is not one the tool reads (the message lists the accepted ones).
        UploadTooLarge: when the budget runs out.
    """
    name = safe_name(filename)
    if not suffix_of(name):
        raise InputError(filename, f"unsupported file type; accepted: {', '.join(ACCEPTED_SUFFIXES)}")
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    n = 2
    while path.exists():
        path, n = folder / f"{stem_of(name)}_{n}{suffix_of(name)}", n + 1
    with path.open("wb") as handle:
        while chunk := stream.read(_CHUNK):
            budget.charge(len(chunk))
            handle.write(chunk)
    if path.stat().st_size == 0:
        raise InputError(filename, "is empty (0 bytes)")
    return path


def unpack_zip(archive: Path, dest: Path, max_bytes: int) -> Path:
    """Unpack ``archive`` into ``dest``, refusing links, entries that would land outside it and content over
    ``max_bytes``.

    A symbolic link is never unpacked (as a link it could point anywhere on the server, as a file it would be a
    path, not the data). Messages name the archive and the entry, never a server path.

    Raises:
        InputError: when the archive is unreadable, holds a link or an unsafe path, or an entry cannot be written
            (e.g. a file and a folder of one name).
        UploadTooLarge: when the unpacked content would exceed ``max_bytes``.
    """
    try:
        with zipfile.ZipFile(archive) as bundle:
            entries = [e for e in bundle.infolist() if not e.is_dir()]
            if sum(e.file_size for e in entries) > max_bytes:
                raise UploadTooLarge(max_bytes, "unpacked zip")
            root = dest.resolve()
            for entry in entries:
                if stat.S_ISLNK(entry.external_attr >> 16):
                    raise InputError(archive, (
                        f"holds a symbolic link, {entry.filename!r}: links are not unpacked; zip the files themselves"))
                target = (dest / entry.filename).resolve()
                if root not in target.parents:
                    raise InputError(archive, f"holds an entry outside the archive folder: {entry.filename!r}")
                try:
                    target.parent.mkdir(parents=True, exist_ok=True)
                    with bundle.open(entry) as src, target.open("wb") as dst:
                        shutil.copyfileobj(src, dst, _CHUNK)
                except OSError as err:
                    raise InputError(archive, f"entry {entry.filename!r} cannot be unpacked ({err.strerror})") from err
    except (zipfile.BadZipFile, EOFError, zipfile.LargeZipFile) as err:
        raise InputError(archive, f"is not a readable zip archive ({err})") from err
    return dest


class ShownNames:
    """The request's files as the user knows them: each upload by the name it was uploaded as, a file unpacked from
    a zip as ``<zip name>/<path in the zip>``; the server's temporary folders never show.

    Args:
        tmp: the request's temporary folder.
    """

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self._names: dict[Path, str] = {}

    def add(self, stored: Path, uploaded: str) -> None:
        """``stored`` (a file, or the folder a zip was unpacked into) is shown as ``uploaded``."""
        self._names[stored] = uploaded

    def move(self, old: Path, new: Path) -> None:
        """A stored file moved from ``old`` to ``new`` keeps its name."""
        self._names[new] = self._names.pop(old, old.name)

    def __call__(self, path: str | os.PathLike) -> str:
        """How the page names ``path``."""
        path = Path(path)
        for stored in self._longest_first():
            if path == stored:
                return self._names[stored]
            if path.is_relative_to(stored):
                return f"{self._names[stored]}/{path.relative_to(stored).as_posix()}"
        for base in self._bases():
            if path.is_relative_to(base) and path != base:
                return path.relative_to(base).as_posix()
        return "the upload" if path == self.tmp else path.name

    def text(self, text: str) -> str:
        """``text`` with every path of the request it quotes named as the user knows it."""
        for stored in self._longest_first():
            for form in dict.fromkeys((str(stored), os.path.realpath(stored))):
                text = text.replace(form, self(stored))
        for base in self._bases():
            for form in dict.fromkeys((str(base), os.path.realpath(base))):
                text = text.replace(f"{form}{os.sep}", "").replace(form, "the upload")
        return text

    def _longest_first(self) -> list[Path]:
        return sorted(self._names, key=lambda p: len(str(p)), reverse=True)

    def _bases(self) -> list[Path]:
        """The request's work folders, then the request's folder itself (paths below them are shown relative)."""
        return [self.tmp / name for name in ("input", "uploads", "truth", "output")] + [self.tmp]


@dataclass
class Uploads:
    """The uploaded files sorted by role: inputs by kind and truth masks (by the input stem they belong to)."""

    slices: list[Path] = field(default_factory=list)
    volumes: list[Path] = field(default_factory=list)
    dicom: list[Path] = field(default_factory=list)
    zips: list[Path] = field(default_factory=list)
    truths: dict[str, Path] = field(default_factory=dict)

    def kinds(self) -> list[str]:
        return [k for k in ("slices", "volumes", "dicom", "zips") if getattr(self, k)]


def sort_uploads(paths: Iterable[Path]) -> Uploads:
    """Sort stored uploads: ``<stem>_mask`` (or ``_seg``, ``_label``, ``_truth``, ``_gt``) files are truth for ``<stem>``."""
    found = Uploads()
    for path in paths:
        suffix, stem = suffix_of(path.name), stem_of(path.name)
        match = _TRUTH_STEM.search(stem)
        if match and suffix != ".zip":
            found.truths[stem[: match.start()]] = path
        elif suffix in IMAGE_2D_SUFFIXES:
            found.slices.append(path)
        elif suffix in VOLUME_SUFFIXES:
            found.volumes.append(path)
        elif suffix in DICOM_FILE_SUFFIXES:
            found.dicom.append(path)
        else:
            found.zips.append(path)
    return found
