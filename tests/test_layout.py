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
    "mlflow": ["brainlm/tracking/"],
    "ray": ["brainlm/tuning/"],
    "fsspec": ["brainlm/data/store.py"],  # every object store (s3fs for S3) behind one Store
    "s3fs": ["brainlm/data/store.py"],
    "boto3": [],  # s3fs reaches S3; nothing of ours talks to boto3 directly
    "botocore": ["brainlm/data/store.py"],
    "nibabel": ["brainlm/recordings/", "data_prep/", "brainlm/plots.py"],
    "nilearn": ["brainlm/recordings/", "data_prep/", "brainlm/plots.py"],
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
        "import sys, brainlm.model, brainlm.training.recipe; "
        "bad = sorted({'deepspeed', 'ray', 'mlflow', 'boto3', 's3fs', 'nibabel', 'nilearn', 'webdataset'} & "
        "{m.split('.')[0] for m in sys.modules}); print(','.join(bad))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "", f"importing brainlm.model imported {proc.stdout.strip()}"


# The import layers, lowest first: a module may import its own layer and those below, never one above, and no
# import circle may form anywhere (tests/test_layout.py is the contract; docs in each package's docstring).
LAYERS = [
    (
        "brainlm._version",
        "brainlm.exceptions",
        "brainlm.atomic",
        "brainlm.lock",
        "brainlm.logs",
        "brainlm.masking",
        "brainlm.progress",
        "brainlm.schema",
        "brainlm.scores",
        "brainlm.threads",
    ),
    ("brainlm.model",),
    ("brainlm.data",),
    ("brainlm.protocol", "brainlm.recordings", "brainlm.plots"),
    ("brainlm.tracking", "data_prep"),
    ("brainlm.eval",),
    ("brainlm.training",),
    ("brainlm.tuning",),
    ("brainlm.cli", "brainlm.api", "launcher", "brainlm"),  # the package itself is the facade over everything
]


def module_graph() -> dict[str, set[str]]:
    """Every first-party module -> the first-party modules it imports (anywhere in the file, lazily or not)."""
    files = {}
    for path in [*ROOT.glob("brainlm/**/*.py"), *ROOT.glob("data_prep/*.py"), *ROOT.glob("launcher/*.py")]:
        parts = path.relative_to(ROOT).with_suffix("").parts
        files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph = {}
    for name, path in files.items():
        deps = set()
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):  # `if TYPE_CHECKING:` imports count: a circle hidden there is still one
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                # `from pkg import mod` imports pkg.mod (and runs pkg's __init__, which is not a dependency on it)
                subs = [f"{node.module}.{a.name}" for a in node.names]
                targets = subs if all(t in files for t in subs) else [node.module, *subs]
            deps |= {t for t in targets if t in files and t != name}
        graph[name] = deps
    return graph


def layer_of(module: str) -> int:
    best = None
    for i, prefixes in enumerate(LAYERS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and (best is None or len(p) > len(best[1])):
                best = (i, p)
    assert best is not None, f"{module} belongs to no layer in LAYERS"
    return best[0]


def test_no_import_reaches_up_a_layer():
    upward = [
        f"{m} (layer {layer_of(m)}) imports {d} (layer {layer_of(d)})"
        for m, deps in sorted(module_graph().items())
        for d in sorted(deps)
        if layer_of(d) > layer_of(m)
    ]
    assert not upward, "imports that reach up a layer:\n" + "\n".join(upward)


# Imports the layers would allow but the design does not: (importer, imported, why).
FORBIDDEN = [
    ("brainlm", "data_prep", "the library stands on brainlm.recordings; the shard build stands on the library"),
    ("brainlm.training", "brainlm.eval", "training stands on the protocol, the analyses on training's output"),
    ("brainlm.data", "brainlm.model", "the loader draws masks from brainlm.masking; the data layer knows no model"),
]


# The one exception: the front door hands `brainlm data ...` to the build's own command line.
EXCEPTIONS = {("brainlm.cli", "data_prep.cli")}


@pytest.mark.parametrize(("importer", "imported", "why"), FORBIDDEN)
def test_forbidden_imports(importer, imported, why):
    def under(module: str, prefix: str) -> bool:
        return module == prefix or module.startswith(prefix + ".")

    offenders = sorted(
        f"{m} imports {d}"
        for m, deps in module_graph().items()
        if under(m, importer)
        for d in deps
        if under(d, imported) and (m, d) not in EXCEPTIONS
    )
    assert not offenders, f"{why}:\n" + "\n".join(offenders)


def test_no_import_circle():
    graph = module_graph()
    # A package imports its own modules (its __init__ re-exports them); that is not a circle through the package.
    edges = {m: {d for d in deps if not (m.startswith(d + "."))} for m, deps in graph.items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for d in sorted(edges[m]):
            if state.get(d) == 1:
                return [*stack[stack.index(d) :], d]
            if d not in state and (found := visit(d)):
                return found
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(edges):
        if m not in state and (circle := visit(m)):
            pytest.fail("import circle: " + " -> ".join(circle))


# The command lines: what they print is the command's output. Everything else says things through logging.
PRINTS = {
    "brainlm/cli.py",
    "brainlm/registry_cli.py",
    "brainlm/exceptions.py",  # exit_code: every command's one error line
    "brainlm/training/launch.py",
    "brainlm/tuning/cli.py",
    "data_prep/cli.py",
}


def test_only_the_command_lines_print():
    offenders = []
    for path in sorted([*ROOT.glob("brainlm/**/*.py"), *ROOT.glob("data_prep/**/*.py")]):
        rel = path.relative_to(ROOT).as_posix()
        calls = [
            n.lineno
            for n in ast.walk(ast.parse(path.read_text()))
            if isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id == "print"
        ]
        if calls and rel not in PRINTS:
            offenders.append(f"{rel}:{calls}")
    assert not offenders, f"print() in library code (log through logging.getLogger(__name__)): {offenders}"
