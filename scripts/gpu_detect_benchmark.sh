#!/usr/bin/env bash
# Time detection on a lent GPU (the `device` tool's `run`), in one call of at most 10 minutes. The GPU image has
# torch but not SimpleITK, nibabel, nilearn or deepbet, and SimpleITK's wheel alone would not fit in what a call
# carries (64 MiB with the ~42 MB of tracked files), so the steps that need it run here first:
#
#   here, once:  bash scripts/gpu_train.sh wheels          # MONAI + einops wheels into build/gpu/wheels
#                bash scripts/gpu_detect_benchmark.sh pack  # detect on the CPU (ensemble-t1-ixi, the first scan of
#                                                           # /work/verify/brats_T1.csv) -> build/gpu/detect_pack.npz
#   on the GPU:  device `run`, carry ["build/gpu/detect_pack.npz", "build/gpu/wheels"], timeout_s 600:
#                bash scripts/gpu_detect_benchmark.sh run
#                # -> $OUT/gpu_detect_benchmark.json: end_to_end_s (median of 3 after a warm-up) and each step
#   CPU check:   DEVICE=cpu bash scripts/gpu_detect_benchmark.sh run   # writes build/gpu/out when OUT is unset
#
# What `run` times, and what it leaves out, is in scripts/gpu_detect_benchmark.py's docstring and in the JSON.
# Settings (environment): DEVICE (auto), REPEATS (3), PACK (build/gpu/detect_pack.npz).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PY:-python3}
PACK=${PACK:-build/gpu/detect_pack.npz}
source scripts/gpu_host.sh

case "${1:-}" in
pack)
    PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" "$PY" scripts/gpu_detect_benchmark.py pack --out "$PACK"
    du -sh "$PACK" "$WHEELS" 2>/dev/null || true
    ;;
run)
    OUT=${OUT:-$ROOT/build/gpu/out}
    mkdir -p "$OUT"
    [ -f "$PACK" ] || { echo "no pack at $PACK: run 'bash scripts/gpu_detect_benchmark.sh pack' here first" >&2; exit 2; }
    use_carried_wheels "$WHEELS"
    { [ "${DEVICE:-auto}" = cpu ] || nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true; } \
        2>&1 | tee "$OUT/gpu_detect_benchmark.log"
    PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" "$PY" scripts/gpu_detect_benchmark.py run --pack "$PACK" \
        --device "${DEVICE:-auto}" --repeats "${REPEATS:-3}" --json "$OUT/gpu_detect_benchmark.json" \
        2>&1 | tee -a "$OUT/gpu_detect_benchmark.log"
    ;;
*)
    sed -n '2,17p' "$0"
    exit 2
    ;;
esac
