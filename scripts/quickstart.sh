#!/usr/bin/env bash
# The README's first command: a first result in about 5 minutes on 2 CPU cores, from synthetic data only.
#  1. set up (.venv, as scripts/setup.sh);
#  2. train a 2D U-Net on synthetic LGG-layout phantoms for QUICKSTART_EPOCHS epochs (default 8): small images
#     (96 x 96) and a higher learning rate (0.003) than the bundle's default, so that the validation Dice climbs
#     within these few epochs (about 0.02 after the first, 0.6-0.8 by the seventh);
#  3. segment synthetic oblique DICOM studies with it (masks in the series geometry, DICOM SEG, overlays,
#     summary.csv) and score the masks against the studies' known truth (report.html, training curves included);
#  4. when ../shared/data is beside the repository, the shipped LGG model segments a real LGG patient too (the
#     shipped model was trained on real MRI: on the phantoms it finds next to nothing, so it is not run on them).
# Usage: bash scripts/quickstart.sh [OUT]   (default OUT: runs/quickstart; run again, it resumes)
set -euo pipefail
cd "$(dirname "$0")/.."
start=$SECONDS
bash scripts/setup.sh
[[ -n "${VIRTUAL_ENV:-}" ]] || source .venv/bin/activate
OUT="${1:-runs/quickstart}"
EPOCHS="${QUICKSTART_EPOCHS:-8}"

brainseg synth "$OUT/phantoms" --format lgg --cases 12 --seed 0 --size 96 96 12
brainseg datalist "$OUT/phantoms" --source lgg --out "$OUT/datalist.json" --val 0.25 --seed 0
echo "training $EPOCHS epochs (about 10 s each on 2 idle cores; log: $OUT/train.log)"
mkdir -p "$OUT"
# PYTHONWARNINGS: MONAI warns on every run that a bundle config can run code; this config is the repository's own.
PYTHONWARNINGS="ignore:parsing config_file:UserWarning" python -m monai.bundle run training \
    --config_file bundle/configs/train.json --bundle_root bundle --output_dir "$OUT/train" \
    --datalist "$OUT/datalist.json" --max_epochs "$EPOCHS" --roi_size "[96, 96]" --learning_rate 0.003 \
    --channels_last true \
    --resume "$(compgen -G "$OUT/train/models/last_checkpoint_epoch=*.pt" > /dev/null && echo true || echo false)" \
    >> "$OUT/train.log"
echo "validation Dice by epoch: $(grep -o 'val_dice: [0-9.]*' "$OUT/train.log" | awk '{printf "%s ", $2}')"

brainseg synth "$OUT/dicom" --format dicom --cases 3 --seed 1 --size 96 96 16 --oblique
brainseg infer "$OUT/dicom" --out "$OUT/predictions" --checkpoint "$OUT/train/models/model.pt" --resume
brainseg evaluate "$OUT/predictions" --truth "$OUT/dicom" --source dicom --out "$OUT/report" --train-dir "$OUT/train"

opened="$OUT/report/report.html and $OUT/predictions/SYN_0001/overlay.png"
patient=../shared/data/lgg/kaggle_3m/TCGA_CS_4941_19960909
if [[ -d "$patient" ]]; then
    brainseg infer "$patient" --out "$OUT/shipped_model" --resume
    opened="$opened; the shipped model on a real patient: $OUT/shipped_model/TCGA_CS_4941_19960909/overlay.png"
fi
echo "done in $(( (SECONDS - start) / 60 )) min $(( (SECONDS - start) % 60 )) s. Open $opened"
