"""``brainseg serve``: request handling through FastAPI's test client, on slices, volumes and DICOM with known masks."""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
import torch
from PIL import Image

pytest.importorskip("fastapi", reason="the web app needs fastapi (pip install fastapi uvicorn python-multipart httpx)")
pytest.importorskip("multipart", reason="the web app needs python-multipart")
pytest.importorskip("httpx", reason="FastAPI's test client needs httpx")
from fastapi.testclient import TestClient  # noqa: E402
from skimage.data import chelsea  # noqa: E402
from skimage.transform import resize  # noqa: E402

from brainseg_monai.model import MODEL_SIDECAR, ModelSpec  # noqa: E402
from brainseg_monai.metrics import image_metrics  # noqa: E402
from brainseg_monai.networks import NETWORKS  # noqa: E402
from brainseg_monai.synth import make_dataset  # noqa: E402
from brainseg_monai.webapp import Segmenter, create_app  # noqa: E402
from brainseg_monai.webapp.gate import dark_border_fraction  # noqa: E402

SLICE_SHAPE = (64, 64)  # (rows, cols)
TUMOUR = (slice(20, 32), slice(30, 40))  # 12 x 10 pixels, rows then columns


class FlairAbove(torch.nn.Module):
    """Logit ``gain * (z - offset)`` of the z-scored FLAIR channel: at threshold 0.5 the mask is where FLAIR stands out."""

    def __init__(self, spatial_dims: int = 2, in_channels: int = 3, out_channels: int = 1, **_: object) -> None:
        super().__init__()
        self.gain = torch.nn.Parameter(torch.tensor(1.0))
        self.offset = torch.nn.Parameter(torch.tensor(1.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.gain * (x[:, 1:2] - self.offset)


#: The shipped LGG model's fallbacks: a missing t1 or t1c is filled from FLAIR, as it was trained.
SHIPPED_FALLBACKS = {"t1": "flair", "t1c": "flair"}


def flair_model(folder: Path, gain: float = 1.0, offset: float = 1.0,
                fallbacks: dict[str, str] | None = None) -> Path:
    """A checkpoint of `FlairAbove` (registered as ``flairabove`` by the `known_network` fixture), with the shipped
    model's channels and fallbacks unless ``fallbacks`` says otherwise."""
    folder.mkdir(parents=True, exist_ok=True)
    spec = ModelSpec(network_name="flairabove", spatial_dims=2, in_channels=3, roi_size=[256, 256],
                     channel_fallbacks=SHIPPED_FALLBACKS if fallbacks is None else fallbacks)
    torch.save({"gain": torch.tensor(gain), "offset": torch.tensor(offset)}, folder / "model.pt")
    (folder / MODEL_SIDECAR).write_text(json.dumps(spec.to_dict()))
    return folder / "model.pt"


def known_slice() -> tuple[np.ndarray, np.ndarray]:
    """An RGB (t1, flair, t1c) head slice: dark air, a uniform disc, a FLAIR-bright rectangle; and its {0, 255} mask."""
    rows, cols = np.mgrid[: SLICE_SHAPE[0], : SLICE_SHAPE[1]]
    head = (rows - 32) ** 2 + (cols - 32) ** 2 <= 26**2
    rgb = np.zeros(SLICE_SHAPE + (3,), dtype=np.uint8)
    rgb[head] = (100, 100, 100)
    mask = np.zeros(SLICE_SHAPE, dtype=np.uint8)
    mask[TUMOUR] = 255
    rgb[mask > 0] = (80, 220, 120)
    return rgb, mask


def png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def decode(url: str) -> bytes:
    return base64.b64decode(url.split(",", 1)[1])


def downloads(result: dict) -> dict[str, bytes]:
    return {d["name"]: decode(d["url"]) for d in result["downloads"]}


@pytest.fixture(scope="module")
def known_network() -> Iterator[None]:
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(NETWORKS, "flairabove", FlairAbove)
        yield


@pytest.fixture(scope="module")
def client(known_network: None, tmp_path_factory: pytest.TempPathFactory) -> TestClient:
    checkpoint = flair_model(tmp_path_factory.mktemp("model"))
    return TestClient(create_app(Segmenter(checkpoint, max_upload_mb=2)))


def post(client: TestClient, files: list[tuple[str, bytes]], **form: str):
    return client.post("/api/segment", files=[("files", f) for f in files], data=form)


def zipped(root: Path, skip: tuple[str, ...] = ()) -> bytes:
    """The files under ``root`` as a zip (paths from ``root``'s parent), leaving out folders named in ``skip``."""
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as bundle:
        for path in sorted(root.rglob("*")):
            if path.is_file() and not set(path.relative_to(root).parts) & set(skip):
                bundle.write(path, path.relative_to(root.parent))
    return archive.getvalue()


def mask_of(result: dict, tmp_path: Path) -> np.ndarray:
    """The downloaded ``mask.nii.gz`` of a volume result, (x, y, z) boolean."""
    (tmp_path / "mask.nii.gz").write_bytes(downloads(result)["mask.nii.gz"])
    return sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "mask.nii.gz"))).transpose(2, 1, 0) > 0


