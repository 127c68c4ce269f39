"""``brainseg serve``: request handling through FastAPI's test client, on slices, volumes and DICOM with known masks."""

from __future__ import annotations

import base64
import io
import json
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

from brainseg_monai.inference.predictor import MODEL_SIDECAR, ModelSpec  # noqa: E402
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


def flair_model(folder: Path, gain: float = 1.0, offset: float = 1.0) -> Path:
    """A checkpoint of `FlairAbove` (registered as ``flairabove`` by the `known_network` fixture)."""
    folder.mkdir(parents=True, exist_ok=True)
    spec = ModelSpec(network_name="flairabove", spatial_dims=2, in_channels=3, roi_size=[256, 256])
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


def test_page_says_research_tool_and_info_lists_model(client: TestClient) -> None:
    page = client.get("/")
    assert page.status_code == 200 and "not a medical device" in page.text
    info = client.get("/api/info").json()
    assert info["channels"] == ["t1", "flair", "t1c"] and info["threshold"] == 0.5
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
    assert set(files) == {"case7_pred.png", "overlay.png"}
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
        "p_1_pred.png", "p_2_pred.png", "p_2.tif_pred.png", "p_10_pred.png", "overlay.png"]  # the runner's names


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
    grey = post(client, [("grey.png", png_bytes(known_slice()[0][..., 1]))])
    assert grey.status_code == 422
    assert "has 1 channel(s) but the model takes 3 (t1, flair, t1c)" in grey.json()["error"]


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
