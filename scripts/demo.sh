#!/usr/bin/env bash
# The main job end to end on the embedded defaults (`make demo`):
#   synthetic cohort -> shards in a local folder -> DeepSpeed pretraining on CPU (2 ranks, gloo)
#   -> masked reconstruction R^2 on the test split beside the baselines, with intervals -> the model in the MLflow
#   registry -> what its recording-level representations know, beside FC and the same model with random weights.
set -euo pipefail
cd "$(dirname "$0")/.."
DEMO_DIR=${DEMO_DIR:-demo}
mkdir -p "$DEMO_DIR"
DEMO_DIR=$(cd "$DEMO_DIR" && pwd)
export MLFLOW_TRACKING_URI=${MLFLOW_TRACKING_URI:-sqlite:///$DEMO_DIR/runs/mlflow.db}
PORT=$(python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
start=$(date +%s)

echo "== 1/5 synthetic cohort (40 subjects x 2 runs, Seitzman 300-ROI atlas, TR 0.72 s)"
brainlm data synth --out "$DEMO_DIR/cohort" --subjects 40 --seed 0

echo "== 2/5 shards (robust scaling fitted on training subjects, 200-step crops, WebDataset tars)"
brainlm data build --inputs "$DEMO_DIR/cohort" --out "$DEMO_DIR/shards" --workers 2

echo "== 3/5 pretraining: deepspeed --num_gpus 2 launcher/pretrain.py --deepspeed ds_config.json (CPU, gloo)"
mkdir -p "$DEMO_DIR/runs"
deepspeed --num_gpus 2 --master_port "$PORT" launcher/pretrain.py --deepspeed ds_config.json \
  --config configs/pretrain/debug.yaml --data.shards "$DEMO_DIR/shards" --train.out_dir "$DEMO_DIR/runs/debug" \
  2>&1 | grep --line-buffered -v '^\[20[0-9-]* [0-9:,]*\] \[INFO\]'

echo "== 4/5 reconstruction on the held-out test split, the model from the registry"
brainlm reconstruct --model models:/brainlm-debug@current --shards "$DEMO_DIR/shards" \
  --out "$DEMO_DIR/eval/reconstruct" --masking random,parcel

echo "== 5/5 recording representations: whose scan is it, and was it a task run (FC and random weights beside)"
brainlm fingerprint --model models:/brainlm-debug@current --shards "$DEMO_DIR/shards" \
  --out "$DEMO_DIR/eval/fingerprint" --split val,test --label condition

cat <<SUMMARY

== done in $(( $(date +%s) - start )) s
  cohort + ground truth  $DEMO_DIR/cohort  (truth.json)
  shards + manifest      $DEMO_DIR/shards/manifest.json   (brainlm data inspect $DEMO_DIR/shards)
  run folder             $DEMO_DIR/runs/debug  (checkpoints/, metrics.jsonl, reconstruction.png)
  exported model         $DEMO_DIR/runs/debug/model  = models:/brainlm-debug@current
  reconstruction         $DEMO_DIR/eval/reconstruct/metrics.json and *.png
  fingerprinting         $DEMO_DIR/eval/fingerprint/metrics.json
  MLflow UI              mlflow ui --backend-store-uri $MLFLOW_TRACKING_URI   (then open http://127.0.0.1:5000)
SUMMARY