def test_page_says_research_tool_and_info_lists_model(client: TestClient) -> None:
    page = client.get("/")
    assert page.status_code == 200 and "not a medical device" in page.text
    info = client.get("/api/info").json()
    assert info["channels"] == ["t1", "flair", "t1c"] and info["threshold"] == 0.5
    assert info["primary_channel"] == "flair" and info["channel_fallbacks"] == SHIPPED_FALLBACKS
    assert info["tta_modes"] == ["none", "flip", "dihedral"] and info["tta"] == "dihedral"  # as brainseg infer


def test_good_slice_with_truth_gives_known_mask_and_metrics(client: TestClient, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    rgb, mask = known_slice()
    response = post(client, [("case7.png", png_bytes(rgb)), ("case7_mask.png", png_bytes(mask))])  # default TTA
    assert response.status_code == 200, response.text
    result = response.json()
    expected_pct = round(100.0 * 120 / mask.size, 4)
    assert result["stats"]["coverage_pct"] == pytest.approx(expected_pct)
    # image files hold no scanner pixel size: the area is a pixel count, never "mm^2" of 1 x 1 or dpi-tag pixels
    assert result["stats"]["tumour_voxels"] == 120 and "area_mm2" not in result["stats"]
    assert result["metrics"]["dice"] == pytest.approx(1.0) and result["metrics"]["iou"] == pytest.approx(1.0)
    assert result["settings"] == {"tta": "dihedral", "threshold": 0.5, "postprocessing": "none"}
    assert len(result["slices"]) == 1 and result["slices"][0]["tumour_pixels"] == 120 and result["slices"][0]["truth"]
    files = downloads(result)
    assert set(files) == {"case7_pred.png", "case7_unc.png", "overlay.png", "uncertainty.png"}
    # the views' disagreement: a layer to show over the slice, its file, and the case's score
    assert result["slices"][0]["unc"].startswith("data:image/png;base64,")
    assert 0.0 <= result["stats"]["uncertainty"] <= 1.0 and result["stats"]["uncertainty_score"] == "1 - expected Dice"
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(files["case7_pred.png"]))), mask)
    red = np.asarray(Image.open(io.BytesIO(decode(result["slices"][0]["pred"]))))[..., 0]
    np.testing.assert_array_equal(red, mask)  # shown rows x columns as uploaded
    assert list(tmp_path.iterdir()) == [], "the request's temporary folder was left behind"


