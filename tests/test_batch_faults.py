"""Faults a ``brainseg infer`` batch meets (issue 24, items 4-12): each becomes a refusal, a recovery or a ``failed``
row with its reason, never a crash, a hang, a stale result or a corrupted output folder.

Tests run as root, whom ``chmod 000`` does not stop: unreadable files and folders are made by the ``deny`` fixture,
which makes Python's listing and opening of them raise PermissionError as they would for another user.
"""

from __future__ import annotations

import builtins
import csv
import errno
import fcntl
import io
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

import brainseg_monai.inference.runner as runner
from brainseg_monai.channel_roles import InputRoles
from brainseg_monai.errors import InputError
from brainseg_monai.inference.cases import Case, discover_cases, safe_case_id
from brainseg_monai.inference.outputs import LOCK_NAME
from brainseg_monai.model import ModelSpec
from brainseg_monai.inference.runner import InferenceSettings, OutputLock, input_fingerprint, run_inference
from brainseg_monai.synth import make_dataset
from infer_helpers import (bright_per_slice, infer_cli, infer_settings, output_hashes, pred_png, random_image, stand_in,
                           summary_rows, untrained_one_channel_model, write_image)


def _images(folder: Path, count: int, suffix: str = ".png") -> list[Path]:
    """``s1.png`` ... ``s<count>.png``, each with its own bright block: one case each when given one by one."""
    return [write_image(folder / f"s{i}{suffix}", random_image(i)) for i in range(1, count + 1)]


def _entries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


@pytest.fixture
def deny(monkeypatch: pytest.MonkeyPatch) -> Callable[..., None]:
    """``deny(path, ...)``: listing a denied folder and opening a denied file raise PermissionError from then on."""
    denied: set[str] = set()
    real_scandir, real_listdir, real_open = os.scandir, os.listdir, builtins.open

    def check(path: object) -> None:
        if not isinstance(path, int) and os.path.abspath(os.fspath(path)) in denied:
            raise PermissionError(errno.EACCES, "Permission denied", os.fspath(path))

    def scandir(path: object = ".") -> object:
        check(path)
        return real_scandir(path)

    def listdir(path: object = ".") -> list:
        check(path)
        return real_listdir(path)

    def opener(file: object, *args: object, **kwargs: object) -> object:
        check(file)
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(os, "scandir", scandir)
    monkeypatch.setattr(os, "listdir", listdir)
    monkeypatch.setattr(builtins, "open", opener)
    monkeypatch.setattr(io, "open", opener)  # Path.open
    return lambda *paths: denied.update(os.path.abspath(p) for p in paths)


# ------------------------------------------------------------------- 4. one run at a time in an output folder


def test_a_held_output_folder_is_refused_naming_the_holder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                           capsys: pytest.CaptureFixture) -> None:
    image = write_image(tmp_path / "img.png", random_image(1))
    stand_in(monkeypatch)
    out = tmp_path / "pred"
    out.mkdir()
    with OutputLock(out):
        with pytest.raises(InputError) as refused:
            run_inference([image], out, infer_settings())
        message = str(refused.value)
        assert message.startswith(f"{out}: is in use by another brainseg infer run")
        assert f"PID {os.getpid()} on host {socket.gethostname()}" in message
        assert "Wait for that run to end, or choose another --out" in message
        assert infer_cli(image, "--out", out) == 2
        error = capsys.readouterr().err
        assert "is in use by another brainseg infer run" in error and "Traceback" not in error
        assert _entries(out) == [LOCK_NAME], "a refused run wrote into the folder"
    assert _entries(out) == [], "the lock file stayed after release"
    assert run_inference([image], out, infer_settings())[0]["status"] == "ok"
    assert _entries(out) == ["img", "summary.csv"]


_HOLD = """
import sys, time
from pathlib import Path
from brainseg_monai.inference.runner import OutputLock
OutputLock(Path(sys.argv[1])).acquire()
print("locked", flush=True)
time.sleep(600)
"""


