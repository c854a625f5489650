"""The benchmarks behind docs/benchmarks.md, run as modules from the repository root:

    python -m benchmarks.bench_model ...       # the model alone: a training step, beside HF ViTMAE; memory
    python -m benchmarks.bench_pretrain ...    # launcher/pretrain.py under torchrun; ZeRO memory
    python -m benchmarks.bench_data_prep ...   # data_prep build and the training loader's reads

or all of them with `bash benchmarks/run_all.sh` (`make bench`).
"""
