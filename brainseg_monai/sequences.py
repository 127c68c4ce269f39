"""Which MR sequence a DICOM series is (its role as a model input), and which series are never inputs.

`classify_series` reads the attributes a scanner writes (`brainseg_monai.io.SERIES_HEADER_TAGS`) and the
SeriesDescription (the ProtocolName when the description is empty). People type descriptions, differently at every
site; the scanner writes the physics. So the physics decides what it can and the description fills in. Times in ms.

1. Never an input (`SeriesKind.skip`), first match wins:
   - localizers and calibration scans: ImageType LOCALIZER, or a description word localizer, scout, survey, 3-plane,
     3pl, tri-pilot, pilot, loc, ASSET cal, calibration, SENSE ref; secondary captures and screen saves (SOPClassUID
     1.2.840.10008.5.1.4.1.1.7 and its sub-classes, ImageType SCREEN SAVE). These get no role.
   - maps computed from other series, by ImageType value or description word: ADC, exponential ADC (EXP, EADC),
     diffusion trace (TRACE, TRACEW), FA, calculated b-value (CALC_BVALUE), MPR/REFORMAT, MIP/MinIP;
   - phase images (third ImageType value P, PHASE or PHASE MAP);
   - any other ImageType DERIVED or SECONDARY (Siemens also marks some reformats so);
   - fewer than 3 slices, when the slice count is given: a volume model needs a stack.
   Such a series still gets the role its signals give (an ADC map is dwi), so listings can say what it was.
2. Role from the physics:
   - DiffusionBValue > 0: dwi.
   - inversion recovery (ScanningSequence IR, an IR scan option, or an InversionTime > 0): TI >= 1500 with TR >= 4000
     and TE >= 50 (each when written) is flair; TI < 1300 with a gradient echo or TE < 30 is t1 (MPRAGE, BRAVO,
     T1-FLAIR); other timings (STIR: TI ~150) are left to the description. ScanningSequence 'flair' (REMBRANDT): flair.
   - echo planar without a b-value (DWI b0, perfusion, fMRI): left to the description.
   - gradient echo: t1 when TE < 15 and the flip angle is at least 1.5 times the Ernst angle of white matter
     (T1 ~1000 ms) at that TR: spoiled GRE as SPGR, FLASH, VIBE (TR 4, 10°) or 2D FLASH (TR 250, 70°). Otherwise
     (T2*, SWI) left to the description.
   - spin echo, or no ScanningSequence: TR < 1000 with TE < 30 is t1; TR >= 2000 with TE >= 80 is t2, with TE < 40 pd;
     timings in between are left to the description.
3. Role from the description: case-insensitive words (letters and digits not running on; '_', '-', '/', ' ' part
   them): flair (FLAIR, dark-fluid, darkfluid, TIRM); dwi (DWI, DTI, diff, diffusion, ADC, TRACEW); swi (SWI, SWIp,
   SWAN, susceptibility, venoBOLD); perfusion (perf..., DSC, DCE, ASL, pCASL, pASL); t1 (T1, T1W, T1C, T1CE, MPRAGE,
   SPGR, FSPGR, BRAVO, VIBE); t2 (T2, T2W, PROPELLER; not T2*); pd (PD, PDW, proton density). FLAIR wins over T2
   ('sT2W/FLAIR', 'T2_FLAIR_tra'), but 'T1 FLAIR' is a T1-weighted FLAIR: t1. dwi, swi and perfusion win over t1, t2
   and pd; two of t1, t2, pd ('PD/T2') say nothing. A post-contrast marker alone ('post-contrast', 'Gd'; not the bare
   word contrast, as in 'phase contrast') is t1, made t1c below.
4. Combining: a physics dwi first; then a description's dwi, swi or perfusion (the purpose, which timing cannot see: a
   DCE run is a T1-weighted gradient echo, an SWI a long-TE one); then the physics flair, t1, t2 or pd, also against
   the description (the evidence says so); then the description. Neither: role None, the evidence saying why.
   A t1 is t1c when ContrastBolusAgent names an agent (not empty, 'none', 'no', 'n/a', '0', ...) or the description
   marks contrast (post, +C, C+, Gd, gad..., gado..., contrast, T1C, T1CE, T1Gd, CE, enhanced), even when physics chose
   the role: contrast is often not recorded in ContrastBolusAgent. A description saying pre, without, w/o, wo,
   non-contrast, no contrast or nativ forces t1.
5. Junk: an attribute may be missing, empty, a list, or a string that is no number. Numbers are read leniently (a
   decimal comma, the first of several values); zero or negative times count as missing. `classify_series` never raises.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["ROLES", "SeriesKind", "classify_series"]

ROLES = ("flair", "t1", "t1c", "t2", "pd", "dwi", "swi", "perfusion")
"""Roles `classify_series` can give; dwi, swi and perfusion are identified so they can be listed and rejected."""

_LABELS = {"flair": "FLAIR", "t1": "T1", "t1c": "T1c", "t2": "T2", "pd": "PD", "dwi": "DWI", "swi": "SWI",
           "perfusion": "perfusion"}  # fmt: skip
_PURPOSES = {"dwi", "swi", "perfusion"}

_FLAIR_MIN_TI, _FLAIR_MIN_TR, _FLAIR_MIN_TE = 1500.0, 4000.0, 50.0
_T1_MAX_TI = 1300.0
_SHORT_TE = 30.0
_GRE_T1_MAX_TE, _ERNST_FACTOR, _WHITE_MATTER_T1 = 15.0, 1.5, 1000.0
_SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"

_L, _R = r"(?<![a-z0-9])", r"(?![a-z0-9])"  # word edges: '_' and '-' separate words in descriptions


def _words(*alternatives: str) -> re.Pattern[str]:
    """A case-insensitive pattern matching any alternative as a whole word (see `_L`, `_R`)."""
    return re.compile(f"{_L}(?:{'|'.join(alternatives)}){_R}", re.IGNORECASE)


_NAMED_ROLES = {
    "flair": _words("flair", r"dark[-_ ]?fluid", "tirm"),
    "dwi": _words("dwi", "dti", "diff", "diffusion", "adc", "tracew"),
    "swi": _words("swi", "swip", "swan", "susceptibility", "venobold"),
    "perfusion": _words(r"perf\w*", "dsc", "dce", "asl", "pcasl", "pasl"),
    "t1": _words(r"t1(?:w|wi|c|ce)?", r"mp[-_]?rage", "f?spgr", "bravo", "vibe"),
    "t2": _words(r"t2(?:w|wi)?(?!\*)", "propeller"),
    "pd": _words(r"pdw?", r"proton[-_ ]density"),
}
_LOCALIZER = _words(r"locali[sz]er", "scout", "survey", r"3[-_ ]?plane", "3pl", r"(?:tri[-_ ]?)?pilot", "loc",
                    r"asset[-_ ]?cal", "calibration", r"sense[-_ ]?ref")  # fmt: skip
_COMPUTED = (  # (skip label, ImageType words, description pattern)
    ("ADC map", {"ADC"}, _words("adc", r"apparent[-_ ]diffusion")),
    ("exponential ADC map", {"EXP", "EADC"}, _words("exp", "eadc", "exponential")),
    ("diffusion trace", {"TRACE", "TRACEW"}, _words("tracew?")),
    ("FA map", {"FA"}, _words("fa", "colfa", r"fractional[-_ ]anisotropy")),
    ("calculated b-value image", {"CALC_BVALUE"}, _words(r"calc[-_ ]?bvalue", r"calculated[-_ ]b\w*")),
    ("MPR reformat", {"MPR", "REFORMAT", "REFORMATTED"}, _words("mpr", r"reformat\w*", "rfmt")),
    ("MIP projection", {"MIP", "MINIP", "MNIP", "PROJECTION"}, _words("mip", "minip", "mnip")),
)
_POST_CONTRAST = re.compile(
    _words(r"post(?:contrast|gad|gd|c)?", "gd", r"gad\w*", r"gado\w*", "t1c", "t1ce", "t1gd", "ce").pattern
    + rf"|\+\s*(?:c|gd|gad\w*|contrast){_R}|{_L}c\+",
    re.IGNORECASE,
)  # fmt: skip
_CONTRAST = re.compile(f"{_POST_CONTRAST.pattern}|{_words('contrast', 'enhanced').pattern}", re.IGNORECASE)
"""Contrast markers on a T1; `_POST_CONTRAST` alone makes a description with no sequence word a T1 ('phase contrast'
is a flow sequence)."""
_PRE_CONTRAST = _words(r"pre(?:contrast|gad|gd|c)?", "without", "w/?o", r"non[-_ ]?contrast", r"no[-_ ]contrast",
                       "native?")  # fmt: skip
_NO_AGENT = re.compile(r"(?:no|none|nil|not|n/?a|n|0|-+|unknown)(?![a-z0-9])", re.IGNORECASE)


@dataclass(frozen=True)
class SeriesKind:
    """What `classify_series` found: the series' role, why it is never a model input, and the signals that decided."""

    role: str | None
    """One of `ROLES`, or None when nothing says what the series is."""
    skip: str | None
    """Why the series is never a model input, naming the signal (e.g. "ADC map (ImageType ADC)"), else None."""
    evidence: tuple[str, ...] = ()
    """Short readable signals that decided the role, or why there is none."""

    def __post_init__(self) -> None:
        if self.role is not None and self.role not in ROLES:
            raise ValueError(f"role must be None or one of {ROLES} but is {self.role!r}.")

    def describe(self) -> str:
        """One line for case.json and error messages: the role (or "unknown sequence"), its evidence, any skip."""
        text = self.role or "unknown sequence"
        if self.evidence:
            text += f" ({'; '.join(self.evidence)})"
        return f"{text}, never an input: {self.skip}" if self.skip else text


