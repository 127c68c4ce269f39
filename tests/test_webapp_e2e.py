"""``brainseg serve`` in a real browser: headless Chromium uploads inputs with known results and reads the page.

Covered: a slice with a known mask (overlay, coverage), a zipped DICOM study (slice slider, tumour volume in mL,
downloadable mask), a corrupt file (error naming it, then a good upload in the same page), and the shipped LGG model on
a real patient it was not trained on (needs ../shared/data).
Needs Debian's ``chromium`` (``apt-get install chromium``) and Python Playwright (``pip install playwright``; never
``playwright install``: the system browser is used). Skips with the reason when either is missing.
Set ``BRAINSEG_WEBAPP_SCREENSHOT=PATH`` to keep the shipped model's screenshot (docs/webapp.png is made this way).
"""

from __future__ import annotations

import base64
import io
import os
import shutil
import socket
import threading
import time
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

pytest.importorskip("fastapi", reason="the web app needs fastapi, uvicorn and python-multipart")
uvicorn = pytest.importorskip("uvicorn", reason="the web app needs uvicorn")
sync_api = pytest.importorskip("playwright.sync_api", reason="the browser test needs Python Playwright (pip install playwright)")
from test_webapp import SLICE_SHAPE, FlairAbove, flair_model, known_slice, png_bytes  # noqa: E402

