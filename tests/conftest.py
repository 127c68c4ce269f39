"""Shared fixtures: where the real data lives and a skip when it is absent."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


def shared_path(*parts: str) -> Path:
    """Path under ../shared/data, or skip the test with the reason when it is not there."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"real data not available: {path} is absent (it lives in ../shared/data beside the repo)")
    return path.resolve()


def assert_dciodvfy_finds_no_errors(path: Path) -> None:
    """dciodvfy validates `path` as a Segmentation and reports no errors; skip where it is not installed.

    dciodvfy names the IOD it recognised on a line of its own, then prints "Error - ..." and "Warning - ..."
    lines. Its exit status is 0 even when it cannot read the file, so its output is what is checked. Warnings
    are allowed: on our SEGs they say only that empty type 2 attributes (StudyID, StudyTime of the sources) would
    be needed to build a DICOMDIR, which is no requirement of the SEG IOD. No error message is filtered.
    """
    dciodvfy = shutil.which("dciodvfy")
    if dciodvfy is None:
        pytest.skip("dciodvfy (Debian package dicom3tools) is not installed")
    result = subprocess.run([dciodvfy, "-new", str(path)], capture_output=True, timeout=120, check=False)
    report = (result.stdout + result.stderr).decode("latin-1").splitlines()
    assert "Segmentation" in report, f"dciodvfy did not validate {path} as a Segmentation:\n" + "\n".join(report)
    errors = [line for line in report if line.startswith("Error")]
    assert not errors, f"dciodvfy reports errors in {path}:\n" + "\n".join(errors)