def test_a_lock_left_by_a_killed_run_is_recovered(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    image = write_image(tmp_path / "img.png", random_image(1))
    stand_in(monkeypatch)
    out = tmp_path / "pred"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", _HOLD, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(InputError, match=f"PID {holder.pid} on host {socket.gethostname()}"):
            run_inference([image], out, infer_settings())
    finally:
        holder.kill()  # kill -9: the lock file stays, naming a process that is gone
        holder.communicate()
    assert (out / LOCK_NAME).is_file()
    with caplog.at_level(logging.WARNING):
        assert run_inference([image], out, infer_settings())[0]["status"] == "ok"
    assert f"recovered the lock of PID {holder.pid} on {socket.gethostname()}" in caplog.text
    assert not (out / LOCK_NAME).exists()


def test_without_flock_the_pid_tells_a_live_holder_from_a_dead_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    """Some network and FUSE file systems have no flock: a holder on this host is recovered when its PID is gone."""
    def no_flock(fd: int, operation: int) -> None:
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    image = write_image(tmp_path / "img.png", random_image(1))
    stand_in(monkeypatch)
    out = tmp_path / "pred"
    out.mkdir()
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    here = socket.gethostname()
    for pid, host in ((os.getpid(), here), (gone.pid, "another-host")):  # alive; on a host whose PIDs we cannot see
        (out / LOCK_NAME).write_text(json.dumps({"pid": pid, "host": host, "started": "2024-01-01 00:00:00"}))
        with pytest.raises(InputError, match=f"PID {pid} on host {host}"):
            run_inference([image], out, infer_settings())
    (out / LOCK_NAME).write_text(json.dumps({"pid": gone.pid, "host": here, "started": "2024-01-01 00:00:00"}))
    with caplog.at_level(logging.WARNING):
        assert run_inference([image], out, infer_settings())[0]["status"] == "ok"
    assert f"recovered the lock of PID {gone.pid}" in caplog.text and not (out / LOCK_NAME).exists()


def test_the_lock_is_released_however_the_run_ends(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    image = write_image(tmp_path / "img.png", random_image(1))
    stand_in(monkeypatch)
    out = tmp_path / "pred"
    with pytest.raises(InputError, match="is the one asked for"):
        run_inference([image], out, infer_settings(), select=lambda case: False)
    assert _entries(out) == []

    def interrupted(*args: object) -> dict:
        raise KeyboardInterrupt

    monkeypatch.setattr(runner, "_predict_case", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_inference([image], out, infer_settings())
    assert _entries(out) == []


# ------------------------------------------------------------------------ 5. --resume redoes what changed


def test_resume_redoes_a_case_whose_input_changed_in_place(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    """Other pixels with the same size and modification time: only the content hash tells."""
    first, second = _images(tmp_path / "in", 2, suffix=".tif")  # uncompressed: new pixels, same size
    stand_in(monkeypatch)
    out = tmp_path / "pred"
    run_inference([first, second], out, infer_settings())
    fingerprint = json.loads((out / "s1" / "case.json").read_text())["fingerprint"]
    assert fingerprint["inputs"]["files"] == 1 and fingerprint["inputs"]["bytes"] == first.stat().st_size
    assert len(fingerprint["inputs"]["sha256"]) == 64 and fingerprint["inputs"]["newest_mtime"]
    assert fingerprint["settings"]["tta"] == "none" and fingerprint["settings"]["postprocessing"]["threshold"] == 0.5
    kept = (out / "s2" / "case.json").stat().st_mtime_ns

    before = first.stat()
    write_image(first, random_image(7))
    os.utime(first, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert first.stat().st_size == before.st_size and first.stat().st_mtime_ns == before.st_mtime_ns
    with caplog.at_level(logging.WARNING):
        rows = {r["case"]: r for r in run_inference([first, second], out, infer_settings(resume=True))}
    assert rows["s1"]["status"] == "ok" and rows["s1"]["warnings"] == "redone: input changed"
    assert f"case s1 ({first}): redone: input changed" in caplog.text
    np.testing.assert_array_equal(pred_png(out / "s1" / "s1_pred.png"), bright_per_slice(random_image(7)[None]))
    assert (out / "s2" / "case.json").stat().st_mtime_ns == kept, "an unchanged case was redone"
    assert {r["case"]: r["warnings"] for r in summary_rows(out)} == {"s1": "redone: input changed", "s2": ""}


def test_resume_redoes_cases_after_the_settings_or_the_model_changed(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    image = write_image(tmp_path / "img.png", random_image(3))
    weights = tmp_path / "model.pt"  # the stand-in network ignores it; its bytes are the model's fingerprint
    weights.write_bytes(b"weights, first training")
    stand_in(monkeypatch)
    out = tmp_path / "pred"

    def resume(threshold: float = 0.5, tta: str = "none") -> str:
        settings = InferenceSettings(str(weights), tta=tta, threshold=threshold, progress=False, device="cpu",
                                     resume=True)
        row = run_inference([image], out, settings)[0]
        assert row["status"] == "ok", row
        return row["warnings"]

    assert resume() == ""
    finished = (out / "img" / "case.json").stat().st_mtime_ns
    assert resume() == "" and (out / "img" / "case.json").stat().st_mtime_ns == finished, "nothing changed, yet redone"
    assert resume(threshold=0.6) == "redone: settings changed"
    assert resume(threshold=0.6, tta="flip") == "redone: settings changed"
    weights.write_bytes(b"weights, second training")
    assert resume(threshold=0.6, tta="flip") == "redone: model changed"
    weights.write_bytes(b"weights, third training")
    assert resume() == "redone: model and settings changed"
    assert resume() == "", "a later --resume repeated why the case was redone before"


def test_fingerprinting_a_100_mb_study_takes_well_under_two_seconds(tmp_path: Path) -> None:
    block = np.random.default_rng(0).bytes(1 << 20)
    files = []
    for i in range(100):
        path = tmp_path / "study" / f"IM{i:04d}"
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(block[i:] + block[:i])
        files.append(str(path))
    case = Case("study", str(tmp_path / "study"), "slices", files)
    started = time.perf_counter()
    fingerprint = input_fingerprint(case)
    seconds = time.perf_counter() - started
    assert fingerprint["files"] == 100 and fingerprint["bytes"] == 100 << 20
    assert seconds < 2.0, f"fingerprinting 100 MB took {seconds:.2f} s"


# ------------------------------------------------------------------------- 6. other inputs into a used --out


def test_other_inputs_into_a_used_out_keep_the_earlier_cases_and_rows(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    def write(folder: str, name: str, seed: int) -> Path:
        return write_image(tmp_path / folder / f"{name}.png", random_image(seed))

    first = [write("first", "a", 1), write("first", "b", 2)]
    second = [write("second", "a", 3), write("second", "c", 4)]  # another a.png
    stand_in(monkeypatch)
    out = tmp_path / "pred"
    run_inference(first, out, infer_settings())
    earlier = output_hashes(out)
    with caplog.at_level(logging.WARNING):
        rows = run_inference(second, out, infer_settings())
    assert [(r["case"], r["source"], r["status"]) for r in rows] == [("a_2", str(second[0]), "ok"),
                                                                    ("c", str(second[1]), "ok")]
    kept = {k: v for k, v in output_hashes(out).items() if k.split("/")[0] in ("a", "b")}
    assert kept == earlier, "an earlier case changed"
    np.testing.assert_array_equal(pred_png(out / "a_2" / "a_pred.png"), bright_per_slice(random_image(3)[None]))
    assert [(r["case"], r["source"]) for r in summary_rows(out)] == [
        ("a_2", str(second[0])), ("c", str(second[1])), ("a", str(first[0])), ("b", str(first[1]))]
    assert f"case a ({second[0]}): the id names the results of other inputs ({first[0]})" in caplog.text
    assert "keeps the rows of 2 case(s) of earlier runs that this run does not include: a, b" in caplog.text

    rows = run_inference(first, out, infer_settings())  # the first inputs again: this run wins for its own cases
    assert [r["case"] for r in rows] == ["a", "b"]
    assert [r["case"] for r in summary_rows(out)] == ["a", "b", "a_2", "c"]


# ------------------------------------------------------------------------------------------ 7. safe case ids


@pytest.mark.parametrize("name, expected", [
    (".", "case"), ("..", "case"), ("", "case"), (".hidden", "hidden"), ("a/b", "a_b"), ("a\\b", "a_b"),
    ("line\nbreak", "line_break"), ("summary.csv", "summary_csv"), ("SUMMARY.CSV", "SUMMARY_CSV"),
    (LOCK_NAME, LOCK_NAME.lstrip(".")), (".summary.rank0.csv", "summary.rank0.csv"), ("x" * 300, "x" * 200),
    ("SYN_0001", "SYN_0001"),
])
def test_case_ids_are_safe_folder_names(name: str, expected: str) -> None:
    assert safe_case_id(name) == expected


def test_unsafe_file_names_give_safe_case_ids_and_later_runs_work(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """``..tif`` named the case ``.`` (the output folder itself); ``summary.csv.tif`` made a folder ``summary.csv``."""
    names = ["..tif", "summary.csv.tif", ".hidden.png", "back\\slash.png"]
    images = [write_image(tmp_path / "in" / name, random_image(i)) for i, name in enumerate(names, 1)]
    stand_in(monkeypatch)
    out = tmp_path / "pred"
    for _ in range(2):
        rows = run_inference(images, out, infer_settings())
        assert [(r["case"], r["status"]) for r in rows] == [
            ("case", "ok"), ("summary_csv", "ok"), ("hidden", "ok"), ("back_slash", "ok")], rows
        assert _entries(out) == ["back_slash", "case", "hidden", "summary.csv", "summary_csv"]
        assert (out / "summary.csv").is_file()


# ------------------------------------------------------------------------------------------ 8. symlink loops


@pytest.mark.timeout(120)
def test_symlink_loops_are_followed_once_and_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    """Two loops hung discovery for 600 s and one made a patient 41 cases; a link out of the tree is still read."""
    data = make_dataset(tmp_path / "lgg", "lgg", cases=1, seed=40, size=(32, 32, 4))
    patient = data / "SYN_0001"
    (patient / "self").symlink_to(".", target_is_directory=True)
    (patient / "up").symlink_to("..", target_is_directory=True)
    outside = make_dataset(tmp_path / "elsewhere", "lgg", cases=1, seed=44, size=(32, 32, 4)) / "SYN_0001"
    (data / "linked").symlink_to(outside, target_is_directory=True)
    stand_in(monkeypatch, in_channels=3, channel=1)
    with caplog.at_level(logging.WARNING):
        cases = discover_cases([data], InputRoles.of(ModelSpec()))
    assert [(c.case_id, c.error) for c in cases] == [("linked", None), ("SYN_0001", None)]
    for link in (patient / "self", patient / "up"):
        assert f"{link}: not followed: it leads to {os.path.realpath(link)}, a folder already read" in caplog.text
        assert caplog.text.count(f"{link}: not followed") == 1, "each link is named once"

    studies = make_dataset(tmp_path / "studies", "dicom", cases=2, seed=41, size=(24, 24, 4))
    (studies / "SYN_0001" / "FLAIR" / "loop").symlink_to("../..", target_is_directory=True)
    (studies / "SYN_0002" / "again").symlink_to(".", target_is_directory=True)
    cases = discover_cases([studies], InputRoles.of(ModelSpec()))
    assert [(c.case_id, c.error) for c in cases] == [("SYN_0001", None), ("SYN_0002", None)]
    rows = run_inference([data], tmp_path / "pred", infer_settings())
    assert [(r["case"], r["status"]) for r in rows] == [("linked", "ok"), ("SYN_0001", "ok")], rows


# ---------------------------------------------------------------------- 9. unreadable folders and files


def test_an_unreadable_sub_folder_is_a_failed_row_and_the_others_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                     deny: Callable[..., None]) -> None:
    data = make_dataset(tmp_path / "lgg", "lgg", cases=2, seed=42, size=(32, 32, 4))
    deny(data / "SYN_0002")
    stand_in(monkeypatch, in_channels=3, channel=1)
    rows = {r["case"]: r for r in run_inference([data], tmp_path / "pred", infer_settings())}
    assert rows["SYN_0001"]["status"] == "ok"
    assert rows["SYN_0002"]["status"] == "failed"
    assert rows["SYN_0002"]["error"] == "cannot be read: permission denied"


def test_unreadable_files_and_input_folders_are_failed_rows_naming_them(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch,
                                                                        deny: Callable[..., None]) -> None:
    slices = _images(tmp_path / "patient", 3)
    lone = write_image(tmp_path / "lone.png", random_image(4))
    closed = _images(tmp_path / "closed", 1)[0].parent
    good = write_image(tmp_path / "good.png", random_image(5))
    deny(slices[1], lone, closed)
    stand_in(monkeypatch)
    rows = {Path(r["source"]).name: r for r in run_inference([slices[0].parent, lone, closed, good], tmp_path / "pred",
                                                             infer_settings())}
    assert rows["patient"]["status"] == "failed"
    assert rows["patient"]["error"] == f"{slices[1]}: cannot be read: permission denied"
    assert rows["lone.png"]["error"] == "cannot be read: permission denied"
    assert rows["closed"]["error"] == "cannot be read: permission denied"
    assert rows["good.png"]["status"] == "ok"


def test_an_unreadable_dicom_file_fails_its_study_naming_the_file(tmp_path: Path, deny: Callable[..., None]) -> None:
    """GDCM leaves a file it cannot open out of its series without a word: the series would lose a slice."""
    studies = make_dataset(tmp_path / "studies", "dicom", cases=2, seed=43, size=(24, 24, 4))
    blocked = sorted((studies / "SYN_0002" / "FLAIR").iterdir())[1]
    deny(blocked)
    reason = f"{blocked}: cannot be read: permission denied"
    cases = {c.case_id: c for c in discover_cases([studies], InputRoles.of(ModelSpec()))}
    assert cases["SYN_0001"].error is None and cases["SYN_0002"].error == reason
    one_channel = discover_cases([studies], InputRoles.of(ModelSpec(in_channels=1)))
    assert [(c.source, c.error) for c in one_channel if c.error] == [(str(blocked.parent), reason)]
    assert len(one_channel) == 6


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads whatever the mode says; the tests above deny reads by "
                                              "monkeypatching instead")
def test_real_permissions_give_failed_rows(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    slices = _images(tmp_path / "patient", 2)
    closed = _images(tmp_path / "closed", 1)[0].parent
    slices[1].chmod(0)
    closed.chmod(0)
    stand_in(monkeypatch)
    try:
        rows = {Path(r["source"]).name: r for r in run_inference([slices[0].parent, closed], tmp_path / "pred",
                                                                 infer_settings())}
    finally:
        slices[1].chmod(0o644)
        closed.chmod(0o755)
    assert rows["patient"]["error"] == f"{slices[1]}: cannot be read: permission denied"
    assert rows["closed"]["error"] == "cannot be read: permission denied"


# --------------------------------------------------------------------------------- 10. a disk that fills up


def test_a_disk_filling_up_mid_batch_stops_it_cleanly_and_resume_goes_on(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch,
                                                                          capsys: pytest.CaptureFixture) -> None:
    images = _images(tmp_path / "in", 4)
    stand_in(monkeypatch)
    write = runner.write_png_mask
    written: list[Path] = []

    def full_after_two(mask: np.ndarray, path: Path, reference: str | None = None) -> Path:
        if len(written) == 2:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        written.append(path)
        return write(mask, path, reference=reference)

    monkeypatch.setattr(runner, "write_png_mask", full_after_two)
    out = tmp_path / "pred"
    assert infer_cli(*images, "--out", out) == 2
    error = capsys.readouterr().err
    assert f"{out}: no space left on device: case s3 could not be written and the batch stopped at case 3 of 4" in error
    assert "run the same command with --resume to go on" in error and "Traceback" not in error
    rows = summary_rows(out)
    assert [(r["case"], r["status"]) for r in rows] == [("s1", "ok"), ("s2", "ok"), ("s3", "failed"), ("s4", "failed")]
    assert "No space left on device" in rows[2]["error"]
    assert rows[3]["error"] == f"not run: no space left on device in {out}"
    assert _entries(out) == ["s1", "s2", "summary.csv"], "temporary files or the lock stayed"

    monkeypatch.setattr(runner, "write_png_mask", write)  # room made
    finished = (out / "s1" / "case.json").stat().st_mtime_ns
    assert infer_cli(*images, "--out", out, "--resume") == 0
    assert [(r["case"], r["status"]) for r in summary_rows(out)] == [(f"s{i}", "ok") for i in range(1, 5)]
    assert (out / "s1" / "case.json").stat().st_mtime_ns == finished


def test_a_full_disk_while_writing_the_summary_stops_and_leaves_no_temp_file(tmp_path: Path,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    images = _images(tmp_path / "in", 3)
    stand_in(monkeypatch)
    dict_writer = csv.DictWriter

    class FullAfterOne(dict_writer):
        writes = 0

        def writerows(self, rows: object) -> None:
            FullAfterOne.writes += 1
            if FullAfterOne.writes > 1:
                raise OSError(errno.ENOSPC, "No space left on device")
            super().writerows(rows)

    monkeypatch.setattr(csv, "DictWriter", FullAfterOne)
    out = tmp_path / "pred"
    with pytest.raises(InputError, match=r"summary.csv: cannot be written \(no space left on device\): the batch "
                                         r"stopped at case 2 of 3; .* --resume to go on"):
        run_inference(images, out, infer_settings())
    assert _entries(out) == ["s1", "s2", "summary.csv"], "a temporary summary or the lock stayed"
    assert [r["case"] for r in summary_rows(out)] == ["s1"]  # s2 finished, its row not written: its marker holds it
    monkeypatch.setattr(csv, "DictWriter", dict_writer)
    finished = (out / "s2" / "case.json").stat().st_mtime_ns
    rows = run_inference(images, out, infer_settings(resume=True))
    assert [(r["case"], r["status"]) for r in rows] == [("s1", "ok"), ("s2", "ok"), ("s3", "ok")]
    assert (out / "s2" / "case.json").stat().st_mtime_ns == finished


def test_a_full_disk_at_start_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture) -> None:
    image = write_image(tmp_path / "img.png", random_image(1))
    stand_in(monkeypatch)

    def full(fd: int, data: bytes, offset: int) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "pwrite", full)  # the lock's record is the run's first write
    out = tmp_path / "pred"
    assert infer_cli(image, "--out", out) == 2
    error = capsys.readouterr().err
    assert f"{out / LOCK_NAME}: cannot be written to hold the output folder (no space left on device)" in error
    assert "Traceback" not in error and _entries(out) == []


# ---------------------------------------------------------------------------- 11. Ctrl-C and kill -9


def test_ctrl_c_ends_the_run_with_status_130_and_no_temporary_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                     capsys: pytest.CaptureFixture) -> None:
    images = _images(tmp_path / "in", 3)
    stand_in(monkeypatch)
    predict = runner._predict_case

    def interrupted_in_s2(case: Case, *args: object) -> dict:
        values = predict(case, *args)  # s2's outputs are in its temporary folder when Ctrl-C comes
        if case.case_id == "s2":
            raise KeyboardInterrupt
        return values

    monkeypatch.setattr(runner, "_predict_case", interrupted_in_s2)
    out = tmp_path / "pred"
    try:
        code = infer_cli(*images, "--out", out)
    except KeyboardInterrupt:
        code = "KeyboardInterrupt escaped"
    assert code == 130
    error = capsys.readouterr().err
    assert "interrupted" in error and "--resume" in error and "Traceback" not in error
    assert _entries(out) == ["s1", "summary.csv"]
    assert [r["case"] for r in summary_rows(out)] == ["s1"]


def test_sigint_to_a_running_batch_exits_130_cleanly(tmp_path: Path) -> None:
    """The real signal, at whatever point of a case it lands."""
    checkpoint = untrained_one_channel_model(tmp_path / "model")
    images = _images(tmp_path / "in", 60)
    out = tmp_path / "pred"
    command = [sys.executable, "-m", "brainseg_monai.cli", "infer", *map(str, images), "--out", str(out),
               "--checkpoint", str(checkpoint), "--tta", "dihedral", "--device", "cpu", "--no-progress"]
    # SIGINT as a terminal gives it: a suite started as a background job (`bash scripts/test.sh &`) has SIGINT
    # ignored, the child inherits that, and Python then installs no KeyboardInterrupt handler at all
    run = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           env={**os.environ, "OMP_NUM_THREADS": "1"},
                           preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 120
    while not (out / "summary.csv").exists() and run.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    run.send_signal(signal.SIGINT)
    _, error = run.communicate(timeout=120)
    assert run.returncode == 130, error
    assert "interrupted" in error and "Traceback" not in error
    assert not [name for name in _entries(out) if name.startswith(".")], _entries(out)
    finished = [r["case"] for r in summary_rows(out)]
    assert 0 < len(finished) < len(images), "the signal should land mid-batch"
    assert sorted(finished + ["summary.csv"]) == _entries(out)


def test_leftovers_of_a_killed_run_are_cleared_and_nothing_else(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    image = write_image(tmp_path / "img.png", random_image(1))
    stand_in(monkeypatch)
    out = tmp_path / "pred"
    run_inference([image], out, infer_settings())
    finished = (out / "img" / "case.json").stat().st_mtime_ns
    # what kill -9 leaves: a case folder just made, one half written, a summary being written, and a finished case
    # moved aside for a replacement that never arrived
    (out / ".img.k2j4h5g6").mkdir()
    half = out / ".other.a1b2c3d4"
    half.mkdir()
    (half / "mask.nii.gz").write_bytes(b"partial")
    (half / ".overlay.png.123-abcdef12.png").write_bytes(b"")
    (out / ".summary.csv.123-abcdef12.tmp").write_bytes(b"")
    os.replace(out / "img", out / ".img.old")
    # the user's: never touched
    (out / ".notes").mkdir()
    (out / ".backup.20240101").mkdir()
    (out / ".backup.20240101" / "notes.txt").write_text("mine")
    (out / ".draft.abcdefgh").write_text("a file, not a folder")
    with caplog.at_level(logging.WARNING):
        rows = run_inference([image], out, infer_settings(resume=True))
    assert rows[0]["status"] == "ok"
    assert _entries(out) == [".backup.20240101", ".draft.abcdefgh", ".notes", "img", "summary.csv"]
    assert (out / "img" / "case.json").stat().st_mtime_ns == finished, "the case put back was redone"
    assert f"{out / '.img.k2j4h5g6'}: removed, left by an interrupted run" in caplog.text
    assert f"{out / '.img.old'}: put back as {out / 'img'}" in caplog.text


# ------------------------------------------------------------------------------ 12. one-line error fields


def test_error_fields_are_one_line_and_the_traceback_goes_to_the_log(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    image = write_image(tmp_path / "img.png", random_image(1))
    stand_in(monkeypatch)

    def fails(*args: object) -> dict:
        try:
            raise ValueError("deep\ninside")
        except ValueError as err:
            raise RuntimeError('worker failed:\nTraceback (most recent call last):\n  File "w.py", line 3, in run\n'
                               '    step()\nValueError: deep') from err

    monkeypatch.setattr(runner, "_predict_case", fails)
    out = tmp_path / "pred"
    with caplog.at_level(logging.DEBUG, logger=runner.__name__):
        row = run_inference([image], out, infer_settings())[0]
    assert row["error"] == "RuntimeError: worker failed: ValueError: deep (ValueError: deep inside)"
    assert len((out / "summary.csv").read_text().splitlines()) == 2
    assert summary_rows(out)[0]["error"] == row["error"]
    assert "Traceback (most recent call last)" in caplog.text and 'raise ValueError("deep\\ninside")' in caplog.text
