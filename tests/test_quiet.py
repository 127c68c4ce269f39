"""What a user sees of a run: no library's internal notices, one progress bar (`brainseg_monai.quiet`, the runner)."""

from __future__ import annotations

import logging
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from brainseg_monai.io import find_dicom_series
from brainseg_monai.quiet import QUIET_LOG_RECORDS, QUIET_WARNINGS, quiet_third_party
from brainseg_monai.synth import make_dataset
from conftest import REPO_ROOT

SHIPPED = REPO_ROOT / "bundle" / "models" / "model.pt"
#: one rendering of the case progress bar: "100%|██████████| 1/1 [00:04<00:00,  4.70s/case, failed=0]"
BAR = re.compile(r"^\s*\d+%\|[^|]*\| (\d+)/(\d+) \[[^\]]*\]$")


def _brainseg(*args: str | Path, cwd: Path) -> subprocess.CompletedProcess:
    """``brainseg ARGS`` in a fresh process, as a user runs it (stderr not a terminal, as in a log file); its output
    decoded as written, carriage returns kept (text mode would turn each into a line break)."""
    result = subprocess.run([sys.executable, "-m", "brainseg_monai.cli", *map(str, args)], capture_output=True,
                            timeout=600, cwd=cwd, check=False)
    result.stdout, result.stderr = result.stdout.decode(), result.stderr.decode()
    return result


def test_infer_on_an_lgg_patient_folder_prints_one_progress_bar_and_nothing_else(tmp_path: Path) -> None:
    """Once per slice MONAI said nvImageCodec was missing, and the finished bar was drawn three times."""
    patient = make_dataset(tmp_path / "lgg", "lgg", cases=1, seed=2, size=(64, 64, 5)) / "SYN_0001"
    result = _brainseg("infer", patient, "--out", tmp_path / "pred", "--tta", "none", "--device", "cpu",
                       "--checkpoint", SHIPPED, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"1 ok, 0 failed -> {tmp_path / 'pred' / 'summary.csv'}\n"
    lines = result.stderr.split("\n")
    assert lines[-1] == "" and len(lines) == 2, f"more than the progress bar on stderr:\n{result.stderr}"
    renders = [part for part in lines[0].split("\r") if part]
    assert renders and all(BAR.match(part) for part in renders), result.stderr
    finished = [part for part in renders if BAR.match(part).groups() == ("1", "1")]
    assert len(finished) == 1, f"the finished bar is drawn {len(finished)} times: {renders}"


@pytest.mark.slow
def test_infer_and_evaluate_of_dicom_studies_print_no_library_warnings(tmp_path: Path) -> None:
    """DICOM in, SEG out, scored against the studies' truth: GDCM's 'No Series were found' for folders without
    DICOM, and MONAI's reader notices, are not the user's business."""
    studies = make_dataset(tmp_path / "dicom", "dicom", cases=1, seed=1, size=(48, 48, 6))
    result = _brainseg("infer", studies, "--out", tmp_path / "pred", "--tta", "none", "--device", "cpu",
                       "--checkpoint", SHIPPED, "--no-progress", cwd=tmp_path)
    assert result.returncode == 0 and result.stderr == "", result.stderr
    assert (tmp_path / "pred" / "SYN_0001" / "seg.dcm").is_file()
    result = _brainseg("evaluate", tmp_path / "pred", "--truth", studies, "--out", tmp_path / "report",
                       "--n-worst", "0", cwd=tmp_path)
    assert result.returncode == 0 and result.stderr == "", result.stderr


def test_itk_says_nothing_of_folders_without_dicom(tmp_path: Path, capfd: pytest.CaptureFixture) -> None:
    studies = make_dataset(tmp_path / "dicom", "dicom", cases=1, seed=1, size=(24, 24, 4))
    capfd.readouterr()
    assert len(find_dicom_series(studies, recursive=True)) == 3  # the root and the study folder hold no series
    assert find_dicom_series(tmp_path) == []
    assert "No Series were found" not in capfd.readouterr().err


def test_only_the_listed_messages_are_silenced(caplog: pytest.LogCaptureFixture) -> None:
    name, message = QUIET_LOG_RECORDS[0]
    quiet_third_party()
    quiet_third_party()  # again: nothing added twice, so warnings shown once are not shown again
    with caplog.at_level(logging.WARNING, logger=name):
        logging.getLogger(name).warning(message)
        logging.getLogger(name).warning("another message of that logger")
    assert [r.getMessage() for r in caplog.records] == ["another message of that logger"]
    ours = [f for f in warnings.filters if f[0] == "ignore" and f[1] is not None
            and f[1].pattern in {pattern for _, pattern, _ in QUIET_WARNINGS}]
    assert len(ours) == len(QUIET_WARNINGS)

    reader_notice = ("NvImgCodecPydicomReader: nvImageCodec decoder plugin did not register successfully. "
                     "Falling back to default pydicom decoders.")
    person_name = 'The string "ANON1234" is unlikely to represent the intended person name since it contains only'
    with warnings.catch_warnings(record=True) as shown:
        quiet_third_party()
        warnings.simplefilter("always", DeprecationWarning)
        warnings.warn_explicit(reader_notice, UserWarning, "image_reader.py", 1, module="monai.data.image_reader")
        warnings.warn_explicit(person_name, UserWarning, "base.py", 1, module="highdicom.base")
        warnings.warn_explicit("another notice of the reader", UserWarning, "image_reader.py", 2,
                               module="monai.data.image_reader")
        warnings.warn_explicit(person_name, UserWarning, "mine.py", 1, module="brainseg_monai.mine")
    assert [(str(w.message), w.filename) for w in shown] == [("another notice of the reader", "image_reader.py"),
                                                             (person_name, "mine.py")]
