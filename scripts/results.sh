#!/usr/bin/env bash
# Reproduces docs/results.md: a synthetic cohort of 150 subjects x 2 runs (300 recordings), the debug
# recipe trained longer (2 ranks on CPU), and the five analyses. Output under ${RESULTS_DIR:-results}.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${RESULTS_DIR:-results}
STEPS=${STEPS:-4000}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
export MLFLOW_TRACKING_URI=${MLFLOW_TRACKING_URI:-sqlite:///$OUT/mlflow.db}
PORT=$(python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')

python -m data_prep synth --out "$OUT/cohort" --subjects 150 --seed 1
python -m data_prep build --inputs "$OUT/cohort" --out "$OUT/shards" --workers 2 --val-frac 0.15 --test-frac 0.2
deepspeed --num_gpus 2 --master_port "$PORT" launcher/pretrain.py --deepspeed ds_config.json \
  --config configs/pretrain/debug.yaml --data.shards "$OUT/shards" --train.out_dir "$OUT/runs/debug-long" \
  --train.max_steps "$STEPS" --train.log_every 200 --train.val_every 1000 --train.ckpt_every 1000 \
  --tracking.register_as brainlm-results 2>&1 | grep --line-buffered -v '^\[20[0-9-]* [0-9:,]*\] \[INFO\]'
M=models:/brainlm-results@current
S="$OUT/shards"
brainlm reconstruct --model $M --shards "$S" --out "$OUT/eval/reconstruct"
brainlm embed --model $M --shards "$S" --out "$OUT/eval/embed"
for target in age clinical_score null_trait; do
  brainlm finetune --model $M --shards "$S" --out "$OUT/eval/finetune-$target" --target $target --epochs 15 --seeds 3
  brainlm finetune --model $M --shards "$S" --out "$OUT/eval/probe-$target" --target $target --freeze --epochs 15 --seeds 3
done
brainlm finetune --model $M --shards "$S" --out "$OUT/eval/probe-sex" --target sex --task classification --freeze --epochs 15 --seeds 3
brainlm networks --model $M --shards "$S" --out "$OUT/eval/networks"
brainlm perturb --model $M --shards "$S" --out "$OUT/eval/perturb" --split train --max-windows 256
brainlm perturb --model $M --shards "$S" --out "$OUT/eval/perturb-gain" --split train --max-windows 256 --form gain_offset
brainlm attention --model $M --shards "$S" --out "$OUT/eval/attention" --group-by condition
python launcher/tune.py finetune --model $M --shards "$S" --target age --samples 6 --epochs 8 --num-cpus 2 \
  --cpus-per-trial 1 --name results-age --out "$OUT/sweeps/results-age"
