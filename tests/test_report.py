"""The evaluation report builds with every section on a tiny run (phantom predictions, fake TensorBoard events, a
tuned model.json); every file it references exists and is a valid PNG; absent inputs are said in one line."""

from __future__ import annotations

import json
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import tifffile
from PIL import Image
from torch.utils.tensorboard import SummaryWriter

from brainseg_monai.datalist import build_datalist, write_datalist
from brainseg_monai.evaluation import aggregate_folds, evaluate_predictions
from brainseg_monai.inference.writers import write_png_mask
from brainseg_monai.report import (
    TRAINING_TAGS,
    plot_threshold_curve,
    read_training_scalars,
    write_folds_report,
    write_report,
)
from brainseg_monai.synth import make_dataset

SECTIONS = ("Overview", "Summary", "Per-patient Dice distribution", "Dice versus tumour size",
            "Pooled confusion matrix", "Per patient", "Tumour-free images: false positives",
            "Detection: tumour present or absent", "Dice and recall by tumour size (images)", "Missing predictions",
            "Worst cases", "Training curves", "Threshold tuning", "Settings")
LOSSES = [1.0, 0.7, 0.5, 0.4, 0.35, 0.3]


class _References(HTMLParser):
    """Every src and href of an HTML page."""

    def __init__(self) -> None:
        super().__init__()
        self.found: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.found += [value for name, value in attrs if name in ("src", "href") and value]


def references(page: Path) -> list[str]:
    parser = _References()
    parser.feed(page.read_text(encoding="utf-8"))
    return parser.found


def assert_valid_png(path: Path) -> tuple[int, int]:
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", path
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        assert image.format == "PNG"
        return image.size


