"""``brainseg`` command line: argument parsing and printing over the library functions, nothing else."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from brainseg_monai import __version__
from brainseg_monai.errors import InputError


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
    from brainseg_monai.inference.runner import InferenceSettings, run_inference

    checkpoint = args.checkpoint or str(_bundle(args.bundle) / "models" / "model.pt")
    settings = InferenceSettings(
        checkpoint=checkpoint, tta=args.tta, device=args.device, batch_size=args.batch_size, resume=args.resume,
        threshold=args.threshold, min_size=args.min_size, open_above=args.open_above,
        keep_largest=args.keep_largest, stack_slices=args.stack_slices, channels=_channels(args.channel),
        series_rules=SelectionRules.from_file(args.series_rules) if args.series_rules else None,
        progress=not args.no_progress, precision=args.precision,
    )
    try:
        rows = run_inference(args.inputs, args.out, settings)
    except KeyboardInterrupt:  # the runner removed what it was writing and released the folder
        print(f"brainseg infer: interrupted; the cases finished so far are in {args.out}: run the same command with "
              f"--resume to go on", file=sys.stderr)
        return 130
    failed = [r for r in rows if r["status"] == "failed"]
    print(f"{len(rows) - len(failed)} ok, {len(failed)} failed -> {Path(args.out) / 'summary.csv'}")
    for row in failed:
        print(f"failed {row['case']} ({row['source']}): {row['error']}", file=sys.stderr)
    return 1 if failed else 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from brainseg_monai.evaluation import evaluate_predictions
    from brainseg_monai.report import write_report

    result = evaluate_predictions(args.pred_dir, args.truth, args.source, args.spacing, split=args.split,
                                  fold=args.fold, allow_missing=args.allow_missing)
    files = write_report(result, args.out, train_dir=args.train_dir, model=args.model, n_worst=args.n_worst)
    summary = result["summary"]

    def fmt(key: str) -> str:
        value = summary.get(key)
        return "n/a" if value is None else f"{value:.4f}"

    print(f"{summary.get('patients', len(result['per_patient']))} patients: patient Dice mean {fmt('patient_dice_mean')}, "
          f"median {fmt('patient_dice_median')}; global Dice {fmt('global_dice')}; "
          f"missing predictions {summary.get('missing_predictions', 0)}")
    print(f"report: {files['html']}")
    return 0


def _cmd_tune_threshold(args: argparse.Namespace) -> int:
    from brainseg_monai.datalist import training_split
    from brainseg_monai.tuning import check_fold_model, plot_threshold_curve, tune_threshold_out_of_fold

    checkpoints, folds = args.checkpoint, args.fold or [None]
    if len(checkpoints) > 1 and len(folds) != len(checkpoints):
        raise ValueError(f"{len(checkpoints)} checkpoints need as many --fold values (the "
                         f"fold each one never saw, in the same order); got {len(args.fold or [])}")
    if len(checkpoints) == 1 and len(folds) > 1:
        raise ValueError("several --fold values need one checkpoint per fold")
    if len(set(folds)) < len(folds):
        raise ValueError(f"--fold {' '.join(map(str, folds))} repeats a fold; give each "
                         f"checkpoint the one fold it never saw")
    if args.dry_run and args.store_in:
        raise ValueError("--dry-run stores nothing; drop --store-in or --dry-run")
    target = None if args.dry_run else (args.store_in or (checkpoints[0] if len(checkpoints) == 1 else None))
    if not args.dry_run and target is None:
        raise ValueError("with several fold checkpoints, say which model receives the "
                         "threshold with --store-in MODEL (e.g. the model trained on all patients), or use --dry-run")
    for ckpt, fold in zip(checkpoints, folds):  # each model must never have seen the patients it is tuned on
        check_fold_model(ckpt, fold)
    result = tune_threshold_out_of_fold(
        [(ckpt, training_split(args.datalist, fold)[1]) for ckpt, fold in zip(checkpoints, folds)],
        target=target, tta=args.tta, device=args.device, batch_size=args.batch_size, thresholds=args.thresholds,
    )
    plot = plot_threshold_curve(result["threshold_curve"], result["threshold"],
                                Path(target or checkpoints[0]).parent / "threshold_curve.png",
                                previous=result["previous_threshold"])
    previous = "n/a" if result["previous_dice"] is None else f"{result['previous_dice']:.4f}"
    for candidate in result["postprocessing_candidates"]:
        chosen = " (chosen)" if candidate["settings"] == result["postprocessing"] else ""
        print(f"post-processing {json.dumps(candidate['settings'])}: best threshold {candidate['threshold']}, mean "
              f"patient Dice {candidate['dice']:.4f}{chosen}")
    print(f"best threshold {result['threshold']} (mean patient Dice {result['dice']:.4f} over {result['patients']} "
          f"patients); before: {json.dumps(result['previous_postprocessing'])} ({previous}); curve: {plot}")
    print(f"stored in {result['sidecar']}" if result["sidecar"] else "dry run: nothing stored")
    return 0


def _cmd_aggregate_folds(args: argparse.Namespace) -> int:
    from brainseg_monai.report import write_folds_report
    from brainseg_monai.tuning import aggregate_folds

    files = write_folds_report(aggregate_folds(args.metrics), args.out)
    print(f"report: {files['html']}")
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    from brainseg_monai.webapp import serve  # needs fastapi/uvicorn: imported only for this sub-command

    checkpoint = args.checkpoint or str(_bundle(args.bundle) / "models" / "model.pt")
    serve(checkpoint, host=args.host, port=args.port, max_upload_mb=args.max_upload_mb, device=args.device)
    return 0


def _cmd_benchmark(args: argparse.Namespace) -> int:
    from brainseg_monai.benchmark import format_table, run_benchmark

    result = run_benchmark(args.out, quick=args.quick, device=args.device, data=args.data, bundle=_bundle(args.bundle),
                           checkpoint=args.checkpoint or str(_bundle(args.bundle) / "models" / "model.pt"),
                           precision=args.precision)
    print(format_table(result))
    print(f"written: {args.out}")
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    from brainseg_monai.longitudinal import compare_studies

    settings = None
    if not args.masks:
        from brainseg_monai.inference.runner import InferenceSettings

        checkpoint = args.checkpoint or str(_bundle(args.bundle) / "models" / "model.pt")
        settings = InferenceSettings(checkpoint=checkpoint, device=args.device, progress=False)
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


def build_parser() -> argparse.ArgumentParser:
    """The ``brainseg`` argument parser with one sub-command per pipeline stage."""
    parser = argparse.ArgumentParser(prog="brainseg", description=__doc__)
    parser.add_argument("--version", action="version", version=f"brainseg-monai {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress (INFO level)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("synth", help="write seeded synthetic phantoms with known truth")
    p.add_argument("out", help="output folder (created; a non-empty folder of other files is refused)")
    p.add_argument("--format", choices=["lgg", "pairs", "nifti", "dicom"], default="lgg")
    p.add_argument("--cases", type=int, default=6, help="number of cases (patients)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, nargs="+", help="image size: X Y for 2D formats, X Y Z for volumes")
    p.add_argument("--oblique", action="store_true", help="tilted slice orientation (nifti, dicom)")
    p.set_defaults(func=_cmd_synth)

    p = sub.add_parser("datalist", help="list a dataset as MONAI decathlon JSON with patient-level splits")
    p.add_argument("root", help="dataset folder")
    p.add_argument("--source", choices=["lgg", "pairs", "nifti", "dicom"], required=True)
    p.add_argument("--out", required=True, help="output JSON file")
    p.add_argument("--val", type=float, default=0.2, help="fraction of patients for validation")
    p.add_argument("--test", type=float, default=0.0, help="fraction of patients held out for testing")
    p.add_argument("--folds", type=int, help="K patient-level folds instead of a validation split")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--channel", action="append", metavar="NAME=PATTERN",
                   help="a channel: glob on file names (nifti) or regex on SeriesDescription (dicom); repeat in order")
    p.add_argument("--label-pattern", help="glob of the label file in a case folder (nifti, dicom)")
    p.set_defaults(func=_cmd_datalist)

    p = sub.add_parser("infer", help="segment images, volumes, LGG folders or DICOM trees; masks in the source geometry")
    p.add_argument("inputs", nargs="+", help="image files, folders of slices, volumes, DICOM series or study trees")
    p.add_argument("--out", required=True, help="output folder: <case>/... and summary.csv (never read as an input, "
                                                "even inside an input folder)")
    p.add_argument("--bundle", help="bundle folder whose models/model.pt is the default checkpoint (default: ./bundle "
                   "if present, else the repository's bundle of an editable install)")
    p.add_argument("--checkpoint", help="model checkpoint (model.pt with its model.json beside it)")
    p.add_argument("--tta", choices=["none", "flip", "dihedral"], default="dihedral", help="test-time augmentation")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--batch-size", type=int, default=16, help="images or slices per forward (times the TTA views)")
    p.add_argument("--precision", choices=["fp32", "bf16", "auto"], default="auto",
                   help="the forward's arithmetic: fp32; bf16 (bfloat16 autocast, only on a CPU that reports "
                        "AVX512-BF16 or AMX-BF16, or a GPU with bfloat16); auto: float16 autocast on CUDA, fp32 on "
                        "CPU (default; docs/benchmarks.md, 'The shipped model')")
    p.add_argument("--resume", action="store_true", help="skip cases already complete in --out from the same input files, "
                   "model and settings; a case whose inputs' content, model or settings changed is redone")
    p.add_argument("--threshold", type=float, help="probability threshold (default: the model's tuned value, else 0.5)")
    p.add_argument("--min-size", type=int, help="remove tumour components smaller than this many voxels")
    p.add_argument("--open-above", type=int, help="morphological opening only on components larger than this")
    p.add_argument("--keep-largest", action=argparse.BooleanOptionalAction,
                   help="keep only the largest tumour component: of each image, or with --stack-slices of each "
                        "patient's stacked slices (default: the model's setting)")
    p.add_argument("--stack-slices", action=argparse.BooleanOptionalAction,
                   help="post-process the numbered slices of one patient (<patient>_<n>.tif, as in an LGG folder) as "
                        "one stacked volume: components, --min-size and --open-above count voxels of the stack "
                        "(default: the model's setting)")
    p.add_argument("--channel", action="append", metavar="NAME=REGEX",
                   help="choose the input of a model channel by hand (repeat): a regex on SeriesDescription for "
                        "DICOM studies, on file names for NIfTI/MHA case folders and lone files (e.g. "
                        "--channel 'flair=FLAIR' --channel 't1=T1/SE'). Default: DICOM series are identified from "
                        "their headers, files by <case>_<channel>.nii.gz; a missing optional channel is filled as "
                        "the model says (README: 'How series become channels')")
    p.add_argument("--series-rules", metavar="FILE",
                   help="JSON rules for choosing DICOM series: {\"channels\": {NAME: REGEX}, \"skip\": [REGEX], "
                        "\"prefer\": [\"axial\", \"most_slices\", \"latest\"]} (default: those three in that order)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_infer)

    p = sub.add_parser("evaluate", help="score brainseg infer outputs against truth; metrics.json and a report")
    p.add_argument("pred_dir", help="the --out folder of brainseg infer")
    p.add_argument("--truth", required=True, help="dataset root (with --source) or a datalist JSON")
    p.add_argument("--source", choices=["lgg", "pairs", "nifti", "dicom"], help="layout of a truth root (default: detected)")
    p.add_argument("--split", choices=["training", "validation", "testing", "all"], help="datalist split to score")
    p.add_argument("--fold", type=int, help="with a K-fold datalist: score fold K's validation patients")
    p.add_argument("--spacing", type=float, nargs="+", metavar="MM",
                   help="pixel spacing in mm for 2D distances (default: pixels): X [Y]; a third value Z, the slice "
                        "spacing, also gives the 3D HD95/ASD of a patient's stacked slices (without it they are "
                        "undefined). Volumes: X Y Z or one value for all, instead of the files' spacing")
    p.add_argument("--allow-missing", action="store_true",
                   help="score a truth item without a prediction as an empty prediction (perfect on a tumour-free "
                        "item) instead of refusing")
    p.add_argument("--out", required=True, help="report folder: metrics.json, report.md, report.html, plots")
    p.add_argument("--train-dir", help="a training output folder: its TensorBoard curves go into the report")
    p.add_argument("--model", help="checkpoint or model.json whose threshold tuning curve goes into the report")
    p.add_argument("--n-worst", type=int, default=4, help="worst patients shown as overlays")
    p.set_defaults(func=_cmd_evaluate)

    p = sub.add_parser("tune-threshold", help="pick the threshold, then whether to keep only the largest component, "
                       "maximising per-patient Dice; store them with the model")
    p.add_argument("--checkpoint", required=True, nargs="+",
                   help="the model; or one model per fold, each scored on the --fold it never saw (out of fold)")
    p.add_argument("--datalist", required=True, help="datalist whose validation items (or --fold) are used")
    p.add_argument("--fold", type=int, nargs="+",
                   help="the held-out fold of each --checkpoint, in the same order (checked against each run's "
                        "config_resolved.json; without --fold, the run must have held out the datalist's validation "
                        "split and not trained on it with train_all)")
    p.add_argument("--store-in", help="model whose model.json receives the threshold (default: the one --checkpoint)")
    p.add_argument("--tta", choices=["none", "flip", "dihedral"], default="dihedral",
                   help="tune with the TTA you infer with (default dihedral, as brainseg infer)")
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--thresholds", type=float, nargs="+", help="candidate thresholds (default 0.05 to 0.95 by 0.05)")
    p.add_argument("--dry-run", action="store_true", help="report the best threshold without storing it")
    p.set_defaults(func=_cmd_tune_threshold)

    p = sub.add_parser("aggregate-folds", help="mean and spread of K folds' metrics.json, pooled per-patient Dice")
    p.add_argument("metrics", nargs="+", help="metrics.json files or report folders, one per fold (numbered by "
                                              "the --fold each was evaluated with, else by their order)")
    p.add_argument("--out", required=True)
    p.set_defaults(func=_cmd_aggregate_folds)

    p = sub.add_parser("serve", help="local web app: upload a scan, see the tumour outlined, read its size")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: localhost only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--bundle", help="bundle folder whose models/model.pt is the default checkpoint (default: ./bundle "
                   "if present, else the repository's bundle of an editable install)")
    p.add_argument("--checkpoint", help="model checkpoint (model.pt with its model.json beside it)")
    p.add_argument("--max-upload-mb", type=int, default=512, help="largest accepted upload")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.set_defaults(func=_cmd_serve)

    p = sub.add_parser("benchmark", help="speed against MONAI's TestTimeAugmentation and the machine's matmul rate")
    p.add_argument("--quick", action="store_true", help="small sizes: a few minutes on 2 CPU cores")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--data", help="LGG patient folders to use instead of synthetic phantoms")
    p.add_argument("--bundle", help="bundle folder (its train.json times the data pipeline; default as for infer)")
    p.add_argument("--checkpoint", help="the model to time (default: the bundle's models/model.pt, the shipped model)")
    p.add_argument("--precision", choices=["fp32", "bf16", "auto"], default="auto",
                   help="precision of the timed model's fast path, as for infer (float32 is timed too)")
    p.add_argument("--out", required=True, help="JSON file for the figures")
    p.set_defaults(func=_cmd_benchmark)

    p = sub.add_parser("compare", help="how one patient's tumour changed between two studies: volumes, growth rate "
                                       "(mm/year), a picture of what was gained and lost")
    p.add_argument("before", help="the earlier study: a DICOM study or series folder, a volume file, or a folder of "
                                  "2D slices (LGG layout)")
    p.add_argument("after", help="the later study of the same patient, of the same kind")
    p.add_argument("--out", required=True, help="report folder: compare.json, compare.md, compare.png (and before/, "
                                                "after/: the masks brainseg infer made)")
    p.add_argument("--masks", nargs=2, metavar=("BEFORE_MASK", "AFTER_MASK"),
                   help="use these masks instead of segmenting: a mask file on the study's image (brainseg infer's "
                        "mask.nii.gz: on the FLAIR series of a DICOM study), or for a folder of slices a folder of "
                        "<stem>_pred.png or <stem>_mask.* slices (it may be the slice folder itself)")
    p.add_argument("--dates", nargs=2, metavar=("BEFORE_DATE", "AFTER_DATE"),
                   help="study dates YYYY-MM-DD for the growth rate, where the inputs carry no DICOM StudyDate "
                        "(they win over it)")
    p.add_argument("--force", action="store_true", help="compare even when the two studies' PatientIDs differ")
    p.add_argument("--bundle", help="bundle folder whose models/model.pt segments the studies (default as for infer)")
    p.add_argument("--checkpoint", help="model checkpoint that segments the studies (model.pt with its model.json)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.set_defaults(func=_cmd_compare)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``brainseg`` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
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