def test_several_slices_list_their_masks_in_slice_order_once_each(client: TestClient) -> None:
    rgb, _ = known_slice()
    names = ["p_1.png", "p_2.png", "p_10.png", "p_2.tif"]  # 10 sorts before 2 as text; p_2.* share a stem
    tif = io.BytesIO()
    Image.fromarray(rgb).save(tif, format="TIFF", dpi=(72, 72))  # a print resolution, not a scanner pixel size
    files = [(name, png_bytes(rgb)) for name in names[:3]] + [(names[3], tif.getvalue())]
    result = post(client, files, tta="flip").json()
    assert result["settings"]["tta"] == "flip"  # the faster choice stays selectable
    assert result["stats"]["tumour_voxels"] == 4 * 120 and "area_mm2" not in result["stats"]
    assert [d["name"] for d in result["downloads"]] == [
        "p_1_pred.png", "p_2_pred.png", "p_2.tif_pred.png", "p_10_pred.png",  # the runner's names
        "p_1_unc.png", "p_2_unc.png", "p_2.tif_unc.png", "p_10_unc.png", "overlay.png", "uncertainty.png"]


def test_threshold_change_reaches_the_runner(client: TestClient) -> None:
    rgb, _ = known_slice()
    # Background and head probabilities are sigmoid(-1) and sigmoid(-1.2): below 0.5, above 0.1.
    low = post(client, [("s.png", png_bytes(rgb))], threshold="0.1", tta="none").json()
    assert low["stats"]["coverage_pct"] == pytest.approx(100.0) and low["settings"]["threshold"] == 0.1
    bad = post(client, [("s.png", png_bytes(rgb))], threshold="1.5")
    assert bad.status_code == 400 and "threshold" in bad.json()["error"]


def test_nifti_volume_reports_volume_slices_and_dice(client: TestClient, tmp_path: Path) -> None:
    root = make_dataset(tmp_path / "nifti", "nifti", cases=1, seed=5, size=(32, 32, 8))
    case = next(p for p in root.iterdir() if p.is_dir())
    files = [(p.name, p.read_bytes()) for p in sorted(case.glob("*.nii.gz"))]
    response = post(client, files, tta="none")
    assert response.status_code == 200, response.text
    result = response.json()
    assert result["kind"] == "volume" and len(result["slices"]) == 8 and result["case"] == case.name
    (tmp_path / "mask.nii.gz").write_bytes(downloads(result)["mask.nii.gz"])
    mask = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "mask.nii.gz"))).transpose(2, 1, 0)  # (x, y, z)
    truth = sitk.GetArrayFromImage(sitk.ReadImage(str(case / f"{case.name}_seg.nii.gz"))).transpose(2, 1, 0)
    assert mask.any(), "the FLAIR-bright tumour should be found"
    stats = result["stats"]
    assert stats["tumour_voxels"] == int(mask.sum())
    assert stats["tumour_ml"] == pytest.approx(mask.sum() * 1.5 / 1000.0, abs=1e-4)
    assert stats["slices_with_tumour"] == int(mask.any(axis=(0, 1)).sum())
    assert result["start"] == int(np.argmax(mask.sum(axis=(0, 1))))
    assert [s["tumour_pixels"] for s in result["slices"]] == mask.sum(axis=(0, 1)).tolist()
    assert result["metrics"]["dice"] == pytest.approx(image_metrics(mask, truth)["dice"])


def test_zipped_dicom_study_lists_cases_then_segments_the_chosen(client: TestClient, tmp_path: Path) -> None:
    root = make_dataset(tmp_path / "dicom", "dicom", cases=2, seed=6, size=(32, 32, 6))
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as bundle:
        for path in sorted(root.rglob("*")):
            if path.is_file():
                bundle.write(path, path.relative_to(root.parent))
    listing = post(client, [("studies.zip", archive.getvalue())], tta="none").json()
    assert [c["id"] for c in listing["choose"]] == ["dicom_SYN_0001", "dicom_SYN_0002"]
    assert "AX FLAIR (MR, 6 images)" in listing["choose"][0]["label"]
    result = post(client, [("studies.zip", archive.getvalue())], tta="none", case="dicom_SYN_0002").json()
    assert result["case"] == "SYN_0002" and result["kind"] == "volume" and len(result["slices"]) == 6
    files = downloads(result)
    assert {"mask.nii.gz", "seg.dcm", "overlay.png"} <= set(files)
    assert pydicom.dcmread(io.BytesIO(files["seg.dcm"])).Modality == "SEG"
    assert result["metrics"] is not None, "the study's SYN_0002_seg.nii.gz is its truth"


