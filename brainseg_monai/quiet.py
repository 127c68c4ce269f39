"""Third-party messages that are not the user's business, silenced at their source by their exact text.

A user of ``brainseg infer`` saw ``nvImageCodec is not available`` once per slice, and ITK's ``No Series were found``
for every folder listed for DICOM: library internals about code paths this package never takes. Each message below
is silenced where it is made (the logger that logs it, the warning's text and module, ITK's own switch), and nothing
else: every other warning and log line still reaches the user.

`quiet_third_party` is applied wherever our code reads images, when a `brainseg_monai.io.SimpleITKReader` is built
(inference, the web app, the training bundle's transforms), and at the start of the ``brainseg`` command;
`itk_warnings_off` wraps our calls of GDCM's series listing (`brainseg_monai.io`).
"""

from __future__ import annotations

import logging
import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import SimpleITK as sitk

__all__ = ["QUIET_LOG_RECORDS", "QUIET_WARNINGS", "itk_warnings_off", "quiet_third_party"]

QUIET_LOG_RECORDS: tuple[tuple[str, str], ...] = (
    # Every monai.transforms.LoadImage builds MONAI's nvImageCodec DICOM reader among its default readers, and that
    # reader logs this whenever there is no GPU decoder: once per image read. We read with SimpleITKReader only.
    ("monai.data.nvimgcodec_pydicom_plugin",
     "nvImageCodec is not available; skipping pydicom decoder plugin registration."),
)
"""(logger, message) of the log records dropped: the message exactly as the library logs it."""

QUIET_WARNINGS: tuple[tuple[type[Warning], str, str], ...] = (
    # The same reader, the same cause, as a warning of its constructor.
    (UserWarning, re.escape("NvImgCodecPydicomReader: nvImageCodec decoder plugin did not register successfully. "
                            "Falling back to default pydicom decoders."), r"monai\.data\.image_reader"),
    # highdicom, when a DICOM SEG copies a source's PatientName of one component (anonymised studies: "ANON1234"):
    # the value is the source's own, copied as it is, and nothing the user of the SEG can change.
    (UserWarning, r'The string "[^"]*" is unlikely to represent the intended person name', r"highdicom\."),
    # MONAI's RandCropByPosNegLabeld on a tumour-free training slice, which the training sampler draws on purpose
    # (tumour_fraction): with no tumour to centre a crop on, it crops anywhere, as it should.
    (UserWarning, r"Num foregrounds 0, Num backgrounds \d+, unable to generate class balanced samples",
     r"monai\.transforms\.utils"),
)
"""(category, message regex, module regex) of the warnings ignored; both regexes match from the start, as Python's
warning filters match them."""


class _DropRecords(logging.Filter):
    """Drops a logger's records whose message is one of ``messages``."""

    def __init__(self) -> None:
        super().__init__()
        self.messages: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        return record.getMessage() not in self.messages


_LOG_FILTERS: dict[str, _DropRecords] = {}


def quiet_third_party() -> None:
    """Silence the messages of `QUIET_LOG_RECORDS` and `QUIET_WARNINGS`; cheap to call again (nothing is added twice).

    A filter already in place is left as it is: re-adding one would reset Python's record of warnings already shown
    once, and they would be shown again.
    """
    for name, message in QUIET_LOG_RECORDS:
        drop = _LOG_FILTERS.setdefault(name, _DropRecords())
        drop.messages.add(message)
        logging.getLogger(name).addFilter(drop)  # a no-op when it is there
    present = {(f[2], f[1].pattern if f[1] else None, f[3].pattern if f[3] else None)
               for f in warnings.filters if f[0] == "ignore"}
    for category, message, module in QUIET_WARNINGS:
        if (category, message, module) not in present:
            warnings.filterwarnings("ignore", message=message, category=category, module=module)


@contextmanager
def itk_warnings_off() -> Iterator[None]:
    """ITK's own warnings (printed by ITK on stderr, past Python) off for the block, as they were after it.

    For GDCM's series listing: it prints ``GDCMSeriesFileNames ... No Series were found`` for a folder without
    DICOM, which we look in and report ourselves when it matters.
    """
    before = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    try:
        yield
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(before)
