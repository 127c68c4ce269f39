"""The page's view of channel roles: what each uploaded series or file was taken to be and which channel it fills,
and the user's own choices turned into the ``--channel`` overrides of ``brainseg infer``.

The web app applies the library's rules (`brainseg_monai.channel_roles`): sequences identified from the DICOM
header, series chosen by the stated rules, missing channels filled from their fallback. `describe_inputs` lays out
what those rules decided for one case (from ``Case.roles``) and what the user may choose instead; `channel_overrides`
turns the choices sent back into the patterns `run_inference` takes, each matching exactly one SeriesDescription or
file name.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from brainseg_monai.channel_roles import single_channel_fills
from brainseg_monai.inference.cases import Case
from brainseg_monai.io import DicomSeries, find_dicom_series
from brainseg_monai.model import ModelSpec
from brainseg_monai.sequences import classify_series
from brainseg_monai.webapp.uploads import sort_uploads

__all__ = ["FILL_FROM_FALLBACK", "channel_overrides", "describe_inputs", "exact_name", "one_channel_choice"]

FILL_FROM_FALLBACK = r"(?!)"
"""The override of a channel the user wants filled from its fallback: a pattern no name matches, so no input is
matched to the channel and the rules fill it as for a study that lacks the sequence."""


def exact_name(name: str) -> str:
    """A ``--channel`` pattern matching exactly ``name`` (a SeriesDescription or a file name), nothing longer."""
    return f"^{re.escape(name)}$"


def channel_overrides(choices: Mapping[str, Any], spec: ModelSpec) -> dict[str, str]:
    """The ``channels`` overrides of `InferenceSettings` for the page's choices of channel roles.

    Args:
        choices: model channel -> ``{"name": N}`` (the series whose SeriesDescription is N, or the file named N) or
            ``{"fill": F}`` (no input: the channel is filled from F, its fallback in ``model.json``). Channels left
            out are chosen by the rules.
        spec: the model, for its channels and fallbacks.

    Raises:
        ValueError: naming the channel, for an unknown channel, a malformed choice, or a fill the model does not
            allow.
    """
    if not isinstance(choices, Mapping):
        raise ValueError(f"channels must map channel names to choices but is {choices!r}.")
    overrides = {}
    for channel, choice in choices.items():
        if channel not in spec.channels:
            raise ValueError(f"{channel!r} is not a channel of the model ({', '.join(spec.channels)}).")
        if isinstance(choice, Mapping) and set(choice) == {"name"} and isinstance(choice["name"], str):
            overrides[channel] = exact_name(choice["name"])
        elif isinstance(choice, Mapping) and set(choice) == {"fill"}:
            fallback = spec.channel_fallbacks.get(channel)
            if fallback is None or choice["fill"] != fallback:
                allowed = f"only from {fallback}" if fallback else "not at all: it is required"
                raise ValueError(f"channel {channel!r} cannot be filled from {choice['fill']!r}; the model fills it "
                                 f"{allowed}.")
            overrides[channel] = FILL_FROM_FALLBACK
        else:
            raise ValueError(f"the choice for channel {channel!r} must be {{'name': ...}} or {{'fill': ...}}, "
                             f"not {choice!r}.")
    return overrides


def one_channel_choice(name: str, shown: str, role: str | None, spec: ModelSpec) -> dict:
    """The page's "this image is" choice for a lone one-channel image given to a multi-channel model.

    ``name`` is what the choice is sent back as (the name discovery matches the role's pattern on), ``shown`` the
    upload as the user named it, ``role`` the role its name gave it (None: nothing says). Each role says whether it
    can fill the model alone (with the model's fallbacks) and, if not, why.
    """
    roles = []
    for channel in spec.channels:
        fills = single_channel_fills(channel, spec.channels, spec.channel_fallbacks)
        usable = isinstance(fills, dict)
        roles.append({"role": channel, "usable": usable, "note": "" if usable else fills})
    return {"name": name, "shown": shown, "role": role, "roles": roles}


def describe_inputs(case: Case, spec: ModelSpec, shown: Callable[[str], str],
                    overrides: Mapping[str, str] | None = None) -> dict:
    """What the page shows of one case's inputs and lets the user choose.

    Returns ``{"case", "kind", "primary", "series", "files", "channels", "choices", "one_channel"}``:
    ``series`` (DICOM) lists every series of the study: ``name`` (SeriesDescription), ``number``, ``images``,
    ``plane``, ``folder`` (as uploaded), ``taken_to_be`` (what its header says it is), ``used_as`` (the channels it
    fills), ``note`` (why it is not used) and ``selectable``; ``files`` (a volume case folder) lists each volume file with ``used_as``;
    ``channels`` says per model channel its ``source`` (a series or file name, or None), ``filled_from``,
    ``reason`` and ``fallback``; ``choices`` are the names a channel may be set to; ``one_channel`` is set by the
    caller for a lone one-channel image.

    Args:
        case: a discovered case.
        spec: the model.
        shown: a path as the user knows it (never the server's temporary folders).
        overrides: the channels the user set by hand (their reasons say so, and a series of such a channel's
            sequence that is not used says so, rather than that the model does not use the sequence).
    """
    overrides = overrides or {}
    records = {r["channel"]: r for r in case.roles.get("roles", [])}
    folder_case = case.kind == "volume" and Path(case.source).is_dir()
    series, files, choices = [], [], []
    if case.kind == "dicom":
        series = _series_rows(case, records, shown, spec, overrides)
        choices = list(dict.fromkeys(row["name"] for row in series if row["selectable"]))
    elif folder_case:
        files = _file_rows(case, records)
        choices = [row["name"] for row in files]
    channels = []
    if case.kind == "dicom" or folder_case:
        for channel in spec.channels:
            record = records.get(channel, {})
            source = records.get(record.get("filled_from"), record)
            reason = record.get("reason", "")
            if overrides.get(channel) == FILL_FROM_FALLBACK:
                reason = f"set by hand: filled from {record.get('filled_from')}"
            elif channel in overrides and reason:
                reason = f"set by hand: {reason}"
            channels.append({
                "channel": channel,
                "source": source.get("file") or source.get("series", {}).get("description"),
                "filled_from": record.get("filled_from"),
                "reason": reason,
                "fallback": spec.channel_fallbacks.get(channel),
            })
    return {"case": case.case_id, "kind": case.kind, "primary": spec.primary_channel, "series": series,
            "files": files, "channels": channels, "choices": choices, "one_channel": None}


def _used_as(records: Mapping[str, Mapping[str, Any]], key: Callable[[Mapping[str, Any]], str | None]) -> dict:
    """Input (by ``key`` of its record) -> the channels it fills, a filled channel counting for its source's input."""
    used: dict[str, list[str]] = {}
    for channel, record in records.items():
        source = records.get(record.get("filled_from"), record)
        name = key(source)
        if name is not None:
            used.setdefault(name, []).append(channel)
    return used


def _series_rows(case: Case, records: Mapping[str, Mapping[str, Any]], shown: Callable[[str], str],
                 spec: ModelSpec, overrides: Mapping[str, str]) -> list[dict]:
    """Every series of a DICOM case's study, as ``case.json`` records them, with what its header says it is.

    The records name each series' folder; the series there are listed again (a header read, no pixels) to classify
    those the record lists as chosen, whose classification it gives only in words. A one-channel model's case has
    no record: its one series fills the channel.
    """
    rejected = case.roles.get("rejected", [])
    listed = [r["series"] for r in records.values() if "series" in r] + list(rejected)
    found: dict[str, DicomSeries] = {s.series_uid: s for s in case.series}
    for folder in dict.fromkeys(str(r["folder"]) for r in listed):
        if Path(folder).is_dir():
            found.update({s.series_uid: s for s in find_dicom_series(folder) if s.series_uid not in found})
    used = _used_as(records, lambda r: r.get("series", {}).get("uid"))
    if not listed:  # a one-channel model's case: its series alone
        listed = [{"uid": s.series_uid, "description": s.description, "number": None, "slices": len(s.files),
                   "plane": None, "folder": str(s.folder)} for s in case.series]
        used = {s.series_uid: [spec.channels[0]] for s in case.series}
    notes = {r["uid"]: r.get("reason", "") for r in rejected}
    rows = {}
    for record in listed:
        uid = record["uid"]
        if uid in rows:
            continue
        kind = None
        if uid in found:
            item = found[uid]
            kind = classify_series(item.header, item.description, len(item.files))
        note = notes.get(uid, "")
        if uid not in used and kind is not None and kind.role in overrides:
            note = f"not used: the {kind.role} channel was set by hand"
        rows[uid] = {
            "name": record["description"], "number": record.get("number"), "images": record.get("slices"),
            "plane": record.get("plane"), "folder": shown(str(record["folder"])),
            "taken_to_be": kind.describe() if kind else record.get("taken_to_be", ""),
            "used_as": used.get(uid, []),
            "note": note,
            "selectable": kind is not None and kind.skip is None,
        }
    return sorted(rows.values(), key=lambda r: (r["number"] is None, r["number"] or 0, r["name"]))


def _file_rows(case: Case, records: Mapping[str, Mapping[str, Any]]) -> list[dict]:
    """Each volume file of a case folder (truth masks aside) and the channels it fills."""
    folder = Path(case.source)
    names = [p.name for p in sort_uploads(p for p in folder.iterdir() if p.is_file()).volumes]
    used = _used_as(records, lambda r: r.get("file"))
    return [{"name": name, "used_as": used.get(name, [])} for name in sorted(names)]
