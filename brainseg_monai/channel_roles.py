"""Which input plays which channel of a model: DICOM series chosen by sequence and stated rules, files by name.

A model names its input channels (roles such as ``t1``, ``flair``, ``t1c``), its primary channel (the grid the
others are resampled onto, the series the mask and the SEG lie on) and, for each optional channel, the channel that
fills it in when a study lacks it (the LGG model: ``t1`` and ``t1c`` from FLAIR, as it was trained and as the LGG set
stores missing sequences). This module matches a study's series, a case folder's files or a lone image to those
roles and records every choice, so that ``case.json`` can say why each series was or was not used.

Series selection, in order (each rule is stated in the record of the case it applied to):

1. Series that are never inputs are set aside: localizers, derived and secondary images, ADC/trace maps,
   reformats, stacks of fewer than 3 slices (:func:`brainseg_monai.sequences.classify_series`), and series whose
   SeriesDescription matches a user's ``skip`` pattern.
2. A role's candidates are the series identified as that sequence from their header (inversion, repetition and
   echo times, contrast agent, description), or, where the user gave ``--channel ROLE=REGEX`` (or a rules file's
   ``channels``), the series whose SeriesDescription matches the pattern.
3. Among several candidates, one is chosen by the ``prefer`` order: ``axial`` (acquired in the axial plane first),
   ``most_slices``, then ``latest`` (highest SeriesNumber), unless a rules file gives another order.
4. A role without a candidate is filled from its fallback channel when the model has one; a required role without a
   candidate fails the case with the list of series found and what each was taken to be.
"""

from __future__ import annotations

import json
import os
import re
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from brainseg_monai.errors import InputError, shown_pattern
from brainseg_monai.io import DicomSeries
from brainseg_monai.sequences import SeriesKind, classify_series

PREFERENCES = ("axial", "most_slices", "latest")
"""The tie-break rules among several candidate series for one role, in their default order."""

#: |cosine| between a slice normal and the patient's foot-head axis above which a series counts as axial (< 37 deg)
_AXIAL_COSINE = 0.8


@dataclass(frozen=True)
class SelectionRules:
    """A user's rules for choosing series (``--series-rules FILE``, JSON), in the spirit of MONAI Deploy's.

    ``{"channels": {"flair": "REGEX", ...}, "skip": ["REGEX", ...], "prefer": ["most_slices", "axial", "latest"]}``:
    ``channels`` picks a role's series by SeriesDescription (``--channel`` on the command line wins over it),
    ``skip`` sets series aside by SeriesDescription, ``prefer`` orders the tie-break rules (any subset of
    :data:`PREFERENCES`). All keys are optional.
    """

    channels: Mapping[str, str] = field(default_factory=dict)
    skip: Sequence[str] = ()
    prefer: Sequence[str] = PREFERENCES

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> SelectionRules:
        """Read and check a rules file.

        Raises:
            InputError: naming the file when it cannot be read, is not JSON, or holds unknown keys or bad values.
        """
        try:
            values = json.loads(Path(path).read_text())
        except (OSError, ValueError) as err:
            raise InputError(path, f"cannot read the series rules ({err})") from err
        if not isinstance(values, dict):
            raise InputError(path, "series rules must be a JSON object with 'channels', 'skip' and/or 'prefer'")
        unknown = sorted(set(values) - {"channels", "skip", "prefer"})
        if unknown:
            raise InputError(path, f"unknown keys {unknown} in the series rules (known: channels, skip, prefer)")
        try:
            return cls.checked(values.get("channels", {}), values.get("skip", []), values.get("prefer", PREFERENCES))
        except ValueError as err:
            raise InputError(path, str(err)) from err

    @classmethod
    def checked(cls, channels: Any, skip: Any, prefer: Any) -> SelectionRules:
        """Rules from plain values, each checked (patterns compile, preferences known).

        Raises:
            ValueError: naming the value at fault.
        """
        if not isinstance(channels, dict) or not all(isinstance(v, str) for v in channels.values()):
            raise ValueError(f"'channels' must map channel names to SeriesDescription patterns, not {channels!r}")
        if not isinstance(skip, list) or not all(isinstance(v, str) for v in skip):
            raise ValueError(f"'skip' must be a list of SeriesDescription patterns, not {skip!r}")
        if not isinstance(prefer, (list, tuple)) or not set(prefer) <= set(PREFERENCES) or len(set(prefer)) != len(prefer):
            raise ValueError(f"'prefer' must list some of {list(PREFERENCES)} once each, not {prefer!r}")
        for pattern in [*channels.values(), *skip]:
            compile_pattern(pattern)
        return cls(dict(channels), tuple(skip), tuple(prefer))


