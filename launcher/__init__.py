"""Thin entry points: pretrain.py (DeepSpeed) and tune.py (Ray Tune)."""
