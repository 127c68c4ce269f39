"""``brainseg`` command line: argument parsing and printing over the library functions, nothing else.

What a user reads is `DESCRIPTION`, each sub-command's help and its example (`EXAMPLES`); every option's help ends
with its default (`_HelpFormatter`).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from brainseg_monai import __version__
from brainseg_monai.errors import InputError


DESCRIPTION = """\
Find brain tumours in MRI and outline them voxel by voxel: masks in the scanner's geometry, DICOM SEG,
overlays, volumes, and scores against truth masks. A research tool, not a medical device.

first steps:
  brainseg infer SCANS --out predictions/           segment DICOM studies, volumes, slice images or LGG folders
  brainseg evaluate predictions/ --truth DATA --out report/     score the masks against truth
  brainseg serve                                    a local web page: upload a scan, see the tumour
  bash scripts/quickstart.sh                        a first result on synthetic data, end to end

Run 'brainseg COMMAND --help' for a command's options, their defaults and an example."""

#: one example per sub-command, shown under its --help
EXAMPLES = {
    "synth": "brainseg synth data/lgg --format lgg --cases 12 --seed 0",
    "datalist": "brainseg datalist data/lgg --source lgg --out data/lgg.json --val 0.2 --seed 0",
    "infer": "brainseg infer ../shared/data/lgg/kaggle_3m/TCGA_CS_4941_19960909 --out predictions/",
    "evaluate": "brainseg evaluate predictions/ --truth ../shared/data/lgg/kaggle_3m/TCGA_CS_4941_19960909 "
                "--out report/",
    "tune-threshold": "brainseg tune-threshold --checkpoint runs/lgg/models/model_final.pt "
                      "--datalist runs/lgg/datalist.json",
    "aggregate-folds": "brainseg aggregate-folds reports/fold*/metrics.json --out reports/kfold",
    "serve": "brainseg serve --port 8000        (then open http://127.0.0.1:8000)",
    "benchmark": "brainseg benchmark --quick --out benchmark.json",
    "compare": "brainseg compare scans/2021-03 scans/2022-03 --out change",
    "ensemble": "brainseg ensemble runs/cv/unet_f*/models/model_final.pt --out models/ensemble.json   "
                "(then brainseg infer SCANS --out OUT --checkpoint models/ensemble.json)",
}


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Help that keeps the line breaks of descriptions and examples, and ends each option's help with its default.

    An option whose help already gives its default in words ("default: the model's setting") is shown as written,
    a flag ends with "default: off" and a required option with "required".
    """

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if not action.option_strings or action.default is argparse.SUPPRESS or "default" in text.lower():
            return text
        if action.required:
            return f"{text} (required)"
        if action.default is None:
            return text
        if action.default is False:
            return f"{text} (default: off)"
        value = action.default
        shown = " ".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)
        return f"{text} (default: {shown.replace('%', '%%')})"


def _channels(pairs: Sequence[str] | None) -> dict[str, str] | None:
    """``["t1=T1.*PRE", "flair=FLAIR"]`` -> ordered mapping; ``None`` when no pair was given."""
    if not pairs:
        return None
    out: dict[str, str] = {}
    for pair in pairs:
        name, sep, pattern = pair.partition("=")
        if not sep or not name or not pattern:
            raise argparse.ArgumentTypeError(f"--channel expects NAME=PATTERN but got {pair!r}")
        out[name] = pattern
    return out


def _bundle(arg: str | None) -> Path:
    """``--bundle``, else ``./bundle`` when there is one, else the repository's bundle beside an editable install.

    Raises:
        InputError: when neither exists (a wheel holds the package, not the bundle and its model).
    """
    if arg:
        return Path(arg)
    here = Path("bundle")
    if (here / "configs").is_dir():
        return here
    beside = Path(__file__).resolve().parents[1] / "bundle"
    if not (beside / "configs").is_dir():
        raise InputError(None, "no bundle found: ./bundle does not exist and this installation holds none (the bundle "
                               "and its model ship with the repository, not in the wheel); pass --checkpoint or --bundle")
    return beside


def _add_model_options(p: argparse.ArgumentParser) -> None:
    """``--bundle``, ``--checkpoint`` and ``--device``: which model segments, and where (see `_checkpoint`)."""
    p.add_argument("--bundle", help="bundle folder whose models/model.pt is the default checkpoint (default: ./bundle "
                   "if present, else the repository's bundle of an editable install)")
    p.add_argument("--checkpoint", help="model checkpoint (model.pt with its model.json beside it), or an ensemble's "
                                        "model.json (brainseg ensemble; default: the bundle's models/model.pt, the "
                                        "shipped LGG model)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")


def _checkpoint(args: argparse.Namespace) -> str:
    """``--checkpoint``, else the ``models/model.pt`` of ``--bundle`` (see `_bundle`)."""
    return args.checkpoint or str(_bundle(args.bundle) / "models" / "model.pt")


def _cmd_synth(args: argparse.Namespace) -> int:
    from brainseg_monai.synth import make_dataset

    out = make_dataset(
        args.out, args.format, cases=args.cases, seed=args.seed, size=tuple(args.size) if args.size else None,
        oblique=args.oblique,
    )
    print(f"wrote {args.format} phantoms ({args.cases} cases, seed {args.seed}) to {out}")
    return 0


def _cmd_datalist(args: argparse.Namespace) -> int:
    from brainseg_monai.datalist import build_datalist, write_datalist

    dl = build_datalist(
        args.source, args.root, val=args.val, test=args.test, folds=args.folds, seed=args.seed,
        channels=_channels(args.channel), label_pattern=args.label_pattern,
    )
    write_datalist(dl, args.out)
    items = dl["training"] + dl["validation"] + dl.get("testing", [])
    patients = {it["patient"] for it in items}
    sets = {key: len(dl.get(key, [])) for key in ("training", "validation", "testing")}
    print(f"{len(items)} items from {len(patients)} patients -> {args.out} ({json.dumps(sets)})")
    for skipped in dl.get("skipped", []):
        print(f"skipped {skipped['path']}: {skipped['reason']}", file=sys.stderr)
    return 0


def _cmd_infer(args: argparse.Namespace) -> int:
    from brainseg_monai.channel_roles import SelectionRules
    from brainseg_monai.inference.outputs import SUMMARY_NAME
    from brainseg_monai.inference.runner import InferenceSettings, run_inference

    settings = InferenceSettings(
        checkpoint=_checkpoint(args), tta=args.tta, device=args.device, batch_size=args.batch_size, resume=args.resume,
        threshold=args.threshold, min_size=args.min_size, open_above=args.open_above,
        keep_largest=args.keep_largest, keep_fraction=args.keep_fraction, stack_slices=args.stack_slices,
        channels=_channels(args.channel),
        series_rules=SelectionRules.from_file(args.series_rules) if args.series_rules else None,
        progress=not args.no_progress, precision=args.precision, untrusted=args.untrusted,
    )
    try:
        rows = run_inference(args.inputs, args.out, settings)
    except KeyboardInterrupt:  # the runner removed what it was writing and released the folder
        print(f"brainseg infer: interrupted; the cases finished so far are in {args.out}: run the same command with "
              f"--resume to go on", file=sys.stderr)
        return 130
    failed = [r for r in rows if r["status"] == "failed"]
    print(f"{len(rows) - len(failed)} ok, {len(failed)} failed -> {Path(args.out) / SUMMARY_NAME}")
    for row in failed:
        print(f"failed {row['case']} ({row['source']}): {row['error']}", file=sys.stderr)
    return 1 if failed else 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from brainseg_monai.evaluation import evaluate_predictions
    from brainseg_monai.report import write_report

    result = evaluate_predictions(args.pred_dir, args.truth, args.source, args.spacing, split=args.split,
                                  fold=args.fold, allow_missing=args.allow_missing, label_maps=args.label_maps,
                                  only_predicted=args.only_predicted)
    files = write_report(result, args.out, train_dir=args.train_dir, model=args.model, n_worst=args.n_worst)
    summary = result["summary"]

    def fmt(key: str) -> str:
        value = summary.get(key)
        return "n/a" if value is None else f"{value:.4f}"

    print(f"{summary.get('patients', len(result['per_patient']))} patients: patient Dice mean {fmt('patient_dice_mean')}, "
          f"median {fmt('patient_dice_median')}; global Dice {fmt('global_dice')}; "
          f"missing predictions {summary.get('missing_predictions', 0)}")
    if summary.get("left_out_patients"):
        print(f"left out (--only-predicted): {summary['left_out_patients']} patients ({summary['left_out_items']} "
              f"truth items) without any prediction; listed under left_out in {files['metrics']}")
    print(f"report: {files['html']}")
    return 0


def _cmd_tune_threshold(args: argparse.Namespace) -> int:
    from brainseg_monai.tuning import tune_held_out_folds

    result = tune_held_out_folds(
        args.checkpoint, args.datalist, args.fold, store_in=args.store_in, dry_run=args.dry_run, tta=args.tta,
        device=args.device, batch_size=args.batch_size, thresholds=args.thresholds,
    )
    previous = "n/a" if result["previous_dice"] is None else f"{result['previous_dice']:.4f}"
    for candidate in result["postprocessing_candidates"]:
        chosen = " (chosen)" if candidate["settings"] == result["postprocessing"] else ""
        print(f"post-processing {json.dumps(candidate['settings'])}: best threshold {candidate['threshold']}, mean "
              f"patient Dice {candidate['dice']:.4f}{chosen}")
    print(f"best threshold {result['threshold']} (mean patient Dice {result['dice']:.4f} over {result['patients']} "
          f"patients); before: {json.dumps(result['previous_postprocessing'])} ({previous}); "
          f"curve: {result['curve_plot']}")
    print(f"stored in {result['sidecar']}" if result["sidecar"] else "dry run: nothing stored")
    return 0


def _cmd_aggregate_folds(args: argparse.Namespace) -> int:
    from brainseg_monai.evaluation import aggregate_folds
    from brainseg_monai.report import write_folds_report

    files = write_folds_report(aggregate_folds(args.metrics), args.out)
    print(f"report: {files['html']}")
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    from brainseg_monai.webapp import serve  # needs fastapi/uvicorn: imported only for this sub-command

    serve(_checkpoint(args), host=args.host, port=args.port, max_upload_mb=args.max_upload_mb, device=args.device)
    return 0


def _cmd_benchmark(args: argparse.Namespace) -> int:
    from brainseg_monai.benchmark import format_table, run_benchmark

    result = run_benchmark(args.out, quick=args.quick, device=args.device, data=args.data, bundle=_bundle(args.bundle),
                           checkpoint=_checkpoint(args),
                           precision=args.precision, dicom=args.dicom)
    print(format_table(result))
    print(f"written: {args.out}")
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    from brainseg_monai.longitudinal import compare_studies

    settings = None
    if not args.masks:
        from brainseg_monai.inference.runner import InferenceSettings

        settings = InferenceSettings(checkpoint=_checkpoint(args), device=args.device, progress=False)
    result = compare_studies(args.before, args.after, args.out, masks=args.masks, dates=args.dates, force=args.force,
                             settings=settings)
    change = result["change"]
    pct = "" if change["relative_pct"] is None else f", {change['relative_pct']:+.1f}%"
    if result["sizes_in"] == "ml":
        rate = "" if change["rate_mm_per_year"] is None else f", {change['rate_mm_per_year']:+.2f} mm/year"
        print(f"tumour volume {result['before']['volume_ml']:.2f} -> {result['after']['volume_ml']:.2f} ml "
              f"({change['volume_ml']:+.2f} ml{pct}); mean diameter {change['mean_diameter_mm']:+.1f} mm{rate}")
    else:
        print(f"tumour size {result['before']['voxels']} -> {result['after']['voxels']} voxels ({change['voxels']:+d}"
              f"{pct}; 2D slices without spacing: voxels, not ml)")
    print(f"on BEFORE's grid: {change['gained_voxels']} voxels gained, {change['lost_voxels']} lost; report: "
          f"{Path(args.out) / 'compare.md'}")
    return 0


def _cmd_ensemble(args: argparse.Namespace) -> int:
    from brainseg_monai.model import find_spec, write_ensemble

    path = write_ensemble(args.members, args.out, overwrite=args.overwrite)
    spec = find_spec(path)
    kept = f"post-processing {json.dumps(spec.postprocessing)}" if spec.postprocessing else \
        "the members' post-processing differs: defaults until tuned (brainseg tune-threshold --checkpoint " \
        f"{path} on patients no member saw)"
    print(f"{path}: an ensemble of {len(spec.members)} models; {kept}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The ``brainseg`` argument parser with one sub-command per pipeline stage."""
    parser = argparse.ArgumentParser(prog="brainseg", description=DESCRIPTION, formatter_class=_HelpFormatter)
    parser.add_argument("--version", action="version", version=f"brainseg-monai {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="log progress (INFO level; default: warnings and errors only)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, summary: str) -> argparse.ArgumentParser:
        """A sub-command whose --help shows ``summary``, every option's default and its example."""
        return sub.add_parser(name, help=summary, description=summary, formatter_class=_HelpFormatter,
                              epilog=f"example:\n  {EXAMPLES[name]}")

    p = command("synth", "write seeded synthetic phantoms with known truth")
    p.add_argument("out", help="output folder (created; a non-empty folder of other files is refused)")
    p.add_argument("--format", choices=["lgg", "pairs", "nifti", "dicom"], default="lgg",
                   help="layout: lgg (a folder per patient of TIF slices and masks), pairs (images/ and masks/), "
                        "nifti (a folder per case of channel volumes), dicom (one DICOM series per channel)")
    p.add_argument("--cases", type=int, default=6, help="number of cases (patients)")
    p.add_argument("--seed", type=int, default=0, help="random seed: the same seed writes the same bytes")
    p.add_argument("--size", type=int, nargs="+",
                   help="image size: X Y (slices per patient kept) or X Y Z (default: lgg 128 128 16, pairs 128 or "
                        "96 square with 8 slices, nifti 96 96 64, dicom 96 96 32)")
    p.add_argument("--oblique", action="store_true", help="tilted slice orientation (nifti, dicom)")
    p.set_defaults(func=_cmd_synth)

    p = command("datalist", "list a dataset as MONAI decathlon JSON with patient-level splits")
    p.add_argument("root", help="dataset folder")
    p.add_argument("--source", choices=["lgg", "pairs", "nifti", "dicom"], required=True,
                   help="layout of the dataset folder: lgg (a folder per patient, <patient>_<n>.tif and _mask.tif), "
                        "pairs (images/ and masks/, patients in cases.csv), nifti (a folder per case, channel files "
                        "and a *_seg.nii* label), dicom (a tree of studies)")
    p.add_argument("--out", required=True, help="output JSON file")
    p.add_argument("--val", type=float, default=0.2, help="fraction of patients for validation")
    p.add_argument("--test", type=float, default=0.0, help="fraction of patients held out for testing")
    p.add_argument("--folds", type=int, help="K patient-level folds instead of a validation split (default: none, "
                                             "one validation split by --val)")
    p.add_argument("--seed", type=int, default=0, help="seed of the patient shuffle that makes the split")
    p.add_argument("--channel", action="append", metavar="NAME=PATTERN",
                   help="a channel: glob on file names (nifti) or regex on SeriesDescription (dicom); repeat in "
                        "order (default: nifti: the t1/t1c/t2/flair files of the first case; dicom: one item per "
                        "series; lgg/pairs: the images' own channels)")
    p.add_argument("--label-pattern",
                   help="glob of the label file in a case folder (nifti, dicom; default: *_seg.nii*)")
    p.set_defaults(func=_cmd_datalist)

    p = command("infer", "segment images, volumes, LGG folders or DICOM trees; masks in the source geometry")
    p.add_argument("inputs", nargs="+", help="image files, folders of slices, volumes, DICOM series or study trees")
    p.add_argument("--out", required=True, help="output folder: <case>/... and summary.csv (never read as an input, "
                                                "even inside an input folder)")
    _add_model_options(p)
    p.add_argument("--tta", choices=["none", "flip", "dihedral"], default="dihedral",
                   help="test-time augmentation: none (fastest), flip (2 views) or dihedral (the 8 flips and quarter "
                        "turns in 2D; what every figure of the shipped model uses)")
    p.add_argument("--batch-size", type=int, default=16, help="images or slices per forward (times the TTA views)")
    p.add_argument("--precision", choices=["fp32", "bf16", "auto"], default="auto",
                   help="how the forward runs: fp32 (float32, the model's own layers: the reference); bf16 "
                        "(bfloat16 autocast, only on a CPU that reports AVX512-BF16 or AMX-BF16, or a GPU with "
                        "bfloat16); auto (default): on CPU float32 with instance norm computed as group norm, on "
                        "CUDA float16 autocast (docs/benchmarks.md, 'The shipped model')")
    p.add_argument("--resume", action="store_true", help="skip cases already complete in --out from the same input files, "
                   "model and settings; a case whose inputs' content, model or settings changed is redone")
    p.add_argument("--threshold", type=float, help="probability threshold (default: the model's tuned value, else 0.5)")
    p.add_argument("--min-size", type=int, help="remove tumour components smaller than this many voxels (default: "
                                                "the model's setting; the shipped model: none)")
    p.add_argument("--open-above", type=int, help="morphological opening only on components larger than this many "
                                                  "voxels (default: the model's setting; the shipped model: none)")
    p.add_argument("--keep-largest", action=argparse.BooleanOptionalAction,
                   help="keep only the largest tumour component: of each image, or with --stack-slices of each "
                        "patient's stacked slices (default: the model's setting)")
    p.add_argument("--keep-fraction", type=float, metavar="F",
                   help="keep the tumour components whose probability mass (sum of probabilities) is at least F of "
                        "the heaviest one's, 0 < F <= 1, instead of the largest alone: a small tumour the model is "
                        "sure of survives a larger, fainter false positive; 0 keeps every component (default: the "
                        "model's setting; the shipped model: none)")
    p.add_argument("--stack-slices", action=argparse.BooleanOptionalAction,
                   help="post-process the numbered slices of one patient (<patient>_<n>.tif, as in an LGG folder) as "
                        "one stacked volume: components, --min-size and --open-above count voxels of the stack "
                        "(default: the model's setting)")
    p.add_argument("--channel", action="append", metavar="NAME=REGEX",
                   help="choose the input of a model channel by hand (repeat; multi-channel models): a regex "
                        "(case-insensitive) on the SeriesDescription of DICOM series, on the file names of NIfTI/MHA "
                        "case folders and of a lone one-channel image or volume (e.g. --channel 'flair=FLAIR' "
                        "--channel 't1=T1/SE'); RGB slices such as LGG TIFs hold all channels and need none. "
                        "Default: DICOM series identified from their headers; a case folder's file of each channel "
                        "by the pattern [_-]<channel>.(nii|mha|mhd|nrrd), as in case_flair.nii.gz; a lone image by "
                        "its name (FLAIR.png); a missing optional channel filled as the model says (README: 'How "
                        "series become channels')")
    p.add_argument("--series-rules", metavar="FILE",
                   help="JSON rules for choosing DICOM series: {\"channels\": {NAME: REGEX}, \"skip\": [REGEX], "
                        "\"prefer\": [\"axial\", \"most_slices\", \"latest\"]} (default: those three in that order)")
    p.add_argument("--untrusted", action="store_true",
                   help="inputs from someone else: refuse any image header (MetaImage, NRRD, Analyze) naming a data "
                        "file outside its input's folder, and links out of it, before anything is read (default: "
                        "off; the web app always checks)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (default: one bar on stderr)")
    p.set_defaults(func=_cmd_infer)

    p = command("evaluate", "score brainseg infer outputs against truth; metrics.json and a report")
    p.add_argument("pred_dir", help="the --out folder of brainseg infer")
    p.add_argument("--truth", required=True, help="dataset root (with --source), one LGG patient folder, or a "
                                                  "datalist JSON")
    p.add_argument("--source", choices=["lgg", "pairs", "nifti", "dicom"], help="layout of a truth root (default: detected)")
    p.add_argument("--split", choices=["training", "validation", "testing", "all"],
                   help="datalist split to score (default: validation, for a datalist JSON)")
    p.add_argument("--fold", type=int, help="with a K-fold datalist: score fold K's validation patients (default: "
                                            "none)")
    p.add_argument("--spacing", type=float, nargs="+", metavar="MM",
                   help="pixel spacing in mm for 2D distances (default: pixels): X [Y]; a third value Z, the slice "
                        "spacing, also gives the 3D HD95/ASD of a patient's stacked slices (without it they are "
                        "undefined). Volumes: X Y Z or one value for all, instead of the files' spacing")
    p.add_argument("--allow-missing", action="store_true",
                   help="score a truth item without a prediction as an empty prediction (perfect on a tumour-free "
                        "item) instead of refusing")
    p.add_argument("--only-predicted", action="store_true",
                   help="score only the patients that have a prediction (one patient predicted, the dataset as "
                        "truth); those without any are left out and counted in metrics.json (left_out). A patient "
                        "with some predictions missing is still refused")
    p.add_argument("--label-maps", action="store_true",
                   help="take prediction masks holding other values than 0/1 or 0/255 (label maps), any non-zero "
                        "value counted as tumour, instead of refusing them")
    p.add_argument("--out", required=True, help="report folder: metrics.json, report.md, report.html, plots")
    p.add_argument("--train-dir", help="a training output folder: its TensorBoard curves go into the report "
                                       "(default: none)")
    p.add_argument("--model", help="checkpoint or model.json whose threshold tuning curve goes into the report "
                                   "(default: --train-dir's models/model.json, if any)")
    p.add_argument("--n-worst", type=int, default=4, help="worst patients shown as overlays")
    p.set_defaults(func=_cmd_evaluate)

    p = command("tune-threshold", "pick the threshold, then whether to keep only the largest component, "
                                  "maximising per-patient Dice; store them with the model")
    p.add_argument("--checkpoint", required=True, nargs="+",
                   help="the model; or one model per fold, each scored on the --fold it never saw (out of fold)")
    p.add_argument("--datalist", required=True, help="datalist whose validation items (or --fold) are used")
    p.add_argument("--fold", type=int, nargs="+",
                   help="the held-out fold of each --checkpoint, in the same order (checked against each run's "
                        "config_resolved.json; default: none: the run must have held out the datalist's "
                        "validation split and not trained on it with train_all)")
    p.add_argument("--store-in", help="model whose model.json receives the threshold (default: the one --checkpoint)")
    p.add_argument("--tta", choices=["none", "flip", "dihedral"], default="dihedral",
                   help="tune with the TTA you infer with (default dihedral, as brainseg infer)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--batch-size", type=int, default=16, help="slices per forward (times the TTA views)")
    p.add_argument("--thresholds", type=float, nargs="+", help="candidate thresholds (default 0.05 to 0.95 by 0.05)")
    p.add_argument("--dry-run", action="store_true", help="report the best threshold without storing it")
    p.set_defaults(func=_cmd_tune_threshold)

    p = command("aggregate-folds", "mean and spread of K folds' metrics.json, pooled per-patient Dice")
    p.add_argument("metrics", nargs="+", help="metrics.json files or report folders, one per fold (numbered by "
                                              "the --fold each was evaluated with, else by their order)")
    p.add_argument("--out", required=True, help="report folder: folds.json, folds.md, folds.html, folds_dice.png")
    p.set_defaults(func=_cmd_aggregate_folds)

    p = command("serve", "local web app: upload a scan, see the tumour outlined, read its size")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port of the page, http://HOST:PORT")
    _add_model_options(p)
    p.add_argument("--max-upload-mb", type=int, default=512,
                   help="largest accepted upload in MB, all files of one request together")
    p.set_defaults(func=_cmd_serve)

    p = command("benchmark", "speed against MONAI's TestTimeAugmentation and the machine's matmul rate")
    p.add_argument("--quick", action="store_true", help="small sizes: a few minutes on 2 CPU cores")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--data", help="LGG patient folders to use instead of synthetic phantoms (default: phantoms)")
    p.add_argument("--bundle", help="bundle folder (its train.json times the data pipeline; default as for infer)")
    p.add_argument("--checkpoint", help="the model to time (default: the bundle's models/model.pt, the shipped model)")
    p.add_argument("--precision", choices=["fp32", "bf16", "auto"], default="auto",
                   help="how the timed model's fast path runs, as for infer (the fp32 reference is timed too)")
    p.add_argument("--dicom", help="a DICOM series folder: also time brainseg infer on a 22-slice 288x288 study made "
                                   "from it (e.g. ../shared/data/dicom/HF1139_AXIAL_FLAIR; default: not timed)")
    p.add_argument("--out", required=True, help="JSON file for the figures")
    p.set_defaults(func=_cmd_benchmark)

    p = command("compare", "how one patient's tumour changed between two studies: volumes, growth rate "
                           "(mm/year), a picture of what was gained and lost")
    p.add_argument("before", help="the earlier study: a DICOM study or series folder, a volume file, or a folder of "
                                  "2D slices (LGG layout)")
    p.add_argument("after", help="the later study of the same patient, of the same kind")
    p.add_argument("--out", required=True, help="report folder: compare.json, compare.md, compare.png (and before/, "
                                                "after/: the masks brainseg infer made)")
    p.add_argument("--masks", nargs=2, metavar=("BEFORE_MASK", "AFTER_MASK"),
                   help="use these masks instead of segmenting: a mask file on the study's image (brainseg infer's "
                        "mask.nii.gz: on the FLAIR series of a DICOM study), or for a folder of slices a folder of "
                        "<stem>_pred.png or <stem>_mask.* slices (it may be the slice folder itself; default: "
                        "segment both studies with the model)")
    p.add_argument("--dates", nargs=2, metavar=("BEFORE_DATE", "AFTER_DATE"),
                   help="study dates YYYY-MM-DD for the growth rate, where the inputs carry no DICOM StudyDate "
                        "(they win over it; default: the StudyDate, if any)")
    p.add_argument("--force", action="store_true", help="compare even when the two studies' PatientIDs differ")
    _add_model_options(p)
    p.set_defaults(func=_cmd_compare)

    p = command("ensemble", "one model from several of one architecture (e.g. the fold models of a "
                            "cross-validation): their probabilities averaged, with every TTA view")
    p.add_argument("members", nargs="+", help="two or more model .pt checkpoints with their model.json")
    p.add_argument("--out", required=True, help="the ensemble's model.json to write (members stored relative to it); "
                                                "pass it to infer, serve, compare or benchmark as --checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.set_defaults(func=_cmd_ensemble)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``brainseg`` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    from brainseg_monai.quiet import quiet_third_party  # after parsing: --help needs none of the libraries

    quiet_third_party()
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args))
    except (InputError, FileNotFoundError, ValueError, argparse.ArgumentTypeError) as err:
        print(f"brainseg {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: a message, not a traceback, and the shell's status for SIGINT
        print(f"brainseg {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