def compile_pattern(pattern: str) -> re.Pattern:
    """A case-insensitive regular expression, or a ValueError that names the pattern."""
    try:
        return re.compile(pattern, re.IGNORECASE)
    except re.error as err:
        raise ValueError(f"{shown_pattern(pattern)} is not a valid regular expression: {err}") from err


@dataclass
class RoleChoice:
    """What fills one channel of the model: a series, or the channel it is filled from."""

    role: str
    series: DicomSeries | None = None
    filled_from: str | None = None
    reason: str = ""

    def record(self) -> dict:
        """This choice as ``case.json`` states it (no patient attributes)."""
        out: dict[str, Any] = {"channel": self.role, "reason": self.reason}
        if self.filled_from is not None:
            out["filled_from"] = self.filled_from
        if self.series is not None:
            out["series"] = series_record(self.series)
        return out


@dataclass
class ChannelPlan:
    """The roles of one study or case: one choice per model channel (model order), what was left out, and why.

    ``error`` is set when a required channel has no input; the case then fails with that message.
    """

    choices: list[RoleChoice]
    primary: str
    rejected: list[dict] = field(default_factory=list)
    error: str | None = None

    @property
    def series(self) -> list[DicomSeries]:
        """The series read for each model channel, in model order (a filled channel reads its source's series)."""
        by_role = {c.role: c for c in self.choices}
        return [by_role[c.filled_from].series if c.filled_from else c.series for c in self.choices]  # type: ignore[misc]

    def record(self) -> dict:
        """``case.json``'s ``channels`` entry: each channel's series and why, the primary, the series left out."""
        return {"primary": self.primary, "roles": [c.record() for c in self.choices], "rejected": self.rejected}


def series_record(series: DicomSeries) -> dict:
    """A series as ``case.json`` names it: UID, description, number, size and spacing (no patient attributes)."""
    header = series.header
    spacing = [float(v) for v in header.get("PixelSpacing", [])[:2] if _number(v) is not None]
    out: dict[str, Any] = {
        "uid": series.series_uid,
        "description": series.description,
        "number": _int_or_none(header.get("SeriesNumber")),
        "slices": len(series.files),
        "size": [_int_or_none(header.get("Columns")), _int_or_none(header.get("Rows")), len(series.files)],
        "pixel_spacing_mm": spacing or None,
        "slice_thickness_mm": _number(header.get("SliceThickness")),
        "plane": plane_of(series),
        "folder": str(series.folder),
    }
    return out


def _number(value: Any) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _int_or_none(value: Any) -> int | None:
    number = _number(value)
    return None if number is None else int(number)


def plane_of(series: DicomSeries) -> str:
    """``axial``, ``coronal``, ``sagittal`` from ImageOrientationPatient's slice normal, or ``unknown``."""
    cosines = [_number(v) for v in series.header.get("ImageOrientationPatient", [])]
    if len(cosines) != 6 or any(c is None for c in cosines):
        return "unknown"
    normal = np.cross(np.asarray(cosines[:3], dtype=float), np.asarray(cosines[3:], dtype=float))
    if not np.linalg.norm(normal):
        return "unknown"
    axis = int(np.argmax(np.abs(normal)))
    if abs(normal[axis]) / np.linalg.norm(normal) < _AXIAL_COSINE:
        return "oblique"
    return ("sagittal", "coronal", "axial")[axis]