def _number(value: Any) -> float | None:
    """A finite number from a header value: a number, a numeric string ('.' or ',' decimal) or the first of a list."""
    if isinstance(value, (list, tuple)):
        value = value[0] if value else None
    if value is None or isinstance(value, bool):
        return None
    try:
        number = float(value.strip().replace(",", ".")) if isinstance(value, str) else float(value)
    except (TypeError, ValueError, OverflowError):
        return None
    return number if math.isfinite(number) else None


def _time(fields: Mapping[str, Any], name: str) -> float | None:
    """A time or angle from the header; zero or negative means the scanner did not record it."""
    number = _number(fields.get(name))
    return number if number is not None and number > 0 else None


def _codes(value: Any) -> list[str]:
    """Upper-case values of a multi-valued code string (a list, or one string with DICOM's '\\' separator)."""
    if value is None:
        return []
    items = value if isinstance(value, (list, tuple)) else str(value).split("\\")
    return [str(item).strip().upper() for item in items if item is not None and str(item).strip()]


def _text(value: Any) -> str:
    if value is None:
        return ""
    return " ".join(map(str, value)).strip() if isinstance(value, (list, tuple)) else str(value).strip()


def _timing(**times: float | None) -> str:
    return ", ".join(f"{name} {value:g} ms" for name, value in times.items() if value is not None)