def test_corrupt_and_unsupported_files_are_named_and_server_keeps_serving(client: TestClient) -> None:
    corrupt = post(client, [("broken.nii.gz", b"\x1f\x8b this is not a volume")])
    assert corrupt.status_code == 422
    error = corrupt.json()["error"]
    assert error.startswith("broken.nii.gz") and "brainseg-serve" not in error
    # named as uploaded, not by the safe name it is stored under on the server (My_Scan_1_.nii.gz)
    renamed = post(client, [("My Scan (1).nii.gz", b"\x1f\x8b this is not a volume")])
    assert renamed.status_code == 422 and renamed.json()["error"].startswith("My Scan (1).nii.gz: ")
    unsupported = post(client, [("notes.txt", b"hello")])
    assert unsupported.status_code == 422 and "notes.txt" in unsupported.json()["error"]
    assert "unsupported file type" in unsupported.json()["error"]
    bad_zip = post(client, [("series.zip", b"PK not a zip")])
    assert bad_zip.status_code == 422 and "series.zip" in bad_zip.json()["error"]
    rgb, _ = known_slice()
    assert post(client, [("ok.png", png_bytes(rgb))], tta="none").status_code == 200


def test_gate_refuses_photo_constant_and_wrong_channels(client: TestClient) -> None:
    photo = (resize(chelsea(), (64, 96), anti_aliasing=True) * 255).astype(np.uint8)
    assert dark_border_fraction(np.moveaxis(photo, -1, 0)) < 0.5 < dark_border_fraction(np.moveaxis(known_slice()[0], -1, 0))
    refused = post(client, [("cat.jpg", png_bytes(photo))])
    assert refused.status_code == 422
    assert refused.json()["error"].startswith("cat.jpg: does not look like an MR image")
    constant = post(client, [("blank.png", png_bytes(np.full((64, 64, 3), 90, dtype=np.uint8)))])
    assert constant.status_code == 422 and "constant" in constant.json()["error"]
    rgba = np.dstack([known_slice()[0], np.full(SLICE_SHAPE, 255, dtype=np.uint8)])
    four = post(client, [("rgba.png", png_bytes(rgba))])
    assert four.status_code == 422
    assert "has 4 channel(s) but the model takes 3 (t1, flair, t1c)" in four.json()["error"]


def test_oversized_upload_is_refused(client: TestClient) -> None:
    big = np.random.default_rng(0).integers(0, 255, 3 * 2**20, dtype=np.uint8).tobytes()  # over the 2 MB limit
    response = post(client, [("big.png", big)])
    assert response.status_code == 413 and "limit of 2 MB" in response.json()["error"]
    # Within the form's framing allowance but over the files' own limit: refused while storing.
    near = np.random.default_rng(1).integers(0, 255, 2 * 2**20 + 2**18, dtype=np.uint8).tobytes()
    response = post(client, [("near.png", near)])
    assert response.status_code == 413 and "limit of 2 MB" in response.json()["error"]
    rgb, _ = known_slice()
    assert post(client, [("ok.png", png_bytes(rgb))], tta="none").status_code == 200


# ---------------------------------------------------------------- channel roles (issue 27, point 8)


