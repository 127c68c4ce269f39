"""Does the case uncertainty find the bad masks? Joins ``brainseg infer``'s per-case ``uncertainty`` with ``brainseg
evaluate``'s per-patient Dice, and writes the figures (`brainseg_monai.uncertainty.validate`) and a scatter plot.

    brainseg infer PATIENTS --out PRED
    brainseg evaluate PRED --truth PATIENTS --source lgg --out REPORT
    python scripts/uncertainty_validation.py --pred PRED --report REPORT --out VALIDATION

Writes ``VALIDATION/validation.json`` (Spearman rho between the score and the Dice, the failures with Dice < 0.7 among
the 20% most uncertain, the ``review_above`` threshold that flags that 20% and the ``score`` it is for: store both in
``model.json``'s ``uncertainty`` block) and ``VALIDATION/uncertainty_vs_dice.png``.
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

from matplotlib.figure import Figure

from brainseg_monai.uncertainty import validate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pred", required=True, help="brainseg infer's output folder (its summary.csv)")
    parser.add_argument("--report", required=True, help="brainseg evaluate's output folder (its metrics.json)")
    parser.add_argument("--out", required=True, help="folder for validation.json and the plot")
    parser.add_argument("--failure-below", type=float, default=0.7, help="Dice below which a mask is a failure")
    parser.add_argument("--top-fraction", type=float, default=0.2, help="share of the most uncertain cases flagged")
    args = parser.parse_args()

    pred = Path(args.pred)
    with open(pred / "summary.csv", newline="") as f:
        scores = {row["case"]: float(row["uncertainty"]) for row in csv.DictReader(f)
                  if row["status"] == "ok" and row["uncertainty"] != ""}
    if not scores:
        raise SystemExit(f"{pred / 'summary.csv'}: no case has an uncertainty (was it run with --tta none?)")
    # which score the cases hold (a single model's expected Dice, an ensemble's members' disagreement): case.json says
    names = {json.loads((pred / case / "case.json").read_text()).get("uncertainty_score") for case in scores}
    if len(names) != 1 or not next(iter(names)):
        raise SystemExit(f"{pred}: the cases hold {sorted(map(str, names))} as their score's name; validate the "
                         "cases of one model, run with this version of brainseg infer")
    metrics = json.loads((Path(args.report) / "metrics.json").read_text())
    dice = {p["patient"]: float(p["dice"]) for p in metrics["per_patient"]}
    result = validate(scores, dice, args.failure_below, args.top_fraction, score_name=next(iter(names)))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "validation.json").write_text(json.dumps(result, indent=1) + "\n")

    figure = Figure(figsize=(5.5, 4.2), dpi=120)
    ax = figure.add_subplot()
    points = result["per_case"]
    failed = [p for p in points if p["dice"] < args.failure_below]
    ax.scatter([p["uncertainty"] for p in points], [p["dice"] for p in points], s=18, color="#1f77b4",
               label=f"patients ({len(points)})")
    ax.scatter([p["uncertainty"] for p in failed], [p["dice"] for p in failed], s=30, facecolors="none",
               edgecolors="#d62728", label=f"Dice < {args.failure_below:g} ({len(failed)})")
    ax.axvline(result["review_above"], color="#555", linestyle="--", linewidth=1,
               label=f"review above {result['review_above']:.3f} (top {args.top_fraction:.0%})")
    ax.set_xlabel(f"case uncertainty ({result['score']})")
    ax.set_ylabel("per-patient Dice")
    ax.set_title(f"Spearman rho {result['spearman_rho']:.2f}; {result['failures_in_top']} of {result['failures']} "
                 f"failures in the top {args.top_fraction:.0%}", fontsize=10)
    ax.legend(fontsize=8, loc="lower left")
    figure.tight_layout()
    figure.savefig(out / "uncertainty_vs_dice.png")
    print(json.dumps({k: v for k, v in result.items() if k != "per_case"}, indent=1))


if __name__ == "__main__":
    main()