def _not_a_sequence(fields: Mapping[str, Any], text: str, source: str) -> str | None:
    """Why the series is no sequence of the head at all (localizer, calibration, screen save), else None."""
    image_type = _codes(fields.get("ImageType"))
    if "LOCALIZER" in image_type:
        return "localizer (ImageType LOCALIZER)"
    if _LOCALIZER.search(text):
        return f"localizer or calibration scan ({source} '{text}')"
    sop_class = _text(fields.get("SOPClassUID"))
    if sop_class == _SECONDARY_CAPTURE or sop_class.startswith(_SECONDARY_CAPTURE + "."):
        return f"secondary capture (SOPClassUID {sop_class})"
    if "SCREEN SAVE" in image_type:
        return "screen save (ImageType SCREEN SAVE)"
    return None


def _never_input(fields: Mapping[str, Any], text: str, source: str, slices: Any) -> str | None:
    """Why an acquired series is never a model input (a computed map, a phase or derived image, too few slices)."""
    image_type = _codes(fields.get("ImageType"))
    words = set(image_type) | {word for value in image_type for word in re.split(r"[\s_]+", value) if word}
    for label, markers, pattern in _COMPUTED:
        if words & markers:
            return f"{label} (ImageType {sorted(words & markers)[0]})"
        if pattern.search(text):
            return f"{label} ({source} '{text}')"
    if len(image_type) >= 3 and image_type[2] in ("P", "PHASE", "PHASE MAP"):
        return f"phase image (ImageType {image_type[2]})"
    for value in ("DERIVED", "SECONDARY"):
        if value in image_type:
            return f"derived image (ImageType {value})"
    count = _number(slices)
    if count is not None and count < 3:
        return f"{count:g} slice{'' if count == 1 else 's'}: a volume model needs a stack of at least 3"
    return None