from brainseg_monai.networks import NETWORKS  # noqa: E402
from brainseg_monai.synth import make_dataset  # noqa: E402
from brainseg_monai.webapp import Segmenter, create_app  # noqa: E402
from conftest import REPO_ROOT, shared_path  # noqa: E402

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
READY = '#view[data-ready="1"]'
#: Slices of the synthetic DICOM study; small so the browser round trip stays quick.
STUDY_SIZE = (48, 48, 8)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def serving(segmenter: Segmenter) -> Iterator[str]:
    """The app on a free localhost port, served by uvicorn in a thread of this process; yields its address."""
    port = _free_port()
    instance = uvicorn.Server(uvicorn.Config(create_app(segmenter), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=instance.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not instance.started:
        if time.monotonic() > deadline or not thread.is_alive():
            pytest.fail("the web app did not start within 30 s")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        instance.should_exit = True
        thread.join(timeout=10)


@pytest.fixture()
def server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """The app with the stand-in FLAIR model (known masks)."""
    monkeypatch.setitem(NETWORKS, "flairabove", FlairAbove)
    with serving(Segmenter(flair_model(tmp_path / "model"), max_upload_mb=8)) as address:
        yield address


@contextmanager
def browser_page(server: str) -> Iterator[sync_api.Page]:
    """The app's page open in headless Chromium (skips when the browser is not installed)."""
    if not Path(CHROMIUM).is_file():
        pytest.skip(f"no browser at {CHROMIUM} (apt-get install chromium)")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            page.goto(server)
            yield page
        finally:
            browser.close()


def stat_row(page: sync_api.Page, name: str) -> str:
    """The value cell of the result table's row ``name``."""
    return page.evaluate(
        """(name) => Array.from(document.getElementById('stats').rows)
                         .find(r => r.cells[0].textContent === name).cells[1].textContent""", name)


def read_series(folder: Path) -> sitk.Image:
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
    return reader.Execute()


def expected_flair_mask(flair: np.ndarray) -> np.ndarray:
    """What `FlairAbove` (gain 1, offset 1, threshold 0.5) predicts on an (x, y, z) FLAIR volume, found independently:
    each axial slice z-scored over its nonzero voxels, tumour where the z-score exceeds 1."""
    mask = np.zeros(flair.shape, dtype=bool)
    for z in range(flair.shape[-1]):
        plane = flair[..., z].astype(np.float64)
        inside = plane != 0
        score = (plane - plane[inside].mean()) / plane[inside].std()
        mask[..., z] = inside & (score > 1.0)
    return mask


def test_browser_upload_shows_overlay_and_known_coverage(server: str, tmp_path: Path) -> None:
    rgb, mask = known_slice()
    (tmp_path / "slice.png").write_bytes(png_bytes(rgb))
    (tmp_path / "slice_mask.png").write_bytes(png_bytes(mask))
    with browser_page(server) as page:
        assert "not a medical device" in page.inner_text("#notice")
        page.set_input_files("#files", [str(tmp_path / "slice.png"), str(tmp_path / "slice_mask.png")])
        page.wait_for_selector(READY, timeout=60_000)
        assert page.inner_text("#error") == ""
        coverage = float(page.get_attribute("#coverage", "data-value"))
        assert coverage == pytest.approx(100.0 * (mask > 0).sum() / mask.size, abs=0.01)
        assert "Dice" in page.inner_text("#stats")
        # The page opens on brainseg infer's TTA, the one every figure of the shipped model describes.
        assert page.input_value("#tta") == "dihedral" and stat_row(page, "TTA / threshold") == "dihedral / 0.5"
        # The canvas shows red where the known tumour is: sample its centre pixel in the page.
        red = page.evaluate(
            """([row, col, rows]) => { const c = document.getElementById('view');
                 const s = c.height / rows; const p = c.getContext('2d').getImageData(col * s, row * s, 1, 1).data;
                 return [p[0], p[1], p[2]]; }""",
            [26, 35, SLICE_SHAPE[0]])
        assert red[0] > red[1] + 50, f"no red overlay at the tumour: {red}"
        page.screenshot(path=str(tmp_path / "webapp.png"), full_page=True)
        assert (tmp_path / "webapp.png").stat().st_size > 10_000


@pytest.mark.realdata
def test_browser_shipped_model_on_an_lgg_patient(tmp_path: Path) -> None:
    """The shipped model in the page on a shared LGG patient (the shipped model saw all 56; the cross-validation
    model that never saw this one scores 0.80), its slices and masks dropped together as a patient folder; the
    README's picture is this page."""
    patient = shared_path("lgg", "kaggle_3m", "TCGA_HT_7616_19940813")
    files = sorted(str(p) for p in patient.glob("*.tif"))
    with serving(Segmenter(REPO_ROOT / "bundle" / "models" / "model.pt")) as address, browser_page(address) as page:
        page.set_input_files("#files", files)
        page.wait_for_selector(READY, timeout=300_000)
        assert page.inner_text("#error") == ""
        assert stat_row(page, "Slices with tumour").endswith("of 30")
        assert float(stat_row(page, "Dice")) >= 0.6  # well above chance, below what the model measures here
        assert "pixels (no pixel size in this file)" in stat_row(page, "Tumour area")
        # the shipped model's defaults from its model.json, said on the page
        assert stat_row(page, "Post-processing") == "largest component kept (a patient's numbered slices as one stack)"
        # how sure the model is: the case score, the flag from the model's review threshold, and the map on request
        assert 0.0 < float(stat_row(page, "Uncertainty").split()[0]) < 1.0
        assert stat_row(page, "Uncertainty").endswith("(1 - expected Dice)")  # the score's name, as the model scores
        assert stat_row(page, "Review") in ("no", "yes: the model is less sure of this mask than usual, check it")
        plain = page.evaluate("() => document.getElementById('view').toDataURL()")
        page.check("#showunc")
        assert page.evaluate("() => document.getElementById('view').toDataURL()") != plain, "the yellow map is drawn"
        page.uncheck("#showunc")
        shot = tmp_path / "webapp.png"
        page.screenshot(path=str(shot), full_page=True)
        if os.environ.get("BRAINSEG_WEBAPP_SCREENSHOT"):
            shutil.copyfile(shot, os.environ["BRAINSEG_WEBAPP_SCREENSHOT"])


def test_browser_zipped_dicom_study_shows_slider_and_known_volume(server: str, tmp_path: Path) -> None:
    root = make_dataset(tmp_path / "dicom", "dicom", cases=1, seed=9, size=STUDY_SIZE)
    study = root / "SYN_0001"
    archive = tmp_path / "SYN_0001.zip"
    with zipfile.ZipFile(archive, "w") as bundle:
        for path in sorted(study.rglob("*")):
            if path.is_file():
                bundle.write(path, path.relative_to(root))
    flair_image = read_series(study / "FLAIR")
    flair = sitk.GetArrayFromImage(flair_image).transpose(2, 1, 0)  # (x, y, z)
    expected = expected_flair_mask(flair)
    per_slice = expected.sum(axis=(0, 1))
    assert expected.any() and np.count_nonzero(per_slice == per_slice.max()) == 1, "the phantom needs one busiest slice"
    voxel_ml = float(np.prod(flair_image.GetSpacing())) / 1000.0
    truth = sitk.GetArrayFromImage(sitk.ReadImage(str(study / "SYN_0001_seg.nii.gz"))).transpose(2, 1, 0) > 0
    dice = 2.0 * np.logical_and(expected, truth).sum() / (expected.sum() + truth.sum())

    with browser_page(server) as page:
        page.set_input_files("#files", str(archive))
        page.wait_for_selector(READY, timeout=60_000)
        assert page.inner_text("#error") == ""
        assert page.inner_text("#case-id") == "SYN_0001"
        slider = page.locator("#slice")
        assert slider.is_visible(), "a volume must show its slice slider"
        assert int(slider.get_attribute("max")) == STUDY_SIZE[2] - 1
        start = int(slider.input_value())
        assert start == int(np.argmax(per_slice)), "the slider should open on the slice with the most tumour"
        assert page.inner_text("#slicename") == f"z = {start} ({per_slice[start]} tumour pixels)"
        shown_ml = float(stat_row(page, "Tumour volume").removesuffix(" mL"))
        assert shown_ml == pytest.approx(expected.sum() * voxel_ml, abs=0.02)
        assert float(stat_row(page, "Dice")) == pytest.approx(dice, abs=0.002), "the study's _seg.nii.gz is its truth"
        # The mask offered for download is the expected one, in the series' geometry.
        href = page.get_attribute('#downloads a[download="mask.nii.gz"]', "href")
        (tmp_path / "mask.nii.gz").write_bytes(base64.b64decode(href.split(",", 1)[1]))
        downloaded = sitk.ReadImage(str(tmp_path / "mask.nii.gz"))
        assert downloaded.GetSpacing() == pytest.approx(flair_image.GetSpacing())
        got = sitk.GetArrayFromImage(downloaded).transpose(2, 1, 0) > 0
        assert np.count_nonzero(got != expected) <= 0.001 * got.size
        # Moving the slider redraws the chosen slice without a new request.
        slider.fill("0")
        assert page.inner_text("#slicename") == f"z = 0 ({per_slice[0]} tumour pixels)"


def test_browser_corrupt_file_is_named_then_good_upload_works(server: str, tmp_path: Path) -> None:
    corrupt = tmp_path / "scan_0042.png"
    corrupt.write_bytes(np.random.default_rng(3).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    rgb, mask = known_slice()
    (tmp_path / "good.png").write_bytes(png_bytes(rgb))
    with browser_page(server) as page:
        page.set_input_files("#files", str(corrupt))
        page.wait_for_function("document.getElementById('error').textContent !== ''", timeout=60_000)
        error = page.inner_text("#error")
        assert error.startswith("scan_0042.png:") and "cannot read" in error, error
        assert "brainseg-serve" not in error, "the request's temporary folder leaked into the message"
        assert not page.locator("#result").is_visible()
        page.set_input_files("#files", str(tmp_path / "good.png"))
        page.wait_for_selector(READY, timeout=60_000)
        assert page.inner_text("#error") == ""
        assert page.inner_text("#case-id") == "good"
        coverage = float(page.get_attribute("#coverage", "data-value"))
        assert coverage == pytest.approx(100.0 * (mask > 0).sum() / mask.size, abs=0.01)


def test_browser_failed_upload_clears_the_previous_result(server: str, tmp_path: Path) -> None:
    """A patient's slices, then an upload that never reaches the server: the error stands alone, with none of the
    previous case's image, figures or downloads left under it. The icon is served, the downloads come as one zip."""
    rgb, _ = known_slice()
    files = []
    for n in (1, 2, 3, 4):
        files.append(tmp_path / f"TCGA_XY_{n}.png")
        files[-1].write_bytes(png_bytes(rgb))
    with browser_page(server) as page:
        failed = []
        page.on("response", lambda response: failed.append(response.url) if response.status >= 400 else None)
        page.reload()  # with the listener: the page, its icon and /api/info
        page.set_input_files("#files", [str(f) for f in files])
        page.wait_for_selector(READY, timeout=60_000)
        archive = page.locator("#downloads li.archive a")
        assert archive.get_attribute("download") == "TCGA_XY.zip" and archive.inner_text().startswith("all 10 files")
        assert page.locator("#downloads details a").count() == 10  # the files one by one, folded away
        with zipfile.ZipFile(io.BytesIO(base64.b64decode(archive.get_attribute("href").split(",", 1)[1]))) as bundle:
            assert sorted(bundle.namelist()) == sorted([f"TCGA_XY_{n}_{kind}.png" for n in (1, 2, 3, 4)
                                                        for kind in ("pred", "unc")] + ["overlay.png", "uncertainty.png"])
        assert failed == [], f"requests that failed: {failed}"
        page.evaluate("fetch('/favicon.ico').then(r => { document.body.dataset.icon = r.status + ' ' + "
                      "r.headers.get('content-type'); })")
        page.wait_for_function("document.body.dataset.icon !== undefined")
        assert page.evaluate("document.body.dataset.icon").startswith("200 image/svg+xml")

        page.route("**/api/segment", lambda route: route.abort())  # the upload fails on its way
        page.set_input_files("#files", str(files[0]))
        page.wait_for_function("document.getElementById('error').textContent !== ''", timeout=60_000)
        assert not page.locator("#result").is_visible()
        assert page.inner_html("#downloads") == "" and page.inner_html("#stats") == ""
        assert page.locator(READY).count() == 0


def test_browser_flair_only_dicom_study_lists_its_series_and_is_segmented(server: str, tmp_path: Path) -> None:
    """A study holding only a FLAIR series, as real archives often do: the model's t1 and t1c are filled from FLAIR
    (as the shipped model was trained), and the page says so beside the series it found."""
    root = make_dataset(tmp_path / "dicom", "dicom", cases=1, seed=9, size=STUDY_SIZE)
    study = root / "SYN_0001"
    for series in ("T1_PRE", "T1_POST"):
        shutil.rmtree(study / series)
    archive = tmp_path / "FLAIR only study.zip"
    with zipfile.ZipFile(archive, "w") as bundle:
        for path in sorted(study.rglob("*")):
            if path.is_file():
                bundle.write(path, path.relative_to(root))
    flair_image = read_series(study / "FLAIR")
    expected = expected_flair_mask(sitk.GetArrayFromImage(flair_image).transpose(2, 1, 0))
    voxel_ml = float(np.prod(flair_image.GetSpacing())) / 1000.0

    with browser_page(server) as page:
        page.set_input_files("#files", str(archive))
        page.wait_for_selector(READY, timeout=60_000)
        assert page.inner_text("#error") == ""
        assert page.locator("#inputs").is_visible()
        row = page.locator('#inputlist tr[data-series="AX FLAIR"]')
        assert row.locator("td").nth(5).inner_text() == "t1, flair, t1c"
        assert row.locator("td").nth(4).inner_text().startswith("flair (inversion recovery")
        assert page.locator("#inputlist tbody tr").count() == 1
        shown = {c: page.eval_on_selector(f"#role-{c}", "s => s.options[s.selectedIndex].text")
                 for c in ("t1", "flair", "t1c")}
        assert shown == {"t1": "automatic: filled from flair", "flair": "automatic: AX FLAIR",
                         "t1c": "automatic: filled from flair"}
        options = page.eval_on_selector("#role-t1c", "s => Array.from(s.options).map(o => o.text)")
        assert options == ["automatic: filled from flair", "AX FLAIR", "fill from flair"]
        shown_ml = float(stat_row(page, "Tumour volume").removesuffix(" mL"))
        assert shown_ml == pytest.approx(expected.sum() * voxel_ml, abs=0.02)
        page.screenshot(path=str(tmp_path / "flair_only.png"), full_page=True)
        if os.environ.get("BRAINSEG_WEBAPP_ROLES_SCREENSHOT"):
            shutil.copyfile(tmp_path / "flair_only.png", os.environ["BRAINSEG_WEBAPP_ROLES_SCREENSHOT"])


def test_browser_grey_image_is_segmented_once_the_user_says_it_is_flair(server: str, tmp_path: Path) -> None:
    rgb, mask = known_slice()
    grey = tmp_path / "scan 7.png"
    grey.write_bytes(png_bytes(rgb[..., 1]))  # the FLAIR channel alone, named nothing that says so
    with browser_page(server) as page:
        page.set_input_files("#files", str(grey))
        page.wait_for_function("document.getElementById('error').textContent !== ''", timeout=60_000)
        assert page.inner_text("#error").startswith("scan 7.png: has 1 channel but the model takes 3")
        assert page.locator("#role-image").is_visible() and not page.locator("#result").is_visible()
        disabled = page.eval_on_selector("#role-image",
                                         "s => Array.from(s.options).filter(o => o.disabled).map(o => o.value)")
        assert disabled == ["t1", "t1c"]
        page.select_option("#role-image", "flair")
        page.wait_for_selector(READY, timeout=60_000)
        assert page.inner_text("#error") == ""
        coverage = float(page.get_attribute("#coverage", "data-value"))
        assert coverage == pytest.approx(100.0 * (mask > 0).sum() / mask.size, abs=0.01)
        assert page.input_value("#role-image") == "flair"
