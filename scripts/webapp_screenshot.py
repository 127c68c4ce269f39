"""Make the README's picture of the web app: the shipped LGG model on a patient it never saw in training.

    python scripts/webapp_screenshot.py --out docs/webapp.png
    python scripts/webapp_screenshot.py --patient TCGA_HT_7884_19980913 --out shot.png

The patient's slices and their ``*_mask.tif`` truth are uploaded together, as a user would drop a patient folder;
the page opens at the slice with the most tumour and shows Dice against the truth. The default patient is from
fold 0, which the shipped model was not trained on (``bundle/configs/metadata.json``, ``heldout_patients``).
Needs ``../shared/data``, Debian's ``chromium`` and Python Playwright (never ``playwright install``), as the
browser tests do.
"""

from __future__ import annotations

import argparse
import socket
import sys
import threading
import time
from pathlib import Path

import uvicorn
from playwright.sync_api import sync_playwright

from brainseg_monai.webapp import Segmenter, create_app

REPO = Path(__file__).resolve().parents[1]
LGG = REPO.parent / "shared" / "data" / "lgg" / "kaggle_3m"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def screenshot(patient_dir: Path, checkpoint: Path, out: Path) -> None:
    """Serve the app with ``checkpoint``, upload the patient's slices and masks, and save the page as ``out``."""
    files = sorted(str(p) for p in patient_dir.glob("*.tif"))
    if not files:
        raise FileNotFoundError(f"{patient_dir}: no .tif slices there (see ../shared/data/DATA.md)")
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(Segmenter(checkpoint)), host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError("the web app did not start")
        time.sleep(0.05)
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1100, "height": 860})
            page.goto(f"http://127.0.0.1:{port}")
            page.set_input_files("#files", files)
            page.wait_for_selector('#view[data-ready="1"]', timeout=300_000)
            error = page.inner_text("#error")
            if error:
                raise RuntimeError(f"the page reported an error: {error}")
            out.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(out), full_page=True)
            browser.close()
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patient", default="TCGA_CS_6669_20020102",
                        help="an LGG patient folder name (default: a fold-0 patient near the median Dice)")
    parser.add_argument("--checkpoint", default=str(REPO / "bundle" / "models" / "model.pt"))
    parser.add_argument("--out", default=str(REPO / "docs" / "webapp.png"))
    args = parser.parse_args(argv)
    screenshot(LGG / args.patient, Path(args.checkpoint), Path(args.out))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