def _ranked(candidates: list[DicomSeries], prefer: Sequence[str]) -> tuple[list[DicomSeries], list[str]]:
    """Candidates best first by the ``prefer`` rules, and for each one after the first the rule that put the first
    ahead of it, in words."""
    planes = {id(s): plane_of(s) for s in candidates}
    keys = {
        "axial": lambda s: planes[id(s)] == "axial",
        "most_slices": lambda s: len(s.files),
        "latest": lambda s: _number(s.header.get("SeriesNumber")) or 0.0,
    }
    ranked = sorted(candidates, key=lambda s: tuple(keys[p](s) for p in prefer), reverse=True)
    best = ranked[0]
    words = {"axial": lambda s: f"axial first ({planes[id(best)]} vs {planes[id(s)]})",
             "most_slices": lambda s: f"most slices ({len(best.files)} vs {len(s.files)})",
             "latest": lambda s: f"latest SeriesNumber ({_int_or_none(best.header.get('SeriesNumber'))} vs "
                                 f"{_int_or_none(s.header.get('SeriesNumber'))})"}
    reasons = []
    for other in ranked[1:]:
        decided = next((p for p in prefer if keys[p](best) != keys[p](other)), None)
        reasons.append(words[decided](other) if decided else "the candidates tie on every rule: the first found")
    return ranked, reasons


def plan_dicom_channels(
    series: Sequence[DicomSeries],
    channels: Sequence[str],
    primary: str,
    fallbacks: Mapping[str, str],
    overrides: Mapping[str, str] | None = None,
    rules: SelectionRules | None = None,
) -> ChannelPlan:
    """Choose a series for each of ``channels`` among one study's ``series`` by the rules of this module.

    Args:
        series: the series of one study (one patient, one StudyInstanceUID).
        channels: the model's channel names, in model order.
        primary: the model's primary channel.
        fallbacks: channel -> channel that fills it in when missing.
        overrides: channel -> SeriesDescription regex (``--channel``), winning over ``rules.channels``.
        rules: the user's selection rules (default :class:`SelectionRules`).
    """
    rules = rules or SelectionRules()
    patterns = {**rules.channels, **(overrides or {})}
    skips = [compile_pattern(p) for p in rules.skip]
    kinds: dict[str, SeriesKind] = {}
    set_aside: dict[str, str] = {}
    for s in series:
        kind = classify_series(s.header, s.description, len(s.files))
        kinds[s.series_uid] = kind
        hit = next((p for p in skips if p.search(s.description)), None)
        if hit is not None:
            set_aside[s.series_uid] = f"skipped by the rule pattern {shown_pattern(hit.pattern)}"
        elif kind.skip:
            set_aside[s.series_uid] = f"not an input: {kind.skip}"
    usable = [s for s in series if s.series_uid not in set_aside]

    choices: dict[str, RoleChoice] = {}
    lost: dict[str, str] = {}
    for role in channels:
        if role in patterns:
            regex = compile_pattern(patterns[role])
            candidates = [s for s in usable if regex.search(s.description)]
            how = f"SeriesDescription matches {shown_pattern(patterns[role])}"
        else:
            candidates = [s for s in usable if kinds[s.series_uid].role == role]
            how = "identified from its header"
        if not candidates:
            continue
        ranked, reasons = _ranked(candidates, rules.prefer)
        best = ranked[0]
        reason = how if role in patterns else f"{how}: {kinds[best.series_uid].describe()}"
        if len(ranked) > 1:
            reason += (f"; chosen among {len(ranked)} candidates by the rules {', '.join(rules.prefer)} "
                       f"(see the rejected series)")
        choices[role] = RoleChoice(role, best, reason=reason)
        for other, why in zip(ranked[1:], reasons):
            lost.setdefault(other.series_uid, f"a {role} candidate, but series {_int_or_none(best.header.get('SeriesNumber'))} "
                                              f"'{best.description}' was preferred: {why}")

    plan_choices: list[RoleChoice] = []
    missing: list[str] = []
    for role in channels:
        if role in choices:
            plan_choices.append(choices[role])
        elif fallbacks.get(role) in choices:
            plan_choices.append(RoleChoice(role, filled_from=fallbacks[role], reason=(
                f"no {role} series in the study: filled from {fallbacks[role]}, as the model was trained for")))
        else:
            missing.append(role)
            plan_choices.append(RoleChoice(role, reason=f"no {role} series in the study"))
    used = {c.series.series_uid for c in plan_choices if c.series is not None}
    rejected = []
    for s in series:
        if s.series_uid in used:
            continue
        kind = kinds[s.series_uid]
        why = set_aside.get(s.series_uid) or lost.get(s.series_uid) or (
            f"taken to be {kind.role}, which the model does not use" if kind.role else
            "its sequence could not be identified from its header or description")
        rejected.append({**series_record(s), "taken_to_be": kind.describe(), "reason": why})
    plan = ChannelPlan(plan_choices, primary, rejected)
    if missing:
        plan.error = _missing_message(missing, series, kinds, set_aside, channels, fallbacks)
    return plan


