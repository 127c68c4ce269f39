#!/usr/bin/env bash
# The README's main command: set up, make synthetic phantoms, train a 2D U-Net on them, then segment
# synthetic oblique DICOM studies with it (masks in the series geometry, DICOM SEG, overlays, summary.csv)
# and score the masks against the phantoms' known truth (report.html).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
[[ -n "${VIRTUAL_ENV:-}" ]] || source .venv/bin/activate
OUT="${1:-runs/quickstart}"
EPOCHS="${QUICKSTART_EPOCHS:-30}"
brainseg synth "$OUT/phantoms" --format lgg --cases 12 --seed 0 --size 128 128 16
brainseg datalist "$OUT/phantoms" --source lgg --out "$OUT/datalist.json" --val 0.25 --seed 0
python -m monai.bundle run training --config_file bundle/configs/train.json --bundle_root bundle \
    --output_dir "$OUT/train" --datalist "$OUT/datalist.json" --max_epochs "$EPOCHS" \
    --resume "$(compgen -G "$OUT/train/models/last_checkpoint_epoch=*.pt" > /dev/null && echo true || echo false)"
brainseg synth "$OUT/dicom" --format dicom --cases 3 --seed 1 --size 128 128 16 --oblique
brainseg infer "$OUT/dicom" --out "$OUT/predictions" --checkpoint "$OUT/train/models/model.pt" --resume
brainseg evaluate "$OUT/predictions" --truth "$OUT/dicom" --source dicom --out "$OUT/report" --train-dir "$OUT/train"
echo "model: $OUT/train/models/model.pt | masks: $OUT/predictions | report: $OUT/report/report.html"
