#!/usr/bin/env bash
# Train the learned T1 models with real compute: on a lent GPU host (the `device` tool's `run`), from a training
# pack, inside one call; then calibrate (and register) what comes back, here on the CPU.
#
#   here, once:  python scripts/pack_training_cache.py     # build/gpu/training_pack.npz (about 14 MiB)
#                bash scripts/gpu_train.sh wheels           # MONAI + einops wheels into build/gpu/wheels (the
#                                                           # GPU image has torch but not these; no network there)
#   on the GPU:  device `run`, carry ["build/gpu/training_pack.npz", "build/gpu/wheels"], timeout_s 600:
#                bash scripts/gpu_train.sh train 8 ldm dae  # 8 minutes of training in all, shared by the models
#   back here:   bash scripts/gpu_train.sh finish DIR [register]
#                # DIR: the call's files_at; unpacks each model, calibrates it on the manifest's calibration split
#                # into build/gpu/models/NAME; `register` then copies it into Resources/Models (replacing the
#                # shipped model of that name and dropping its recorded metrics: measure again, scripts/benchmark.py)
#   CPU check:   DEVICE=cpu bash scripts/gpu_train.sh train 1 dae   # writes to build/gpu/out when OUT is unset
#
# `train` installs the carried wheels if MONAI is missing, trains each model for its share of the minutes (a
# two-stage model, dpa or ldm, splits its share between its stages) with bf16 autocast and channels-last on CUDA,
# and leaves one NAME.tar per model (model folder + training report, at most 16 MiB each) and gpu_train.log in $OUT.
# Settings (environment): DEVICE (auto), BATCH (128 on CUDA, 32 on the CPU), LR (the engine's 2e-4), RESUME=1
# (continue each shipped model's training instead of starting afresh: scripts/resume_from_model.py).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PY:-python3}
PACK=${PACK:-build/gpu/training_pack.npz}
DATA=${DATA:-../shared/data}
source scripts/model_recipes.sh
source scripts/gpu_host.sh

ba() { PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" "$PY" -m BrainAnomalyLib.cli "$@"; }

# `brainanomaly train` alone: the full CLI imports the preprocessing (SimpleITK), which the GPU image lacks.
ba_train() {
    PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" "$PY" -c \
        'import sys; from BrainAnomalyLib.cli.main import main; sys.exit(main(["train", *sys.argv[1:]], ("train",)))' \
        "$@"
}

case "${1:-}" in
wheels)
    mkdir -p "$WHEELS"
    # Pure-Python wheels, the versions requirements.txt pins; torch, numpy, scipy, safetensors, matplotlib and
    # pillow are on the GPU image already.
    "$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 -d "$WHEELS" "$(grep '^monai==' requirements.txt)" \
        "$(grep '^einops==' requirements.txt)"
    du -sh build/gpu
    ;;