@pytest.fixture(scope="module")
def lgg_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Phantom LGG truth, predictions (shifted masks, one missing), a training folder with events and a tuned model."""
    tmp = tmp_path_factory.mktemp("report")
    root = make_dataset(tmp / "lgg", "lgg", cases=3, seed=3, size=(32, 32, 6))
    pred = tmp / "pred"
    for index, folder in enumerate(sorted(p for p in root.iterdir() if p.is_dir())):
        for mask in sorted(folder.glob("*_mask.tif")):
            rows = np.roll(tifffile.imread(mask) > 0, index, axis=1)  # patient 0 perfect, 1 and 2 shifted
            write_png_mask(rows.T.astype(np.uint8), pred / folder.name / mask.name.replace("_mask.tif", "_pred.png"))
    (pred / "SYN_0002" / "SYN_0002_1_pred.png").unlink()  # a tumour-free slice without prediction

    run = tmp / "run"
    loss_writer = SummaryWriter(str(run))  # the bundle writes loss and the other scalars from separate writers
    for step, loss in enumerate(LOSSES, start=1):
        loss_writer.add_scalar("train_loss", loss, step)
    loss_writer.close()
    epoch_writer = SummaryWriter(str(run))
    for epoch in (1, 2, 3):
        epoch_writer.add_scalar("val_dice", 0.25 * epoch, epoch)
        epoch_writer.add_scalar("val_mean_dice", 0.2 * epoch, epoch)
        epoch_writer.add_scalar("val_mean_iou", 0.15 * epoch, epoch)
        epoch_writer.add_scalar("learning_rate", 1e-3 / epoch, epoch)
    epoch_writer.close()
    (run / "models").mkdir()
    (run / "models" / "model.json").write_text(json.dumps({
        "network_name": "unet", "postprocessing": {"threshold": 0.3},
        "tuning": {"threshold": 0.3, "threshold_curve": [[0.1, 0.5], [0.3, 0.8], [0.5, 0.7]], "dice": 0.8,
                   "previous_threshold": 0.5, "previous_dice": 0.7, "patients": 3, "tta": "none"},
    }))  # fmt: skip
    result = evaluate_predictions(pred, root, "lgg", allow_missing=True)
    return {"root": root, "pred": pred, "run": run, "result": result}


def test_report_has_every_section_and_only_valid_references(lgg_run: dict, tmp_path: Path) -> None:
    result = lgg_run["result"]
    files = write_report(result, tmp_path / "report", train_dir=lgg_run["run"], n_worst=2)
    for key in ("metrics", "markdown", "html", "dice_distribution", "dice_vs_size", "confusion", "worst_1", "worst_2",
                "training_curves", "threshold_curve"):
        assert files[key].is_file(), key
    page = files["html"].read_text(encoding="utf-8")
    markdown = files["markdown"].read_text(encoding="utf-8")
    for title in SECTIONS:
        assert f"<h2>{title}</h2>" in page and f"## {title}\n" in markdown
    assert "Not available" not in page and "Not available" not in markdown

    referenced = references(files["html"])
    pngs = sorted(p.name for p in (tmp_path / "report").glob("*.png"))
    assert sorted(referenced) == pngs  # every reference exists and every plot is shown
    for name in referenced:
        assert_valid_png(tmp_path / "report" / name)
    assert sorted(name for name in pngs if f"]({name})" in markdown) == pngs

    # the numbers shown are those of metrics.json
    stored = json.loads(files["metrics"].read_text())
    assert [p["dice"] for p in stored["per_patient"]] == [p["dice"] for p in result["per_patient"]]
    for patient in result["per_patient"]:
        assert f"<td>{patient['patient']}</td>" in page and f"<td>{patient['dice']:.4f}</td>" in page
    assert "SYN_0002_1.tif" in page and "1 truth item has no prediction" in page
    # what a missing prediction counted as, what a patient is and what distances are in are said
    overview = markdown.split("## Overview\n")[1].split("\n## ")[0]
    assert "Missing predictions: 1 (allowed with --allow-missing: each is scored as an empty prediction" in overview
    assert "a tumour-free one scores as perfect" in overview
    assert "A patient here is an LGG patient folder: its numbered slices <patient>_<n> of one size are stacked" \
        in overview
    assert "Distances in pixels: images at (x, y) = (1, 1); stacked slices at (x, y, z) = (1, 1, 1)" in markdown

    # worst cases: the two lowest Dice, truth outlined in green and the prediction in red
    worst = sorted(result["per_patient"], key=lambda p: p["dice"])[:2]
    expected = [f"worst_{k}_{p['patient']}.png" for k, p in enumerate(worst, 1)]
    assert [files[f"worst_{k}"].name for k in (1, 2)] == expected
    rgb = np.asarray(Image.open(files["worst_1"]).convert("RGB")).astype(int)
    assert rgb.shape == (32, 32, 3)
    assert np.any((rgb[..., 1] == 255) & (rgb[..., 0] == 0) & (rgb[..., 2] == 0))  # truth outline
    assert np.any(rgb[..., 0] - rgb[..., 1] > 60)  # prediction fill


def test_training_curves_show_val_dice_the_key_metric(lgg_run: dict, tmp_path: Path) -> None:
    """val_dice picks model.pt and drives the schedule: it is plotted, and said when a run lacks it."""
    files = write_report(lgg_run["result"], tmp_path / "report", train_dir=lgg_run["run"], n_worst=0)
    curves = files["markdown"].read_text(encoding="utf-8").split("## Training curves\n")[1].split("\n## ")[0]
    assert "training_curves.png" in curves and "Not in the event files" not in curves
    assert "val_dice" in TRAINING_TAGS and TRAINING_TAGS.index("val_dice") == 1
    run = tmp_path / "no_val_dice"
    writer = SummaryWriter(str(run))
    writer.add_scalar("train_loss", 0.5, 1)
    writer.close()
    files = write_report(lgg_run["result"], tmp_path / "report2", train_dir=run, n_worst=0)
    curves = files["markdown"].read_text(encoding="utf-8").split("## Training curves\n")[1].split("\n## ")[0]
    assert "Not in the event files: val_dice, val_mean_dice, val_mean_iou, learning_rate." in curves


def test_training_scalars_are_read_from_every_event_file(lgg_run: dict) -> None:
    scalars = read_training_scalars(lgg_run["run"])
    assert [step for step, _ in scalars["train_loss"]] == list(range(1, 7))
    np.testing.assert_allclose([v for _, v in scalars["train_loss"]], LOSSES, rtol=1e-6)
    np.testing.assert_allclose([v for _, v in scalars["learning_rate"]], [1e-3, 5e-4, 1e-3 / 3], rtol=1e-6)
    assert [step for step, _ in scalars["val_mean_dice"]] == [1, 2, 3]


def test_absent_inputs_are_said_in_one_line(lgg_run: dict, tmp_path: Path) -> None:
    empty_run = tmp_path / "empty_run"
    empty_run.mkdir()
    files = write_report(lgg_run["result"], tmp_path / "report", train_dir=empty_run, n_worst=0)
    markdown = files["markdown"].read_text(encoding="utf-8")
    for title in SECTIONS:
        assert f"## {title}\n" in markdown
    for title, line in (("Worst cases", "n_worst is 0"), ("Training curves", "no train_loss, val_dice, val_mean_dice"),
                        ("Threshold tuning", "no tuned threshold found")):
        body = markdown.split(f"## {title}\n")[1].split("\n## ")[0].strip()
        assert body.startswith("*Not available") and line in body and body.count("\n") == 0
    assert not any(key.startswith(("worst", "training", "threshold")) for key in files)
    referenced = references(files["html"])
    assert sorted(referenced) == ["confusion_matrix.png", "dice_distribution.png", "dice_vs_size.png"]
    assert all((tmp_path / "report" / name).is_file() for name in referenced)

    files = write_report(lgg_run["result"], tmp_path / "bare")
    assert "no training folder given" in files["markdown"].read_text(encoding="utf-8")


def test_volume_report_overlays_the_slice_with_most_truth(tmp_path: Path) -> None:
    root = make_dataset(tmp_path / "nifti", "nifti", cases=2, seed=5, size=(32, 32, 8))
    for case in sorted(p for p in root.iterdir() if p.is_dir()):
        truth = sitk.ReadImage(str(case / f"{case.name}_seg.nii.gz"))
        predicted = sitk.GetImageFromArray(np.roll(sitk.GetArrayFromImage(truth), 2, axis=2))
        predicted.CopyInformation(truth)
        (tmp_path / "pred" / case.name).mkdir(parents=True)
        sitk.WriteImage(predicted, str(tmp_path / "pred" / case.name / "mask.nii.gz"))
    result = evaluate_predictions(tmp_path / "pred", root, "nifti")
    files = write_report(result, tmp_path / "report", n_worst=2)
    assert assert_valid_png(files["worst_1"]) == (32, 32)
    page = files["html"].read_text(encoding="utf-8")
    worst = min(result["per_patient"], key=lambda p: p["dice"])
    records = [r for r in result["per_image"] if r["patient"] == worst["patient"]]
    shown = max(records, key=lambda r: (r["truth_size"], r["pred_size"]))
    assert f"{worst['patient']}_flair.nii.gz, slice {shown['slice']}: truth {shown['truth_size']} px" in page
    assert all((tmp_path / "report" / name).is_file() for name in references(files["html"]))


def test_folds_report(lgg_run: dict, tmp_path: Path) -> None:
    datalist = write_datalist(build_datalist("lgg", lgg_run["root"], folds=3, seed=0), tmp_path / "folds.json")
    metrics = []
    for k in range(3):
        result = evaluate_predictions(lgg_run["pred"], datalist, fold=k, allow_missing=True)
        metrics.append(write_report(result, tmp_path / f"fold{k}", n_worst=0)["metrics"])
    aggregate = aggregate_folds(metrics[::-1])  # numbered by each report's fold, not by the order given
    assert [(f["fold"], f["path"]) for f in aggregate["folds"]] == [(k, str(m)) for k, m in enumerate(metrics)]
    assert aggregate["pooled"]["patients"] == 3
    summary = lgg_run["result"]["summary"]
    assert aggregate["pooled"]["patient_dice"]["mean"] == pytest.approx(summary["patient_dice_mean"])
    assert aggregate["pooled"]["global_dice"] == pytest.approx(summary["global_dice"])
    files = write_folds_report(aggregate, tmp_path / "folds")
    referenced = references(files["html"])
    assert referenced == ["folds_dice.png"]
    assert_valid_png(tmp_path / "folds" / "folds_dice.png")
    assert "patient_dice_mean" in files["markdown"].read_text(encoding="utf-8")
    assert "Distances (HD95, ASD) in pixel in every fold" in files["markdown"].read_text(encoding="utf-8")


def test_threshold_curve_plot_marks_the_chosen_threshold(tmp_path: Path) -> None:
    curve = [[0.1, 0.5], [0.3, 0.8], [0.5, 0.7]]
    plot = plot_threshold_curve(curve, 0.3, tmp_path / "plots" / "curve.png", previous=0.5)
    assert plot == tmp_path / "plots" / "curve.png" and [p.name for p in plot.parent.iterdir()] == ["curve.png"]
    with Image.open(plot) as png:
        assert png.format == "PNG" and png.size[0] > 300
    with pytest.raises(ValueError, match="curve must be"):
        plot_threshold_curve([], 0.5, tmp_path / "x.png")
