"""Matching a study's series and a case's files to a model's channels: roles, selection rules, fallbacks, records."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from brainseg_monai.channel_roles import (
    InputRoles,
    SelectionRules,
    plan_dicom_channels,
    plane_of,
    role_from_name,
    single_channel_fills,
)
from brainseg_monai.errors import InputError
from brainseg_monai.io import DicomSeries

LGG = dict(channels=("t1", "flair", "t1c"), primary="flair", fallbacks={"t1": "flair", "t1c": "flair"})
AXIAL = ["1", "0", "0", "0", "1", "0"]
SAGITTAL = ["0", "1", "0", "0", "0", "-1"]


def series(description: str, number: int, slices: int = 20, orientation: list[str] = AXIAL, **header) -> DicomSeries:
    """A series as discovery finds it, with the header attributes that identify its sequence."""
    values = {"SeriesNumber": float(number), "ImageOrientationPatient": orientation, "ImageType": ["ORIGINAL", "PRIMARY"],
              "PixelSpacing": ["0.9", "0.9"], "Rows": 256.0, "Columns": 256.0, **header}
    return DicomSeries(f"1.2.3.{number}", description, "MR", "1.2.3", Path(f"/s/{number}"),
                       [f"/s/{number}/{k}.dcm" for k in range(slices)], header=values)


FLAIR = dict(ScanningSequence=["SE", "IR"], InversionTime=2800.0, RepetitionTime=11000.0, EchoTime=125.0)
T1_SE = dict(ScanningSequence=["SE"], RepetitionTime=550.0, EchoTime=15.0)
T2_TSE = dict(ScanningSequence=["SE"], RepetitionTime=4500.0, EchoTime=100.0)


def test_real_study_layout_picks_flair_and_t1_and_fills_t1c() -> None:
    """The study of the issue: FLAIR and T1 on other grids, no post-contrast, a T2 the model does not take."""
    found = [series("sT2W/FLAIR", 4, 22, **FLAIR), series("T1/SE/extrp", 6, 22, **T1_SE),
             series("T2W_TSE", 5, 22, **T2_TSE)]
    plan = plan_dicom_channels(found, **LGG)
    assert plan.error is None
    assert [s.description for s in plan.series] == ["T1/SE/extrp", "sT2W/FLAIR", "sT2W/FLAIR"]
    record = plan.record()
    assert record["primary"] == "flair"
    roles = {r["channel"]: r for r in record["roles"]}
    assert roles["t1c"]["filled_from"] == "flair" and "series" not in roles["t1c"]
    assert roles["flair"]["series"]["uid"] == "1.2.3.4" and roles["flair"]["series"]["slices"] == 22
    assert "header" in roles["flair"]["reason"]
    assert [(r["description"], "t2" in r["reason"]) for r in record["rejected"]] == [("T2W_TSE", True)]
    json.dumps(record)  # case.json takes it as it is


def test_localizer_derived_and_repeats_are_set_aside_by_stated_rules() -> None:
    found = [
        series("Survey", 1, 3, ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER"]),
        series("AX FLAIR", 2, 30, **FLAIR),                       # an earlier try, fewer slices
        series("AX FLAIR", 3, 30, **FLAIR),
        series("FLAIR sag", 9, 160, SAGITTAL, **FLAIR),          # most slices, but not axial
        series("dADC", 501, 30, ImageType=["DERIVED", "PRIMARY", "ADC"]),
        series("T1 SE", 4, 30, **T1_SE),
    ]
    plan = plan_dicom_channels(found, **LGG)
    assert plan.error is None
    flair = next(r for r in plan.record()["roles"] if r["channel"] == "flair")
    assert flair["series"]["number"] == 3  # axial first, then slices (tie), then the latest SeriesNumber
    assert "chosen among 3 candidates" in flair["reason"]
    why = {r["number"]: r["reason"] for r in plan.record()["rejected"]}
    assert why[1].startswith("not an input") and "ocalizer" in why[1]
    assert why[501].startswith("not an input")
    assert why[2].endswith("was preferred: latest SeriesNumber (3 vs 2)")
    assert why[9].endswith("was preferred: axial first (axial vs sagittal)")
    rules = SelectionRules.checked({}, [], ["most_slices", "axial", "latest"])  # a user's order: slices first
    sag = plan_dicom_channels(found, **LGG, rules=rules)
    assert next(r for r in sag.record()["roles"] if r["channel"] == "flair")["series"]["number"] == 9


def test_a_study_without_flair_fails_listing_each_series_and_the_flags() -> None:
    found = [series("T1/SE/extrp", 6, **T1_SE), series("T2W_TSE", 5, **T2_TSE), series("Survey", 1, 3,
             ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER"])]
    plan = plan_dicom_channels(found, **LGG)
    assert plan.error is not None
    assert "required channel 'flair'" in plan.error
    assert "'T1/SE/extrp' (t1" in plan.error and "'T2W_TSE' (t2" in plan.error and "'Survey' (not an input" in plan.error
    assert "--channel flair=" in plan.error  # the command line that would choose a series by hand


def test_channel_override_and_skip_rules() -> None:
    found = [series("sT2W/FLAIR", 4, **FLAIR), series("T1/SE/extrp", 6, **T1_SE), series("T1 POST", 8, **T1_SE)]
    plan = plan_dicom_channels(found, **LGG, overrides={"t1c": "FLAIR"})
    assert [s.series_uid for s in plan.series] == ["1.2.3.6", "1.2.3.4", "1.2.3.4"]
    skipping = plan_dicom_channels(found, **LGG, rules=SelectionRules.checked({}, ["POST"], ["axial"]))
    roles = {r["channel"]: r for r in skipping.record()["roles"]}
    assert roles["t1c"]["filled_from"] == "flair"
    assert any("skipped by the rule" in r["reason"] for r in skipping.record()["rejected"])


def test_rules_file_is_checked(tmp_path: Path) -> None:
    good = tmp_path / "rules.json"
    good.write_text(json.dumps({"channels": {"flair": "DARK.?FLUID"}, "skip": ["^MPR"], "prefer": ["latest"]}))
    rules = SelectionRules.from_file(good)
    assert rules.channels == {"flair": "DARK.?FLUID"} and rules.prefer == ("latest",)
    for bad, message in ((["x"], "JSON object"), ({"prefer": ["newest"]}, "prefer"), ({"skip": ["("]}, "regular"),
                         ({"chanels": {}}, "unknown keys")):
        path = tmp_path / "bad.json"
        path.write_text(json.dumps(bad))
        with pytest.raises(InputError, match=message) as err:
            SelectionRules.from_file(path)
        assert str(path) in str(err.value)


def test_plane_from_orientation() -> None:
    assert plane_of(series("a", 1)) == "axial"
    assert plane_of(series("s", 1, orientation=SAGITTAL)) == "sagittal"
    assert plane_of(series("c", 1, orientation=["1", "0", "0", "0", "0", "-1"])) == "coronal"
    assert plane_of(series("o", 1, orientation=["1", "0", "0", "0", "0.7071", "0.7071"])) == "oblique"
    assert plane_of(series("none", 1, orientation=[])) == "unknown"


def test_lone_images_play_the_role_their_name_or_the_user_gives() -> None:
    channels = LGG["channels"]
    assert role_from_name("BraTS_flair.nii.gz", channels) == "flair"
    assert role_from_name("FLAIR.png", channels) == "flair"
    assert role_from_name("slice_12.png", channels) is None
    assert role_from_name("slice_12.png", channels, {"flair": r"slice_\d+"}) == "flair"
    assert single_channel_fills("flair", channels, LGG["fallbacks"]) == {"t1": "flair", "flair": "flair", "t1c": "flair"}
    assert "cannot fill" in single_channel_fills("t1", channels, LGG["fallbacks"])


def test_input_roles_refuse_unknown_channel_names() -> None:
    with pytest.raises(ValueError, match="not channels of the model"):
        InputRoles(("t1", "flair", "t1c"), "flair", overrides={"t2": "T2"})
    roles = InputRoles(("t1", "flair", "t1c"), "flair", overrides={"flair": r"_fl\."})
    assert roles.file_pattern("flair") == r"_fl\." and roles.file_pattern("t1") == r"[_-]t1\.(nii|mha|mhd|nrrd)"
