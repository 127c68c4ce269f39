"""Checks for input files that someone else wrote: a header must not make the reader open files outside its folder.

Some image formats keep their header apart from their pixels, and the header names the pixel file. SimpleITK follows
that name wherever it points: a MetaImage header (``.mhd``/``.mha``) with ``ElementDataFile = /etc/passwd`` makes
the reader load that file as pixels, and a web page showing the image shows the file. The same holds for NRRD's
``data file`` (detached ``.nhdr`` headers, also in a ``.nrrd``) and for an Analyze/NIfTI ``.hdr`` whose ``.img`` is a
link. `check_detached_data` reads only the header text (never the pixels) and refuses every file that lies, and every
header whose data files lie, outside the folder the input came in (links followed). ``brainseg serve`` runs it on
every uploaded and unzipped file; it takes a folder as well, for inputs of ``brainseg infer`` from an untrusted place.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path

from brainseg_monai.errors import InputError

__all__ = ["HEADER_SUFFIXES", "MAX_PATTERN_FILES", "check_detached_data"]

METAIMAGE_SUFFIXES = (".mhd", ".mha")
NRRD_SUFFIXES = (".nhdr", ".nrrd")
ANALYZE_SUFFIXES = (".hdr", ".hdr.gz")
HEADER_SUFFIXES = METAIMAGE_SUFFIXES + NRRD_SUFFIXES + ANALYZE_SUFFIXES
"""Files whose header may name other files to read: MetaImage, NRRD, Analyze/NIfTI pairs."""

MAX_PATTERN_FILES = 100_000
"""Most file names a numbered pattern (``slice%03d.raw 1 200 1``) may expand to; a header promising more is refused
rather than expanded (a volume of more slices would be refused by the size limits of `brainseg_monai.io` anyway)."""

#: Bytes of a header read at most: the text part of a MetaImage or NRRD file is a few hundred bytes; pixels may follow.
_HEADER_BYTES = 1 << 20
#: One integer conversion of printf: what MetaIO and NRRD fill with the slice number.
_INTEGER_FIELD = re.compile(r"%[-+ 0#]*\d*[diu]")


def check_detached_data(path: str | os.PathLike, root: str | os.PathLike) -> None:
    """Refuse ``path`` (a file, or every file in a folder and below) if a reader would open a file outside ``root``.

    Refused, with links followed: a file that lies outside ``root`` (a link out of it), and a header naming a data
    file outside it: MetaImage ``ElementDataFile`` (a file, a ``LIST`` of files, or a numbered pattern), NRRD
    ``data file``/``datafile`` (the same three forms), the ``.img`` beside an Analyze/NIfTI ``.hdr``. Names relative
    to the header are taken from its folder, as the readers do. Nothing but header text is read.

    Args:
        path: a file, or a folder whose every file (sub-folders included; links to folders are not entered) is
            checked.
        root: the folder the input must stay within (e.g. the folder an upload was unpacked into).

    Raises:
        InputError: naming the file, the data file name its header gives, and why it is refused.
    """
    root_dir = Path(os.path.realpath(root))
    for file in _files(Path(path)):
        for named, target in _opened_files(file):
            if not Path(os.path.realpath(target)).is_relative_to(root_dir):
                what = "is a link to a file" if named is None else f"names the data file {named!r}, which is"
                raise InputError(file, (
                    f"{what} outside the folder it came in; refused before reading (an image header may only name "
                    f"data files beside it)"))


def _files(path: Path) -> Iterator[Path]:
    """``path`` itself, or every file in the folder ``path`` and below."""
    if not path.is_dir():
        yield path
        return
    for folder, _, names in os.walk(path):
        for name in sorted(names):
            yield Path(folder) / name


def _opened_files(file: Path) -> Iterator[tuple[str | None, Path]]:
    """The file itself (name None), then for a header each file it may make a reader open, with the name as
    written."""
    yield None, file
    name = file.name.lower()
    if name.endswith(ANALYZE_SUFFIXES):
        stem = file.name[: -len(".hdr.gz")] if name.endswith(".hdr.gz") else file.name[: -len(".hdr")]
        for partner in (f"{stem}.img", f"{stem}.img.gz"):
            yield partner, file.parent / partner
    elif name.endswith(METAIMAGE_SUFFIXES + NRRD_SUFFIXES):
        lines, whole = _header_lines(file)
        reader = _metaimage_values if name.endswith(METAIMAGE_SUFFIXES) else _nrrd_values
        for index, field, value in reader(lines, whole, file):
            for written in _named_files(file, field, value, lines[index + 1:], whole):
                yield written, file.parent / written  # an absolute name replaces the folder


def _header_lines(header: Path) -> tuple[list[str], bool]:
    """The header's first `_HEADER_BYTES` as text lines (latin-1, so any byte reads), and whether that is all of it.

    Raises:
        InputError: when the file cannot be read.
    """
    try:
        with header.open("rb") as handle:
            text = handle.read(_HEADER_BYTES + 1)
    except OSError as err:
        raise InputError(header, f"cannot be read to check the data files it names ({err.strerror})") from err
    return text[:_HEADER_BYTES].decode("latin-1").splitlines(), len(text) <= _HEADER_BYTES


def _metaimage_values(lines: list[str], whole: bool, header: Path) -> Iterator[tuple[int, str, str]]:
    """Each ``ElementDataFile`` line up to the one that ends a MetaImage header for MetaIO (the key exactly, before
    ``=``); spellings MetaIO may not take (another case, ``:``) are checked as well, to be safe.

    Raises:
        InputError: when no line ends the header within `_HEADER_BYTES` of a longer file (what follows is unknown).
    """
    for index, line in enumerate(lines):
        key, sep, value = line.partition("=")
        if not sep:
            key, sep, value = line.partition(":")
        if sep and key.strip().lower() == "elementdatafile":
            yield index, key.strip(), value.strip()
            if sep == "=" and key.strip() == "ElementDataFile":
                return
    if not whole:
        raise InputError(header, f"has no ElementDataFile in its first {_HEADER_BYTES:,} bytes; refused unread")


def _nrrd_values(lines: list[str], whole: bool, header: Path) -> Iterator[tuple[int, str, str]]:
    """Each ``data file`` (or ``datafile``, any case) field of a NRRD header, which ends at the first empty line.

    Raises:
        InputError: when the header does not end within `_HEADER_BYTES` of a longer file (what follows is unknown).
    """
    for index, line in enumerate(lines):
        if line == "":
            return
        key, sep, value = line.partition(":")
        if sep and not value.startswith("=") and key.strip().lower() in ("data file", "datafile"):
            yield index, key.strip(), value.strip()
    if not whole:
        raise InputError(header, f"has a header longer than {_HEADER_BYTES:,} bytes; refused unread")


def _named_files(header: Path, field: str, value: str, rest: list[str], whole: bool) -> list[str]:
    """Every file name a data-file field may stand for: the value and each of its words, a numbered pattern's
    expansion (``<format> <first> <last> <step>``), and for ``LIST`` each following line and its words.

    Taking every reading at once keeps the check safe where a reader parses the field in a way this module does not
    foresee: each name it could open is checked.

    Raises:
        InputError: for a pattern this check cannot expand, or a ``LIST`` running past `_HEADER_BYTES`.
    """
    words = value.split()
    names = _pattern(header, field, words) if words and "%" in words[0] else []
    names += [value, *words]
    if value.upper().startswith("LIST"):
        if not whole:
            raise InputError(header, f"its {field} LIST runs past {_HEADER_BYTES:,} bytes; refused unread")
        for line in rest:
            names += [line.strip(), *line.split()]
    return [n for n in dict.fromkeys(names) if n]


def _pattern(header: Path, field: str, words: list[str]) -> list[str]:
    """Every name of a numbered pattern ``<format> <first> <last> <step>`` (one printf integer field).

    Raises:
        InputError: when the pattern is not one integer field with whole-number bounds and a non-zero step, or
            would name more than `MAX_PATTERN_FILES` files.
    """
    form = words[0]
    fields = form.replace("%%", "")
    try:
        first, last, step = (int(w) for w in words[1:4])
    except ValueError:  # fewer than three numbers, or not whole numbers
        first = last = step = 0
    if step == 0 or fields.count("%") != 1 or not _INTEGER_FIELD.search(fields):
        raise InputError(header, (
            f"its {field} {' '.join(words)!r} is not a numbered file pattern this check can verify (one %d field, "
            f"then first, last and step numbers); refused before reading"))
    numbers = range(first, last + (1 if step > 0 else -1), step)
    if len(numbers) > MAX_PATTERN_FILES:
        raise InputError(header, (
            f"its {field} pattern names {len(numbers):,} files, more than {MAX_PATTERN_FILES:,}; refused before "
            f"reading"))
    return [form % number for number in numbers]
