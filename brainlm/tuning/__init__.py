"""Ray Tune sweeps (``brainlm tune finetune|perturb|scale``, ``cli``): the Ray side of brainlm.

- ``finetune_sweep``: ASHA over FinetuneConfig knobs; every trial runs ``train_one`` (what ``brainlm finetune``
  runs) on data loaded once by ``load_data`` on the driver and shared through Ray's object store; the best
  trial's model is registered as ``brainlm-finetuned-<target>`` with alias ``champion``.
- ``perturb_sweep``: ASHA over PerturbConfig knobs; every trial runs ``optimise`` (what ``brainlm perturb``
  runs), scored by ``perturb_score``.
- ``scale_sweep``: a grid of width x depth x mask ratio x compute budget; every trial runs
  ``brainlm.training.pretrain.run`` (what ``brainlm pretrain`` runs) for budget / (FLOPs per sample x
  global batch) steps; ends in a figure and tables of validation masked R^2 against compute and parameters.

A scaling trial is one process (a world of one) on the resources it is given. To spread one trial over several
GPUs on a cluster, run ``scale_trial``'s call of ``pretrain.run`` inside a Ray Train ``TorchTrainer`` (one worker
per GPU, ``ScalingConfig(num_workers=N, use_gpu=True)``) and pass the trainer to the Tuner instead of the
function: every worker calls ``pretrain.run`` with RANK / WORLD_SIZE / MASTER_ADDR from Ray Train, exactly as
under torchrun, and rank 0 reports. Not built here: one CPU process per trial is what a laptop needs.

Search spaces are YAML files whose keys are config fields (``load_space``). MLflow: one parent run per sweep
and a child per trial, written from the driver only (``MLflowTrials``, through ``brainlm.tracking.sweeps.SweepRuns``):
trials send results back, so parallel trials never contend for a sqlite store.

Modules: ``options`` (``SweepOptions``: how any sweep runs), ``space`` (search spaces), ``session`` (the Ray
session), ``trials`` (the MLflow callback and value formatting), ``template`` (``SweepSpec``, ``run_sweep``: the one
skeleton every sweep runs), ``report`` (``finish_sweep``: the tables, figure and parent run), ``ranked``
(``ConfigSweep``: a sweep over a config's knobs declared as data, run by ``run_config_sweep``), ``finetune`` and
``perturb`` (one ``ConfigSweep`` each: ``FINETUNE``, ``PERTURB``), ``scale`` (a grid ``SweepSpec``), ``cli`` (the
command line). ray is imported in this package only, on first use of a name below.
"""

import importlib
from typing import Any

# Each public name and the module holding it: imported on first use (PEP 562), so `brainlm tune --help` and the
# command line's parsing run before ray is imported.
_HOME = {
    "ConfigSweep": "ranked",
    "run_config_sweep": "ranked",
    "FINETUNE": "finetune",
    "PERTURB": "perturb",
    "finetune_sweep": "finetune",
    "finetune_trial": "finetune",
    "perturb_score": "perturb",
    "perturb_sweep": "perturb",
    "perturb_trial": "perturb",
    "Shape": "scale",
    "plan_shape": "scale",
    "scale_sweep": "scale",
    "scale_trial": "scale",
    "SweepOptions": "options",
    "ray_session": "session",
    "FINETUNE_FIXED": "space",
    "PERTURB_FIXED": "space",
    "SPACES": "space",
    "Dist": "space",
    "apply_config": "space",
    "load_space": "space",
    "MLflowTrials": "trials",
}


def __getattr__(name: str) -> Any:
    if name not in _HOME:
        raise AttributeError(f"module 'brainlm.tuning' has no attribute {name!r}")
    return getattr(importlib.import_module(f"brainlm.tuning.{_HOME[name]}"), name)


__all__ = [
    "FINETUNE",
    "FINETUNE_FIXED",
    "PERTURB",
    "PERTURB_FIXED",
    "SPACES",
    "ConfigSweep",
    "Dist",
    "MLflowTrials",
    "Shape",
    "SweepOptions",
    "apply_config",
    "finetune_sweep",
    "finetune_trial",
    "load_space",
    "perturb_score",
    "perturb_sweep",
    "perturb_trial",
    "plan_shape",
    "ray_session",
    "run_config_sweep",
    "scale_sweep",
    "scale_trial",
]
