#!/usr/bin/env bash
# Retrain and register the shipped models from ../shared/data (about 30-40 min on 2 CPU cores, most of it
# preprocessing, which is cached in ~/.cache/brainanomaly so a second run takes seconds).
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-../shared/data}
OUT=${OUT:-build/models}
BA=.venv/bin/brainanomaly
PY=.venv/bin/python

$BA train --model normative --manifest "$DATA/ixi_t1_2mm.csv" --modality T1 --name normative-t1-ixi \
    -o "$OUT/normative-t1-ixi"
$BA train --model intensity --manifest "$DATA/ixi_t1_2mm.csv" --modality T1 --name intensity-t1 \
    -o "$OUT/intensity-t1"

$PY scripts/register_model.py "$OUT/normative-t1-ixi" --default --card docs/model_cards/normative-t1-ixi.md
$PY scripts/register_model.py "$OUT/intensity-t1" --card docs/model_cards/intensity-t1.md

# Learned T1 models (CPU settings used for the shipped ones; on a GPU raise --max-train/--max-minutes).
$BA train --model dae --manifest "$DATA/ixi_t1_2mm.csv" --modality T1 --name dae-t1-ixi -o "$OUT/dae-t1-ixi" \
    --max-train 70 --epochs 40 --patience 4 --max-minutes 42 --steps-per-epoch 80 --batch-size 32 --device cpu
$PY scripts/register_model.py "$OUT/dae-t1-ixi" --card docs/model_cards/dae-t1-ixi.md

# FLAIR and T2: no healthy cohort of those contrasts here, so the intensity scorer ships uncalibrated.
for M in flair t2; do
    $PY scripts/make_intensity_model.py --modality "$M" -o "$OUT/intensity-$M"
    $PY scripts/register_model.py "$OUT/intensity-$M" --card "docs/model_cards/intensity-$M.md"
done