def _physics_role(fields: Mapping[str, Any]) -> tuple[str | None, str]:
    """The role the acquisition physics gives (rule 2) and the signal that decided, or None and what was unclear
    ("" when the header holds no physics at all)."""
    sequence = _codes(fields.get("ScanningSequence"))
    options = _codes(fields.get("ScanOptions"))
    tr, te, ti = (_time(fields, name) for name in ("RepetitionTime", "EchoTime", "InversionTime"))
    flip = _time(fields, "FlipAngle")
    b_value = _number(fields.get("DiffusionBValue"))
    if b_value is not None and b_value > 0:
        return "dwi", f"b-value {b_value:g}: DWI"
    gradient = "GR" in sequence and "SE" not in sequence
    if "IR" in sequence or ti is not None or any(option.startswith("IR") for option in options):
        timing = _timing(TI=ti, TR=tr, TE=te)
        flair_timing = (tr is None or tr >= _FLAIR_MIN_TR) and (te is None or te >= _FLAIR_MIN_TE)
        if ti is not None and ti >= _FLAIR_MIN_TI and flair_timing:
            return "flair", f"inversion recovery {timing}: FLAIR"
        if ti is not None and ti < _T1_MAX_TI and (gradient or (te is not None and te < _SHORT_TE)):
            return "t1", f"inversion recovery {'gradient echo ' if gradient else ''}{timing}: T1"
        if "FLAIR" not in sequence:
            return None, f"inversion recovery{'' if ti else ' without TI'} {timing}: neither FLAIR nor T1 timing"
    if "FLAIR" in sequence:
        return "flair", "ScanningSequence FLAIR"
    if "EP" in sequence:
        return None, "echo planar without b-value (DWI b0, perfusion or fMRI)"
    timing = _timing(TR=tr, TE=te)
    if tr is None or te is None:
        return None, f"{timing} only: TR and TE both needed" if timing else ""
    if gradient:
        ernst = math.degrees(math.acos(math.exp(-tr / _WHITE_MATTER_T1)))
        angle = f", flip {flip:g}°" if flip is not None else ", no flip angle"
        if te < _GRE_T1_MAX_TE and flip is not None and flip >= _ERNST_FACTOR * ernst:
            return "t1", f"gradient echo {timing}{angle} (Ernst {ernst:.0f}°): T1"
        return None, f"gradient echo {timing}{angle}: not T1-weighted (T2*, SWI?)"
    if tr < 1000 and te < _SHORT_TE:
        return "t1", f"{timing}: T1"
    if tr >= 2000 and te >= 80:
        return "t2", f"{timing}: T2"
    if tr >= 2000 and te < 40:
        return "pd", f"{timing}: PD"
    return None, f"{timing}: between T1, T2 and PD timing"


def _named_role(text: str, source: str) -> tuple[str | None, str]:
    """The role the description names (rule 3) and the evidence, or None and why."""
    if not text:
        return None, "no description"
    quoted = f"{source} '{text}'"
    found = {role for role, pattern in _NAMED_ROLES.items() if pattern.search(text)}
    if "flair" in found:
        if "t1" in found and "t2" not in found:
            return "t1", f"{quoted}: T1-weighted FLAIR"
        return "flair", f"{quoted}: FLAIR"
    candidates = found & _PURPOSES or found
    if len(candidates) == 1:
        role = candidates.pop()
        return role, f"{quoted}: {_LABELS[role]}"
    if candidates:
        return None, f"{quoted} names {' and '.join(sorted(_LABELS[role] for role in candidates))}"
    if _POST_CONTRAST.search(text):
        return "t1", f"{quoted} marks contrast only: taken as T1"
    return None, f"{quoted} names no sequence"


def _contrast(fields: Mapping[str, Any], text: str, source: str) -> tuple[bool, str | None]:
    """Whether a T1 series was acquired after contrast, and the signal (rule 4)."""
    agent = _text(fields.get("ContrastBolusAgent"))
    named_agent = bool(agent) and not _NO_AGENT.match(agent)
    pre = _PRE_CONTRAST.search(text)
    if pre:
        overruled = f" (ContrastBolusAgent '{agent}' overruled)" if named_agent else ""
        return False, f"{source} says '{pre.group(0)}': no contrast{overruled}"
    if named_agent:
        return True, f"ContrastBolusAgent '{agent}'"
    post = _CONTRAST.search(text)
    if post:
        return True, f"{source} says '{post.group(0).strip()}': contrast"
    return False, None


def classify_series(header: Mapping[str, Any], description: str = "", slices: int | None = None) -> SeriesKind:
    """The role of an MR series as a model input, and why it is never one, from its header (see the module rules).

    Args:
        header: acquisition attributes as `brainseg_monai.io.series_header` gives them (`DicomSeries.header`); any
            may be missing or junk.
        description: the SeriesDescription; when empty, the header's ProtocolName is read instead.
        slices: number of files or frames of the series, when known.
    """
    fields: Mapping[str, Any] = header if isinstance(header, Mapping) else {}
    text, source = _text(description), "description"
    if not text:
        text, source = _text(fields.get("ProtocolName")), "ProtocolName"
    skip = _not_a_sequence(fields, text, source)
    if skip:
        return SeriesKind(None, skip)
    physics, signal = _physics_role(fields)
    named, naming = _named_role(text, source)
    if physics == "dwi" or (physics and named not in _PURPOSES):
        role = physics
        if named and named != physics:
            evidence: tuple[str, ...] = (f"{source} '{text}' says {_LABELS[named]} but {signal}",)
        else:
            evidence = (signal, f"{source} '{text}'") if named else (signal,)
    elif named:
        role = named
        if physics:
            evidence = (naming, f"{signal}, but the description names the purpose")
        else:
            evidence = (naming, signal) if signal else (naming,)
    else:
        role, evidence = None, (signal or "no TR, TE or TI in the header", naming)
    if role == "t1":
        enhanced, note = _contrast(fields, text, source)
        role = "t1c" if enhanced else role
        evidence += (note,) if note else ()
    return SeriesKind(role, _never_input(fields, text, source, slices), evidence)