train)
    shift
    MINUTES=${1:?usage: gpu_train.sh train MINUTES MODEL...}
    shift
    MODELS=("$@")
    [ ${#MODELS[@]} -gt 0 ] || { echo "name at least one model (dae, cae, dpa, ldm)" >&2; exit 2; }
    for m in "${MODELS[@]}"; do recipe "$m" >/dev/null; done  # an unknown name stops before any training
    OUT=${OUT:-$ROOT/build/gpu/out}
    mkdir -p "$OUT"
    [ -f "$PACK" ] || { echo "no training pack at $PACK: run scripts/pack_training_cache.py first" >&2; exit 2; }
    use_carried_wheels "$WHEELS"
    DEVICE=${DEVICE:-auto}
    if [ "$DEVICE" = auto ]; then
        DEVICE=$("$PY" -c 'import torch; print("cuda" if torch.cuda.is_available() else "cpu")')
    fi
    if [ "$DEVICE" = cpu ]; then BATCH=${BATCH:-32}; STEPS=(--steps-per-epoch 80); else BATCH=${BATCH:-128}; STEPS=(); fi
    WORK=$(mktemp -d)
    trap 'rm -rf "$WORK"' EXIT
    # A share of the minutes per model, 85 % of it training (the rest: the voxel statistics, saving, start-up).
    SHARE=$("$PY" -c "import sys; print(round(0.85 * float(sys.argv[1]) / int(sys.argv[2]), 2))" "$MINUTES" \
        "${#MODELS[@]}")
    {
        echo "gpu_train: ${MODELS[*]} on $DEVICE, batch $BATCH, $SHARE min each; $(date -u +%FT%TZ)"
        [ "$DEVICE" = cpu ] || nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
        for m in "${MODELS[@]}"; do
            recipe "$m"
            NAME=$m-t1-ixi
            STAGE_MIN=$SHARE
            case "$m" in dpa|ldm) STAGE_MIN=$("$PY" -c "print(round($SHARE / 2, 2))") ;; esac
            EXTRA=()
            [ -z "${LR:-}" ] || EXTRA+=(--lr "$LR")
            [ "$HALF" = 1 ] && EXTRA+=(--half)
            if [ "${RESUME:-0}" = 1 ]; then
                PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" "$PY" scripts/resume_from_model.py \
                    "Resources/Models/$NAME" "$WORK/$NAME.checkpoints"
                EXTRA+=(--resume)
                STAGE_MIN=$SHARE  # a resumed two-stage model trains its second stage only
            fi
            start=$(date +%s)
            ba_train --model "$m" --pack "$PACK" --name "$NAME" -o "$WORK/$NAME" --device "$DEVICE" \
                --batch-size "$BATCH" --epochs 100000 --max-minutes "$STAGE_MIN" --realism-samples 0 -q \
                "${STEPS[@]}" "${RECIPE[@]}" "${EXTRA[@]}"
            tar -C "$WORK" -cf "$OUT/$NAME.tar" "$NAME"
            echo "$NAME: $(( $(date +%s) - start )) s, $(du -h "$OUT/$NAME.tar" | cut -f1)"
            "$PY" - "$WORK/$NAME/model.json" <<'PYEOF'
import json, sys
t = json.load(open(sys.argv[1]))["params"]["training"]
for part, h in t["history"].items():
    print(f"  {part}: {h['epochs_run']} epochs, best val {h['best_val_loss']:.5g} at epoch {h['best_epoch']}, "
          f"{h['total_seconds']:.0f} s ({h['stop_reason']}); {t['n_train_slices']} training slices")
PYEOF
        done
        echo "gpu_train: done $(date -u +%FT%TZ)"
    } 2>&1 | tee "$OUT/gpu_train.log"
    ;;
finish)
    FROM=${2:?usage: gpu_train.sh finish DIR [register]}
    shopt -s nullglob
    TARS=("$FROM"/*.tar)
    [ ${#TARS[@]} -gt 0 ] || { echo "no model tars (NAME.tar) in $FROM" >&2; exit 2; }
    mkdir -p build/gpu/models
    for tarball in "${TARS[@]}"; do
        NAME=$(basename "$tarball" .tar)
        rm -rf "build/gpu/models/$NAME"
        tar -C build/gpu/models -xf "$tarball"
        ba calibrate --model "build/gpu/models/$NAME" --manifest "$DATA/ixi_t1_2mm.csv" --split calibration -q
        if [ "${3:-}" = register ]; then
            recipe "${NAME%%-*}"
            ARGS=(--card "Resources/Models/$NAME/MODEL_CARD.md")
            [ "$HALF" = 1 ] && ARGS+=(--half)
            PYTHONPATH="$ROOT" "$PY" scripts/register_model.py "build/gpu/models/$NAME" "${ARGS[@]}"
        fi
    done
    ;;
*)
    sed -n '2,24p' "$0"
    exit 2
    ;;
esac
