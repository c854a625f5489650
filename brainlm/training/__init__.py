"""Pretraining: the DeepSpeed engine, checkpoints and export, the schedule, MLflow tracking, the loop."""