def test_flair_only_dicom_study_runs_and_lists_what_each_series_fills(client: TestClient, tmp_path: Path) -> None:
    study = make_dataset(tmp_path / "dicom", "dicom", cases=1, seed=6, size=(32, 32, 6)) / "SYN_0001"
    full = post(client, [("full.zip", zipped(study))], tta="none").json()
    response = post(client, [("flair only.zip", zipped(study, skip=("T1_PRE", "T1_POST")))], tta="none")
    assert response.status_code == 200, response.text
    result = response.json()
    # the model's t1 and t1c are filled from FLAIR, as the shipped model was trained: the FLAIR-driven mask is the same
    np.testing.assert_array_equal(mask_of(result, tmp_path), mask_of(full, tmp_path))
    inputs = result["inputs"]
    assert [(s["name"], s["used_as"]) for s in inputs["series"]] == [("AX FLAIR", ["t1", "flair", "t1c"])]
    assert inputs["series"][0]["taken_to_be"].startswith("flair (inversion recovery")
    channels = {c["channel"]: c for c in inputs["channels"]}
    assert channels["flair"]["source"] == "AX FLAIR" and channels["flair"]["filled_from"] is None
    assert channels["t1"]["filled_from"] == channels["t1c"]["filled_from"] == "flair"
    assert channels["t1c"]["fallback"] == "flair" and channels["flair"]["fallback"] is None
    assert inputs["choices"] == ["AX FLAIR"] and inputs["one_channel"] is None
    assert {s["name"]: s["used_as"] for s in full["inputs"]["series"]} == {
        "AX T1 PRE": ["t1"], "AX FLAIR": ["flair"], "AX T1 POST GD": ["t1c"]}
    assert all(s["taken_to_be"] for s in full["inputs"]["series"])
    assert "brainseg-serve" not in json.dumps(result["inputs"]), "a server path leaked into the listing"


def test_channel_roles_set_by_hand_reach_the_run(client: TestClient, tmp_path: Path) -> None:
    archive = zipped(make_dataset(tmp_path / "dicom", "dicom", cases=1, seed=6, size=(32, 32, 6)) / "SYN_0001")
    auto = post(client, [("study.zip", archive)], tta="none").json()
    filled = post(client, [("study.zip", archive)], tta="none", channels=json.dumps({"t1c": {"fill": "flair"}}))
    assert filled.status_code == 200, filled.text
    rows = {s["name"]: s for s in filled.json()["inputs"]["series"]}
    assert rows["AX FLAIR"]["used_as"] == ["flair", "t1c"] and rows["AX T1 POST GD"]["used_as"] == []
    assert rows["AX T1 POST GD"]["note"] == "not used: the t1c channel was set by hand"
    t1c = {c["channel"]: c for c in filled.json()["inputs"]["channels"]}["t1c"]
    assert t1c["filled_from"] == "flair" and t1c["reason"] == "set by hand: filled from flair"
    # FLAIR set to the T1 series: the model (tumour where its FLAIR channel stands out) now sees T1
    swapped = post(client, [("study.zip", archive)], tta="none",
                   channels=json.dumps({"flair": {"name": "AX T1 PRE"}})).json()
    flair = {c["channel"]: c for c in swapped["inputs"]["channels"]}["flair"]
    exact = r"^AX\ T1\ PRE$"  # escaped and anchored: this description and no other
    # shown as typed, never as Python's repr with every backslash doubled
    assert flair["source"] == "AX T1 PRE" and flair["reason"] == f"set by hand: SeriesDescription matches '{exact}'"
    assert not any("\\\\" in c["reason"] for c in swapped["inputs"]["channels"])  # no backslash shown twice
    assert not np.array_equal(mask_of(swapped, tmp_path), mask_of(auto, tmp_path))


def test_study_without_flair_is_refused_with_its_series_then_runs_with_roles_set_by_hand(
        client: TestClient, tmp_path: Path) -> None:
    archive = zipped(make_dataset(tmp_path / "dicom", "dicom", cases=1, seed=6, size=(32, 32, 6)) / "SYN_0001",
                     skip=("FLAIR",))
    refused = post(client, [("no flair.zip", archive)], tta="none")
    assert refused.status_code == 422
    body = refused.json()
    assert body["error"].startswith("no flair.zip/SYN_0001: no series for the required channel 'flair'"), body["error"]
    assert body["error"].endswith("or set the channels by hand below") and "brainseg-serve" not in refused.text
    inputs = body["inputs"]
    assert [(s["name"], s["used_as"]) for s in inputs["series"]] == [("AX T1 PRE", ["t1"]), ("AX T1 POST GD", ["t1c"])]
    assert inputs["choices"] == ["AX T1 PRE", "AX T1 POST GD"]
    ran = post(client, [("no flair.zip", archive)], tta="none", channels=json.dumps({"flair": {"name": "AX T1 PRE"}}))
    assert ran.status_code == 200, ran.text
    assert {s["name"]: s["used_as"] for s in ran.json()["inputs"]["series"]} == {
        "AX T1 PRE": ["t1", "flair"], "AX T1 POST GD": ["t1c"]}


