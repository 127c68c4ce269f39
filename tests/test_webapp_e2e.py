"""``brainseg serve`` in a real browser: headless Chromium uploads a slice with a known mask and reads the coverage.

Needs Debian's ``chromium`` (``apt-get install chromium``) and Python Playwright (``pip install playwright``; never
``playwright install``: the system browser is used). Skips with the reason when either is missing.
Set ``BRAINSEG_WEBAPP_SCREENSHOT=PATH`` to keep the screenshot (docs/webapp.png is made this way).
"""

from __future__ import annotations

import os
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="the web app needs fastapi, uvicorn and python-multipart")
uvicorn = pytest.importorskip("uvicorn", reason="the web app needs uvicorn")
sync_api = pytest.importorskip("playwright.sync_api", reason="the browser test needs Python Playwright (pip install playwright)")
from test_webapp import SLICE_SHAPE, FlairAbove, flair_model, known_slice, png_bytes  # noqa: E402

from brainseg_monai.networks import NETWORKS  # noqa: E402
from brainseg_monai.webapp import Segmenter, create_app  # noqa: E402

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture()
def server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """The app on a free localhost port, served by uvicorn in a thread of this process."""
    monkeypatch.setitem(NETWORKS, "flairabove", FlairAbove)
    app = create_app(Segmenter(flair_model(tmp_path / "model"), max_upload_mb=8))
    port = _free_port()
    instance = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=instance.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not instance.started:
        if time.monotonic() > deadline or not thread.is_alive():
            pytest.fail("the web app did not start within 30 s")
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    instance.should_exit = True
    thread.join(timeout=10)


def test_browser_upload_shows_overlay_and_known_coverage(server: str, tmp_path: Path) -> None:
    if not Path(CHROMIUM).is_file():
        pytest.skip(f"no browser at {CHROMIUM} (apt-get install chromium)")
    rgb, mask = known_slice()
    (tmp_path / "slice.png").write_bytes(png_bytes(rgb))
    (tmp_path / "slice_mask.png").write_bytes(png_bytes(mask))
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            page.goto(server)
            assert "not a medical device" in page.inner_text("#notice")
            page.set_input_files("#files", [str(tmp_path / "slice.png"), str(tmp_path / "slice_mask.png")])
            page.wait_for_selector('#view[data-ready="1"]', timeout=60_000)
            assert page.inner_text("#error") == ""
            coverage = float(page.get_attribute("#coverage", "data-value"))
            assert coverage == pytest.approx(100.0 * (mask > 0).sum() / mask.size, abs=0.01)
            assert "Dice" in page.inner_text("#stats")
            # The canvas shows red where the known tumour is: sample its centre pixel in the page.
            red = page.evaluate(
                """([row, col, rows]) => { const c = document.getElementById('view');
                     const s = c.height / rows; const p = c.getContext('2d').getImageData(col * s, row * s, 1, 1).data;
                     return [p[0], p[1], p[2]]; }""",
                [26, 35, SLICE_SHAPE[0]])
            assert red[0] > red[1] + 50, f"no red overlay at the tumour: {red}"
            shot = tmp_path / "webapp.png"
            page.screenshot(path=str(shot), full_page=True)
            assert shot.stat().st_size > 10_000
            if os.environ.get("BRAINSEG_WEBAPP_SCREENSHOT"):
                shutil.copyfile(shot, os.environ["BRAINSEG_WEBAPP_SCREENSHOT"])
        finally:
            browser.close()
