"""Sequence identification: realistic Siemens, GE, Philips and older headers, description-only series, junk values."""

from __future__ import annotations

import pytest

from brainseg_monai.sequences import ROLES, SeriesKind, classify_series

ORIGINAL = ["ORIGINAL", "PRIMARY", "M", "ND", "NORM"]
SIEMENS_MPRAGE = {
    "ImageType": ORIGINAL, "ScanningSequence": ["GR", "IR"], "SequenceVariant": ["SP", "MP"],
    "ScanOptions": ["IR"], "MRAcquisitionType": "3D", "RepetitionTime": 2300.0, "EchoTime": 2.98,
    "InversionTime": 900.0, "FlipAngle": 9.0, "Manufacturer": "SIEMENS",
}  # fmt: skip
REMBRANDT_FLAIR = {
    "ImageType": ["ORIGINAL", "PRIMARY", "OTHER"], "ScanningSequence": ["flair"], "SequenceVariant": ["NONE"],
    "RepetitionTime": 10004.0, "EchoTime": 155.0, "InversionTime": 2200.0, "FlipAngle": 90.0,
}  # fmt: skip
CPTAC_T1 = {
    "ImageType": ["ORIGINAL", "PRIMARY", "M_SE", "M", "SE"], "ScanningSequence": ["SE"], "SequenceVariant": ["SS"],
    "ScanOptions": ["OTHER"], "MRAcquisitionType": "2D", "RepetitionTime": 613.03, "EchoTime": 12.0,
    "FlipAngle": 75.0, "Manufacturer": "Philips Medical Systems",
}  # fmt: skip


def _ir(ti: float, tr: float, te: float, **more) -> dict:
    return {"ScanningSequence": ["SE", "IR"], "InversionTime": ti, "RepetitionTime": tr, "EchoTime": te, **more}


def _se(tr: float, te: float, **more) -> dict:
    return {"ScanningSequence": ["SE"], "RepetitionTime": tr, "EchoTime": te, **more}


def _gr(tr: float, te: float, flip: float, **more) -> dict:
    return {"ScanningSequence": ["GR"], "RepetitionTime": tr, "EchoTime": te, "FlipAngle": flip, **more}