def _missing_message(missing: list[str], series: Sequence[DicomSeries], kinds: Mapping[str, SeriesKind],
                     set_aside: Mapping[str, str], channels: Sequence[str], fallbacks: Mapping[str, str]) -> str:
    """Why a study cannot run: the channels without a series, every series and what it was taken to be, and the
    ``--channel`` flags that would choose series by hand."""
    found = "; ".join(
        f"'{s.description or '(no description)'}' ({set_aside.get(s.series_uid) or kinds[s.series_uid].describe()})"
        for s in series) or "none"
    needed = ", ".join(f"'{m}'" for m in missing)
    usable = [s for s in series if s.series_uid not in set_aside and s.description]
    hint = ""
    if usable:
        flags = " ".join(f"--channel {shlex.quote(f'{m}={re.escape(usable[0].description)}')}" for m in missing)
        hint = f"; if one of them is the {'/'.join(missing)} series, name it: e.g. {flags}"
    optional = [c for c in channels if c in fallbacks]
    also = f" ({', '.join(optional)} can be missing: filled from {fallbacks[optional[0]]})" if optional else ""
    return f"no series for the required channel {needed}{also}; series found: {found}{hint}"


def role_from_name(name: str, channels: Sequence[str], overrides: Mapping[str, str] | None = None) -> str | None:
    """The channel a lone file or folder plays, from ``--channel ROLE=REGEX`` on its name or from the name itself.

    A name says its role when it holds the channel's name as a word (``case_flair.nii.gz``, ``FLAIR.png``); a
    ``--channel`` pattern matching the name wins. None when nothing says (the image is then refused, not guessed).
    """
    for role, pattern in (overrides or {}).items():
        if role in channels and compile_pattern(pattern).search(name):
            return role
    words = set(re.split(r"[^0-9a-z]+", name.lower()))
    named = [role for role in channels if role.lower() in words]
    return named[0] if len(named) == 1 else None


def single_channel_fills(role: str, channels: Sequence[str], fallbacks: Mapping[str, str]) -> dict[str, str] | str:
    """How a one-channel input playing ``role`` fills every channel of the model: channel -> ``role``.

    Returns the map, or a message saying which channels it cannot fill (they are required, or fall back to another).
    """
    fills = {c: role for c in channels if c == role or fallbacks.get(c) == role}
    unfilled = [c for c in channels if c not in fills]
    if unfilled:
        return (f"a {role} image alone cannot fill channel(s) {', '.join(unfilled)} of the model "
                f"({', '.join(channels)}; fallbacks: {dict(fallbacks) or 'none'})")
    return fills


@dataclass(frozen=True)
class InputRoles:
    """Everything discovery needs to match inputs to a model's channels: the model's roles and the user's choices.

    ``overrides`` are ``--channel ROLE=REGEX``: a regex on SeriesDescription for DICOM, on file names for volume
    case folders and lone files.
    """

    channels: tuple[str, ...]
    primary: str
    fallbacks: Mapping[str, str] = field(default_factory=dict)
    overrides: Mapping[str, str] = field(default_factory=dict)
    rules: SelectionRules = field(default_factory=SelectionRules)

    def __post_init__(self) -> None:
        unknown = sorted(set(self.overrides) - set(self.channels))
        if unknown and len(self.channels) > 1:
            raise ValueError(f"--channel names {unknown} are not channels of the model ({', '.join(self.channels)}).")
        for pattern in self.overrides.values():
            compile_pattern(pattern)

    @classmethod
    def of(cls, spec: Any, overrides: Mapping[str, str] | None = None,
           rules: SelectionRules | None = None) -> InputRoles:
        """The roles of a :class:`~brainseg_monai.model.ModelSpec`, with the user's choices."""
        return cls(tuple(spec.channels), spec.primary_channel, dict(spec.channel_fallbacks), dict(overrides or {}),
                   rules or SelectionRules())

    def file_pattern(self, role: str) -> str:
        """The file-name regex of ``role`` in a volume case folder: ``--channel``'s, else ``<case>_<role>.nii.gz``."""
        return self.overrides.get(role) or rf"[_-]{re.escape(role)}\.(nii|mha|mhd|nrrd)"
