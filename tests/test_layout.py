"""The architecture rule: each heavy library is imported in one place, and the model imports torch only."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# library -> the files (or folders) allowed to import it
ALLOWED = {
    "deepspeed": ["brainlm/training/engine.py"],
    "mlflow": ["brainlm/training/tracking.py", "brainlm/registry.py"],
    "ray": ["launcher/tune.py", "brainlm/tuning/"],
    "boto3": ["brainlm/data/store.py"],
    "botocore": ["brainlm/data/store.py"],
    "nibabel": ["data_prep/", "brainlm/eval/plots.py"],
    "nilearn": ["data_prep/", "brainlm/eval/plots.py"],
}


def imports_of(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found


@pytest.mark.parametrize("library", sorted(ALLOWED))
def test_each_heavy_library_lives_in_one_place(library):
    offenders = []
    for path in sorted([*ROOT.glob("brainlm/**/*.py"), *ROOT.glob("data_prep/**/*.py"), *ROOT.glob("launcher/*.py")]):
        rel = path.relative_to(ROOT).as_posix()
        if library in imports_of(path) and not any(rel.startswith(a) for a in ALLOWED[library]):
            offenders.append(rel)
    assert not offenders, f"{library} imported outside {ALLOWED[library]}: {offenders}"


def test_importing_the_model_pulls_in_no_infrastructure():
    code = (
        "import sys, brainlm.model, brainlm.config; "
        "bad = sorted({'deepspeed', 'ray', 'mlflow', 'boto3', 'nibabel', 'nilearn', 'webdataset'} & "
        "{m.split('.')[0] for m in sys.modules}); print(','.join(bad))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "", f"importing brainlm.model imported {proc.stdout.strip()}"
