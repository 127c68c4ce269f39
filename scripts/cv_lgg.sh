#!/usr/bin/env bash
# Patient-level 5-fold cross-validation on the LGG set: for each fold, train configs/lgg_2d.json on the other four,
# predict the held-out patients with brainseg infer (its default TTA and post-processing) and score them; then
# aggregate the folds. Out-of-fold per-patient Dice is the figure bundle/docs/README.md reports.
#
#   bash scripts/cv_lgg.sh            # all five folds
#   bash scripts/cv_lgg.sh 0 3        # some folds (runs of other folds already under OUT are aggregated too)
#
# A fold whose training finished is not trained again (delete OUT/NAME_fK/trained to retrain); an interrupted one
# resumes from its last checkpoint, so the script can be run again after a stop.
#
# Settings (environment): DATA (LGG kaggle_3m folder), OUT (default runs/cv), NAME (run name, default unet),
# EPOCHS (default 50, as configs/lgg_2d.json since 0.7.0; 0.6.0's recipe trained 100: EPOCHS=100),
# TRAIN_ARGS (extra bundle overrides, e.g. "--network_name attresseunet"),
# MODEL (the checkpoint of each fold to score, under OUT/NAME_fK/models: model_final.pt, the model at the end of training,
# by default, so no held-out score picks it; model.pt is the best validation epoch), INFER_ARGS (extra brainseg infer
# options, e.g. "--tta none"), TAG (suffix of the prediction and report folders, so
# post-processing variants of trained folds sit beside the default: TAG=_min64 INFER_ARGS="--min-size 64").
# SCORE=training scores each fold model on the patients it was trained on instead (predictions in fit*, report in
# report_fit*): how well the recipe fits its own data, to tell under-fitting from poor generalisation, e.g.
# SCORE=training TAG=_t05 INFER_ARGS="--tta none --no-keep-largest --threshold 0.5".
set -euo pipefail
cd "$(dirname "$0")/.."
[[ -n "${VIRTUAL_ENV:-}" ]] || source .venv/bin/activate

DATA=${DATA:-../shared/data/lgg/kaggle_3m}
OUT=${OUT:-runs/cv}
NAME=${NAME:-unet}
EPOCHS=${EPOCHS:-50}
MODEL=${MODEL:-model_final.pt}
SCORE=${SCORE:-heldout}
case "$SCORE" in
    heldout) patients=heldout; predictions=oof; report=report ;;
    training) patients=seen; predictions=fit; report=report_fit ;;
    *) echo "SCORE must be heldout or training, not '$SCORE'" >&2; exit 2 ;;
esac
FOLDS=("$@")
[[ ${#FOLDS[@]} -gt 0 ]] || FOLDS=(0 1 2 3 4)

if [[ ! -d "$DATA" ]]; then
    echo "LGG data not found at $DATA (set DATA=...; see ../shared/data/DATA.md)" >&2
    exit 2
fi
mkdir -p "$OUT"
datalist="$OUT/folds5.json"
[[ -f "$datalist" ]] || brainseg datalist "$DATA" --source lgg --folds 5 --seed 0 --out "$datalist"

for k in "${FOLDS[@]}"; do
    run="$OUT/${NAME}_f$k"
    if [[ ! -f "$run/trained" ]]; then  # a finished fold is kept; an interrupted one resumes from its last checkpoint
        resume=false
        compgen -G "$run/models/last_checkpoint_epoch=*.pt" >/dev/null && resume=true
        # shellcheck disable=SC2086  # TRAIN_ARGS holds several arguments
        python -m monai.bundle run training --config_file "['bundle/configs/train.json','configs/lgg_2d.json']" \
            --bundle_root bundle --datalist "$datalist" --fold "$k" --max_epochs "$EPOCHS" --output_dir "$run" \
            --resume "$resume" ${TRAIN_ARGS:-}
        touch "$run/trained"
    fi
    if [[ ! -f "$run/models/$MODEL" ]]; then
        echo "$run/models/$MODEL not found: a fold trained before model_final.pt existed has only model.pt" \
             "(score it with MODEL=model.pt, or delete $run/trained to train it again)" >&2
        exit 2
    fi
    # a folder with links to the patients to score only (held out, or trained on), so inference does no more than
    # scoring needs; for the patients trained on, also the list of their items as the truth to score against
    python - "$datalist" "$k" "$run/$patients" "$SCORE" <<'EOF'
import json, os, sys
from pathlib import Path

datalist, fold, target, score = json.load(open(sys.argv[1])), int(sys.argv[2]), Path(sys.argv[3]), sys.argv[4]
items = [item for item in datalist["training"] if (item["fold"] == fold) == (score == "heldout")]
target.mkdir(parents=True, exist_ok=True)
for folder in sorted({Path(item["image"]).parent for item in items}):
    link = target / folder.name
    if not link.exists():
        os.symlink(folder.resolve(), link, target_is_directory=True)
if score == "training":  # held out, evaluate takes the fold of the datalist itself
    (target.parent / f"{target.name}.json").write_text(json.dumps(items, indent=1))
EOF
    # shellcheck disable=SC2086
    brainseg infer "$run/$patients" --checkpoint "$run/models/$MODEL" --out "$run/$predictions${TAG:-}" --no-progress \
        ${INFER_ARGS:-}
    # held out: the fold of the datalist, so the report records its fold for aggregate-folds; trained on: the list
    truth=(--truth "$datalist" --fold "$k")
    [[ "$SCORE" == heldout ]] || truth=(--truth "$run/$patients.json")
    brainseg evaluate "$run/$predictions${TAG:-}" "${truth[@]}" --out "$run/$report${TAG:-}" \
        --train-dir "$run" --model "$run/models/$MODEL"
done
reports=("$OUT/${NAME}"_f*/$report${TAG:-}/metrics.json)
if [[ ${#reports[@]} -ge 2 ]]; then
    brainseg aggregate-folds "${reports[@]}" --out "$OUT/${NAME}_summary${report#report}${TAG:-}"
else
    echo "one fold scored so far (${reports[0]}); the summary over folds needs two or more"
fi