def test_mixed_upload_lists_its_studies_and_shows_the_chosen_ones_series(client: TestClient, tmp_path: Path) -> None:
    root = make_dataset(tmp_path / "dicom", "dicom", cases=2, seed=6, size=(32, 32, 6))
    shutil.rmtree(root / "SYN_0002" / "T1_PRE")
    archive = zipped(root)
    listing = post(client, [("two.zip", archive)], tta="none").json()
    assert [c["id"] for c in listing["choose"]] == ["dicom_SYN_0001", "dicom_SYN_0002"]
    second = post(client, [("two.zip", archive)], tta="none", case="dicom_SYN_0002").json()
    assert {s["name"]: s["used_as"] for s in second["inputs"]["series"]} == {
        "AX FLAIR": ["t1", "flair"], "AX T1 POST GD": ["t1c"]}


def test_lone_one_channel_image_is_segmented_once_its_role_is_chosen(client: TestClient) -> None:
    rgb, mask = known_slice()
    grey = png_bytes(rgb[..., 1])  # the FLAIR channel alone, named nothing that says so
    refused = post(client, [("grey scan.png", grey)], tta="none")
    assert refused.status_code == 422
    body = refused.json()
    assert body["error"] == ("grey scan.png: has 1 channel but the model takes 3 (t1, flair, t1c) and nothing says "
                             "which sequence it is: choose it below")
    one = body["inputs"]["one_channel"]
    assert one["shown"] == "grey scan.png" and one["role"] is None
    assert [(r["role"], r["usable"]) for r in one["roles"]] == [("t1", False), ("flair", True), ("t1c", False)]
    assert "cannot fill channel(s) flair" in one["roles"][0]["note"]
    chosen = json.dumps({"flair": {"name": one["name"]}})
    response = post(client, [("grey scan.png", grey)], tta="none", channels=chosen)
    assert response.status_code == 200, response.text
    result = response.json()
    assert result["inputs"]["one_channel"]["role"] == "flair"
    (pred,) = [v for k, v in downloads(result).items() if k.endswith("_pred.png")]
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(pred))), mask)


def test_nifti_flair_alone_runs_by_its_name_and_a_folder_without_t1c_is_filled(client: TestClient,
                                                                                tmp_path: Path) -> None:
    case = make_dataset(tmp_path / "nifti", "nifti", cases=1, seed=5, size=(32, 32, 8)) / "SYN_0001"
    volumes = sorted(p for p in case.glob("*.nii.gz") if not p.name.endswith("_seg.nii.gz"))
    full = post(client, [(p.name, p.read_bytes()) for p in volumes], tta="none").json()
    flair = case / "SYN_0001_flair.nii.gz"
    alone = post(client, [(flair.name, flair.read_bytes())], tta="none")
    assert alone.status_code == 200, alone.text
    assert alone.json()["inputs"]["one_channel"]["role"] == "flair"
    np.testing.assert_array_equal(mask_of(alone.json(), tmp_path), mask_of(full, tmp_path))
    without_t1c = [p for p in volumes if not p.name.endswith("_t1c.nii.gz")]
    part = post(client, [(p.name, p.read_bytes()) for p in without_t1c], tta="none").json()
    assert {f["name"]: f["used_as"] for f in part["inputs"]["files"]} == {
        "SYN_0001_flair.nii.gz": ["flair", "t1c"], "SYN_0001_t1.nii.gz": ["t1"]}
    assert {c["channel"]: c["filled_from"] for c in part["inputs"]["channels"]} == {
        "t1": None, "flair": None, "t1c": "flair"}
    # the same files, each set by hand: the file chosen for t1 is FLAIR
    by_hand = post(client, [(p.name, p.read_bytes()) for p in without_t1c], tta="none",
                   channels=json.dumps({"t1": {"name": "SYN_0001_flair.nii.gz"}})).json()
    assert {f["name"]: f["used_as"] for f in by_hand["inputs"]["files"]} == {
        "SYN_0001_flair.nii.gz": ["t1", "flair", "t1c"], "SYN_0001_t1.nii.gz": []}