# (description, header, slices, role, words of the skip reason or None)
HEADERS = {
    "rembrandt flair": ("AXIAL FLAIR", REMBRANDT_FLAIR, 24, "flair", None),
    "cptac t1 se": ("AX T1 SE", CPTAC_T1, 20, "t1", None),
    "siemens tirm dark-fluid": (
        "t2_tirm_tra_dark-fluid", _ir(2500, 9000, 81, ImageType=ORIGINAL, ScanOptions=["IR"], FlipAngle=150.0,
                                      Manufacturer="SIEMENS"), 30, "flair", None),
    "ge ax t2 flair": (
        "Ax T2 FLAIR", _ir(2200, 9000, 123.4, ScanOptions=["FAST_GEMS", "IR_GEMS"], Manufacturer="GE MEDICAL SYSTEMS"),
        28, "flair", None),
    "philips st2w/flair": ("sT2W/FLAIR", _ir(2800, 11000, 125, Manufacturer="Philips"), 24, "flair", None),
    "philips t1/se/extrp": ("T1/SE/extrp", _se(550, 15, ImageType=["ORIGINAL", "PRIMARY", "M_SE", "M", "SE"]), 24,
                            "t1", None),
    "ge bravo +c": (
        "Ax T1 BRAVO +C", _gr(8.2, 3.2, 12, ScanningSequence=["GR", "IR"], InversionTime=450.0,
                              ContrastBolusAgent="GADAVIST"), 156, "t1c", None),
    "siemens mprage post": ("MPRAGE POST", SIEMENS_MPRAGE, 176, "t1c", None),
    "siemens mprage native": ("t1_mprage_sag_p2_iso", SIEMENS_MPRAGE, 176, "t1", None),
    "ge t2 fse": ("AX T2 FSE", _se(4000, 100), 30, "t2", None),
    "ge flair fs": ("AX FLAIR FS", _ir(2500, 10000, 140, ScanOptions=["FAST_GEMS", "IR_GEMS", "FS"]), 28, "flair",
                    None),
    "philips flair longtr": ("FLAIR_longTR", _ir(2800, 11000, 140), 24, "flair", None),
    "siemens t2 flair tra": ("T2_FLAIR_tra", _ir(2500, 9000, 84), 27, "flair", None),
    "localizer imagetype": ("localizer", _gr(8.6, 4.0, 20, ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER"]), 3, None,
                            "localizer"),
    "siemens scout": ("AAHead_Scout_64ch-head-coil", _gr(3.2, 1.4, 8, ImageType=ORIGINAL), 128, None, "localizer"),
    "ge 3-plane loc": ("3-Plane Loc", {"ImageType": ["ORIGINAL", "PRIMARY", "OTHER"]}, 15, None, "localizer"),
    "ge asset calibration": ("ASSET Cal", _gr(150, 1.5, 25), 60, None, "calibration"),
    "adc map": ("ADC", {"ImageType": ["DERIVED", "PRIMARY", "ADC"], "ScanningSequence": ["EP"]}, 25, "dwi", "ADC map"),
    "siemens tracew": (
        "ep2d_diff_3scan_trace_p2_TRACEW", {"ImageType": ["DERIVED", "PRIMARY", "DIFFUSION", "TRACEW", "ND", "NORM"],
                                            "ScanningSequence": ["EP"], "DiffusionBValue": 1000.0}, 25, "dwi", "trace"),
    "siemens mpr of mprage": (
        "MPR AX", {**SIEMENS_MPRAGE, "ImageType": ["DERIVED", "SECONDARY", "MPR"]}, 60, "t1", "MPR reformat"),
    "derived, nothing else": ("t1_se_tra", _se(500, 10, ImageType=["DERIVED", "PRIMARY", "OTHER"]), 20, "t1",
                              "derived image (ImageType DERIVED)"),
    "dwi b1000": ("Ax DWI", {"ScanningSequence": ["SE", "EP"], "RepetitionTime": 8000.0, "EchoTime": 90.0,
                             "DiffusionBValue": 1000.0}, 25, "dwi", None),
    "siemens swi phase": ("swi_tra_p2_Pha", _gr(27, 20, 15, ImageType=["ORIGINAL", "PRIMARY", "P", "ND"]), 72, "swi",
                          "phase image"),
    "ge swan magnitude": ("AX SWAN", _gr(40, 25, 15, ImageType=["ORIGINAL", "PRIMARY", "OTHER"]), 72, "swi", None),
    "dsc perfusion": ("ep2d_perf", {"ScanningSequence": ["EP"], "RepetitionTime": 1500.0, "EchoTime": 30.0,
                                    "FlipAngle": 90.0}, 1000, "perfusion", None),
    "siemens dce vibe": ("t1_vibe_dce", _gr(4.0, 1.5, 12), 1200, "perfusion", None),
    "screen save": ("Screen Save", {"SOPClassUID": "1.2.840.10008.5.1.4.1.1.7",
                                    "ImageType": ["DERIVED", "SECONDARY", "SCREEN SAVE"]}, 1, None, "secondary"),
    "single slice t2": ("AX T2", _se(4000, 100), 1, "t2", "1 slice"),
    "junk numbers, description decides": (
        "Ax T2", {"RepetitionTime": "abc", "EchoTime": "", "InversionTime": None, "FlipAngle": "x",
                  "ScanningSequence": "", "ImageType": ""}, 30, "t2", None),
    "numbers as strings": ("", {"ScanningSequence": "SE\\IR", "RepetitionTime": "9000", "EchoTime": "120",
                                "InversionTime": "2200,0"}, 30, "flair", None),
    "description t2 but ti 2500": ("t2_tse_tra", _ir(2500, 9000, 85), 30, "flair", None),
    "t1 pre, empty agent": ("Ax T1 pre", _se(500, 10, ContrastBolusAgent=""), 20, "t1", None),
    "t1 pre overrules agent": ("Ax T1 pre", _se(500, 10, ContrastBolusAgent="GADAVIST"), 20, "t1", None),
    "t1 agent none": ("AX T1", _se(500, 10, ContrastBolusAgent="NONE"), 20, "t1", None),
    "ge spgr with agent": ("AX 3D SPGR", _gr(25, 5, 30, ContrastBolusAgent="MAGNEVIST 15 ml"), 124, "t1c", None),
    "siemens t1 fl2d": ("t1_fl2d_tra", _gr(250, 2.5, 70), 25, "t1", None),
    "ge sag t1 flair": ("Sag T1 FLAIR", _ir(750, 2000, 9), 24, "t1", None),
    "stir is no role": ("COR STIR", _ir(160, 4000, 50), 24, None, None),
    "t2* gre is no role": ("AX T2* GRE", _gr(600, 20, 20), 24, None, None),
    "pd/t2 dual echo decided by te": ("PD/T2", _se(2500, 20), 24, "pd", None),
    "philips t2w tse": ("T2W_TSE", _se(3000, 80), 24, "t2", None),
    "protocol name when no description": ("", {"ProtocolName": "t2_tse_tra"}, 30, "t2", None),
    "first of several echoes": ("", {"EchoTime": [100.0, 20.0], "RepetitionTime": ["4000"]}, 30, "t2", None),
    "nothing at all": ("", {}, None, None, None),
}


@pytest.mark.parametrize("description, header, slices, role, skip", HEADERS.values(), ids=HEADERS.keys())
def test_realistic_headers(description, header, slices, role, skip):
    kind = classify_series(header, description, slices)
    assert kind.role == role, kind.describe()
    if skip is None:
        assert kind.skip is None, kind.describe()
    else:
        assert kind.skip is not None and skip in kind.skip, kind.describe()


DESCRIPTIONS = {
    "flair": ["Ax FLAIR", "sT2W/FLAIR", "T2_FLAIR_tra", "FLAIR_longTR", "AX FLAIR FS", "t2_tirm_tra_dark-fluid",
              "DARK-FLUID", "darkfluid ax", "TIRM"],
    "t1": ["Sag T1", "T1/SE/extrp", "AX T1 SE", "T1W_SE", "T1 MPRAGE", "MPRAGE", "SPGR", "BRAVO", "T1_FL2D", "VIBE",
           "Ax T1 pre contrast", "T1 without", "Sag T1 FLAIR"],
    "t1c": ["Ax T1 +C", "T1 POST", "MPRAGE POST", "T1+GD", "T1 GAD", "T1C", "T1_CE", "post-contrast", "AX T1 C+",
            "Ax BRAVO Gd"],
    "t2": ["T2", "T2W_TSE", "T2_TSE", "T2 FSE", "Ax PROPELLER", "t2_blade_tra"],
    "pd": ["PD", "Ax PD FSE", "PDW_TSE"],
    "dwi": ["DWI", "Ax DIFFUSION", "DTI_30dir", "ep2d_diff_mddw"],
    "swi": ["SWI", "SWIp", "AX SWAN", "susceptibility"],
    "perfusion": ["DSC perfusion", "perf", "DCE", "pCASL", "t1_vibe_dce"],
}  # fmt: skip


@pytest.mark.parametrize(
    "description, role", [(text, role) for role, texts in DESCRIPTIONS.items() for text in texts]
)
def test_description_alone(description, role):
    kind = classify_series({"ImageType": ["ORIGINAL", "PRIMARY"]}, description, 30)
    assert (kind.role, kind.skip) == (role, None), kind.describe()


@pytest.mark.parametrize("description", ["", "head", "PD/T2", "T2*", "3D TOF", "Phase Contrast", "T1/T2", "mystery"])
def test_description_naming_nothing(description):
    kind = classify_series({}, description)
    assert kind.role is None and kind.skip is None
    assert kind.describe().startswith("unknown sequence (no TR, TE or TI in the header; ")


def test_describe_names_the_deciding_evidence():
    flair = classify_series(REMBRANDT_FLAIR, "AXIAL FLAIR", 24).describe()
    assert flair.startswith("flair (") and "TI 2200 ms" in flair and "TR 10004 ms" in flair and "'AXIAL FLAIR'" in flair

    overruled = classify_series(_ir(2500, 9000, 85), "t2_tse_tra")
    assert overruled.evidence == ("description 't2_tse_tra' says T2 but inversion recovery TI 2500 ms, TR 9000 ms, "
                                  "TE 85 ms: FLAIR",)  # fmt: skip

    post = classify_series(SIEMENS_MPRAGE, "MPRAGE POST").describe()
    assert post.startswith("t1c (inversion recovery gradient echo TI 900 ms") and "'POST': contrast" in post
    agent = classify_series(_se(500, 10, ContrastBolusAgent="GADAVIST"), "Ax T1 pre").describe()
    assert "'pre': no contrast (ContrastBolusAgent 'GADAVIST' overruled)" in agent

    adc = classify_series({"ImageType": ["DERIVED", "PRIMARY", "ADC"]}, "ADC", 25).describe()
    assert adc.endswith("never an input: ADC map (ImageType ADC)")
    localizer = classify_series({"ImageType": ["ORIGINAL", "PRIMARY", "LOCALIZER"]}, "loc", 3)
    assert localizer == SeriesKind(None, "localizer (ImageType LOCALIZER)")
    assert localizer.describe() == "unknown sequence, never an input: localizer (ImageType LOCALIZER)"

    stir = classify_series(_ir(160, 4000, 50), "COR STIR").describe()
    assert "neither FLAIR nor T1 timing" in stir and "'COR STIR' names no sequence" in stir
    dce = classify_series(_gr(4.0, 1.5, 12), "t1_vibe_dce").describe()
    assert dce.startswith("perfusion (description 't1_vibe_dce': perfusion; gradient echo") and "purpose" in dce


JUNK = [
    None, 3, "text", b"\x00\xff", float("nan"), float("inf"), -5.0, True, [], [None], [[1.0]], ["", None], object(),
    {"a": 1}, "1e999", "  ", "\\\\",
]  # fmt: skip
TAGS = [
    "ImageType", "ScanningSequence", "SequenceVariant", "ScanOptions", "RepetitionTime", "EchoTime", "InversionTime",
    "FlipAngle", "ContrastBolusAgent", "SOPClassUID", "DiffusionBValue", "ProtocolName",
]  # fmt: skip


@pytest.mark.parametrize("junk", JUNK, ids=range(len(JUNK)))
def test_junk_values_never_raise(junk):
    for description in ("", "Ax T2 FLAIR", None):
        for slices in (None, 0, "abc", 40):
            kind = classify_series({tag: junk for tag in TAGS}, description, slices)
            assert kind.role in ROLES + (None,)
            assert isinstance(kind.describe(), str)
    assert classify_series(None, None, None).role is None  # not even a mapping


def test_role_is_checked_at_construction():
    with pytest.raises(ValueError, match="role must be None or one of"):
        SeriesKind("T2", None)
