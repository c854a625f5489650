#!/usr/bin/env bash
# Run every benchmark with the settings behind docs/benchmarks.md; JSON (and a log per benchmark) under $1.
#
#   bash benchmarks/run_all.sh [OUT_DIR]        # default OUT_DIR: bench-results/   (`make bench` runs this)
#
# About 20 minutes on a quiet 2-core CPU: bench_model ~3-4 min, bench_pretrain ~7-8 min, bench_data_prep ~3 min,
# bench_baselines ~4 min.
# Each runs as a module (python -m benchmarks.bench_NAME) from the repository root.
# Environment: PYTHON (default: .venv/bin/python if present, else python), BENCH_WAIT_QUIET (seconds each
# benchmark first waits for other processes to leave the CPU; default 0), BENCH_SKIP_MODEL=1 (reuse
# OUT_DIR/model.json), BENCH_KEEP_WORK=1 (keep the scratch folder with cohorts, shards and runs).
set -euo pipefail
cd "$(dirname "$0")/.."

OUT="${1:-bench-results}"
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python; fi
fi
WAIT="${BENCH_WAIT_QUIET:-0}"
mkdir -p "$OUT"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/brainlm-bench.XXXXXX")"
cleanup() {
    if [[ "${BENCH_KEEP_WORK:-0}" == 1 ]]; then echo "scratch kept in $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT

stamp() { date -u +%Y-%m-%dT%H:%M:%SZ; }
echo "$(stamp) brainlm benchmarks -> $OUT (scratch $WORK)"
lscpu | grep -E '^(Model name|CPU\(s\)|Thread|Core)' || true

# 1. The model alone: a 13m training step (batch 8, mask 0.75, fp32) beside HF ViTMAE; sdpa vs math memory.
if [[ "${BENCH_SKIP_MODEL:-0}" != 1 ]]; then
    echo "$(stamp) benchmarks.bench_model"
    HF=()
    "$PYTHON" -c "import transformers" 2>/dev/null || HF=(--skip-hf)
    "$PYTHON" -m benchmarks.bench_model "${HF[@]}" --out "$OUT/model.json" 2>&1 | tee "$OUT/model.log"
fi

# 2. Pretraining through launcher/pretrain.py: debug and 13m, 1 and 2 ranks, ZeRO 0/1/2; memory per stage.
echo "$(stamp) benchmarks.bench_pretrain"
"$PYTHON" -m benchmarks.bench_pretrain --work "$WORK/pretrain" --wait-quiet "$WAIT" --out "$OUT/pretrain.json" \
    2>&1 | tee "$OUT/pretrain.log"

# 3. The data pipeline: build (arrays, NIfTI; 1 and 2 workers; local and S3) and reads; loader vs training.
echo "$(stamp) benchmarks.bench_data_prep"
"$PYTHON" -m benchmarks.bench_data_prep --work "$WORK/data_prep" --wait-quiet "$WAIT" --out "$OUT/data_prep.json" \
    --pretrain-json "$OUT/pretrain.json" --model-json "$OUT/model.json" 2>&1 | tee "$OUT/data_prep.log"

# 4. The reconstruction baselines: the spatio-temporal solve, blocked beside dense, at 94 and 300 parcels.
echo "$(stamp) benchmarks.bench_baselines"
"$PYTHON" -m benchmarks.bench_baselines --out "$OUT/baselines.json" 2>&1 | tee "$OUT/baselines.log"

# 5. One window through each released architecture (13M, ViT-MAE 111M and 650M) at full size.
echo "$(stamp) benchmarks.bench_releases"
"$PYTHON" -m benchmarks.bench_releases --out "$OUT/releases.json" 2>&1 | tee "$OUT/releases.log"

echo "$(stamp) done: $OUT/{model,pretrain,data_prep,baselines,releases}.json"