def test_channel_choices_that_cannot_apply_are_refused(client: TestClient) -> None:
    rgb, _ = known_slice()
    for channels, expected in [("{not json", "channels must be a JSON object"),
                               (json.dumps({"t2": {"name": "x"}}), "'t2' is not a channel of the model"),
                               (json.dumps({"flair": {"fill": "t1"}}), "cannot be filled from 't1'"),
                               (json.dumps({"t1": "T1 AX"}), "must be {'name': ...} or {'fill': ...}")]:
        response = post(client, [("s.png", png_bytes(rgb))], channels=channels)
        assert response.status_code == 400 and expected in response.json()["error"], response.text


# ---------------------------------------------------------------- hostile uploads (issue 24, items 1 to 3)


def test_metaimage_header_naming_a_file_outside_the_upload_is_refused_unread(client: TestClient,
                                                                              tmp_path: Path) -> None:
    secret = tmp_path / "secret.raw"
    secret.write_bytes(bytes(range(64)) * 64)  # 64 x 64 bytes of a file that is not the uploader's
    header = "ObjectType = Image\nNDims = 2\nDimSize = 64 64\nElementType = MET_UCHAR\nElementDataFile = {}\n"
    refused = post(client, [("evil.mhd", header.format(secret).encode())],
                   channels=json.dumps({"flair": {"name": "evil.mhd"}}))
    assert refused.status_code == 422
    assert refused.json()["error"] == (
        f"evil.mhd: names the data file '{secret}', which is outside the folder it came in; refused before reading "
        f"(an image header may only name data files beside it)")
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as bundle:  # the same through a relative name, in a zip
        bundle.writestr("case/evil.mhd", header.format("../" * 40 + str(secret).lstrip("/")))
    refused = post(client, [("case.zip", archive.getvalue())])
    assert refused.status_code == 422 and refused.json()["error"].startswith("case.zip/case/evil.mhd: names the data")
    assert "brainseg-serve" not in refused.text


def _zip_with_link(*more: tuple[str, bytes]) -> bytes:
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as bundle:
        link = zipfile.ZipInfo("link")
        link.external_attr = (stat.S_IFLNK | 0o777) << 16
        bundle.writestr(link, "/etc")
        for name, data in more:
            bundle.writestr(name, data)
    return archive.getvalue()


def test_zip_with_a_link_or_clashing_entries_is_refused_naming_only_the_entry(client: TestClient) -> None:
    link = "evil.zip: holds a symbolic link, 'link': links are not unpacked; zip the files themselves"
    for archive in (_zip_with_link(), _zip_with_link(("link/passwd.dcm", b"x"))):
        response = post(client, [("evil.zip", archive)])
        assert response.status_code == 422 and response.json()["error"] == link
    clash = io.BytesIO()
    with zipfile.ZipFile(clash, "w") as bundle:  # a file and a folder of one name
        bundle.writestr("scan", b"x")
        bundle.writestr("scan/IM0001.dcm", b"x")
    response = post(client, [("clash.zip", clash.getvalue())])
    assert response.status_code == 422
    assert response.json()["error"] == "clash.zip: entry 'scan/IM0001.dcm' cannot be unpacked (File exists)"
    assert "brainseg-serve" not in response.text and tempfile.gettempdir() not in response.text


def test_upload_folders_of_a_killed_server_are_removed_at_start(known_network: None, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait()
    killed = tmp_path / f"brainseg-serve-{ended.pid}-k2j4_x9q"  # a server that is no longer running
    (killed / "uploads").mkdir(parents=True)
    (killed / "uploads" / "patient.png").write_bytes(b"an upload left behind")
    unnamed = tmp_path / "brainseg-serve-a8_3kqzp"  # an older server's folder, without its PID
    unnamed.mkdir()
    running = tmp_path / f"brainseg-serve-{os.getpid()}-live0000"  # a server still running: its request goes on
    running.mkdir()
    other = tmp_path / "brainseg-other"
    other.mkdir()
    Segmenter(flair_model(tmp_path / "model"))
    assert not killed.exists() and not unnamed.exists()
    assert running.is_dir() and other.is_dir()


def test_image_over_the_pixel_limit_is_refused_with_422(client: TestClient) -> None:
    huge = io.BytesIO()
    Image.new("L", (10000, 10000)).save(huge, format="PNG")  # 100 megapixels in about 100 KB
    assert len(huge.getvalue()) < 2**20
    response = post(client, [("huge.png", huge.getvalue())])
    assert response.status_code == 422
    assert response.json()["error"].startswith("huge.png: image too large: 10000 x 10000 is 100,000,000 pixels")
    rgb, _ = known_slice()
    assert post(client, [("ok.png", png_bytes(rgb))], tta="none").status_code == 200


def test_page_serves_its_icon_and_names_what_an_area_in_pixels_means(client: TestClient) -> None:
    icon = client.get("/favicon.ico")
    assert icon.status_code == 200 and icon.headers["content-type"].startswith("image/svg+xml")
    assert icon.text.startswith("<svg") and "</svg>" in icon.text
    page = client.get("/").text
    assert '<link rel="icon" href="/favicon.ico"' in page
    # image files give an area in pixels: the page says why it is no mm²
    assert "pixels (no pixel size in this file)" in page


def test_a_patients_downloads_come_as_one_zip_too(client: TestClient) -> None:
    rgb, _ = known_slice()
    names = [f"TCGA_XY_{n}.png" for n in (1, 2, 3)]
    result = post(client, [(name, png_bytes(rgb)) for name in names], tta="none").json()
    files = downloads(result)
    assert list(files) == ["TCGA_XY_1_pred.png", "TCGA_XY_2_pred.png", "TCGA_XY_3_pred.png", "overlay.png"]
    archive = result["archive"]
    assert archive["name"] == f"{result['case']}.zip" and archive["url"].startswith("data:application/zip;base64,")
    with zipfile.ZipFile(io.BytesIO(decode(archive["url"]))) as bundle:
        assert {name: bundle.read(name) for name in bundle.namelist()} == files
    single = post(client, [("one.png", png_bytes(rgb))], tta="none").json()
    assert len(single["downloads"]) == 2 and single["archive"]["name"] == "one.zip"


def test_post_processing_is_named_as_applied_to_a_single_slice_or_a_stack(
        known_network: None, tmp_path: Path) -> None:
    """With the shipped model's settings a lone slice keeps its largest component: no stack is involved."""
    checkpoint = flair_model(tmp_path / "model")
    sidecar = checkpoint.parent / MODEL_SIDECAR
    sidecar.write_text(json.dumps({**json.loads(sidecar.read_text()),
                                   "postprocessing": {"keep_largest": True, "stack_slices": True}}))
    shipped_like = TestClient(create_app(Segmenter(checkpoint, max_upload_mb=2)))
    rgb, _ = known_slice()
    single = post(shipped_like, [("TCGA_XY_7.png", png_bytes(rgb))], tta="none").json()
    assert single["settings"]["postprocessing"] == "largest component kept"
    stack = post(shipped_like, [(f"TCGA_XY_{n}.png", png_bytes(rgb)) for n in (1, 2)], tta="none").json()
    assert stack["settings"]["postprocessing"] == "largest component kept (a patient's numbered slices as one stack)"
