"""A small offline renderer for the subset of kustomize that deploy/k8s uses, for machines without kubectl.

    objects = build("deploy/k8s/overlays/dev")   # what `kubectl kustomize deploy/k8s/overlays/dev` prints

Supported: ``resources`` (files and kustomization folders), ``namespace``, ``images`` (name -> newName/newTag/
digest on every container and init container, custom resources included), ``patches`` given by ``path`` or inline
``patch``: strategic merge patches (lists merged by the Kubernetes merge keys below, other lists replaced, ``null``
deletes a key) and JSON 6902 patches (add/replace/remove) with a ``target``. Anything else is an error rather than a
silent difference: tests/test_deploy.py compares this renderer's output with kubectl's wherever kubectl exists.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

KUSTOMIZATION = "kustomization.yaml"
SUPPORTED = {"apiVersion", "kind", "resources", "namespace", "images", "patches"}
# Strategic merge keys of the lists the manifests patch (from the Kubernetes API's patchMergeKey tags).
MERGE_KEYS = {
    "containers": "name",
    "initContainers": "name",
    "env": "name",
    "volumes": "name",
    "volumeMounts": "mountPath",
    "ports": "containerPort",
}
CLUSTER_SCOPED = {
    "Namespace",
    "ClusterRole",
    "ClusterRoleBinding",
    "CustomResourceDefinition",
    "PersistentVolume",
    "StorageClass",
    "PriorityClass",
}


class KustomizeError(ValueError):
    """The kustomization uses something this renderer does not support, or is inconsistent."""


def load_documents(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def build(folder: str | Path) -> list[dict]:
    """The objects a kustomization folder renders to, in resource order."""
    folder = Path(folder)
    spec = yaml.safe_load((folder / KUSTOMIZATION).read_text()) or {}
    unknown = set(spec) - SUPPORTED
    if unknown:
        raise KustomizeError(f"{folder / KUSTOMIZATION}: unsupported fields {sorted(unknown)}")
    objects: list[dict] = []
    for entry in spec.get("resources", []):
        path = folder / entry
        objects += build(path) if path.is_dir() else load_documents(path)
    for patch in spec.get("patches", []):
        _apply_patch(objects, folder, patch)
    if "namespace" in spec:
        for obj in objects:
            if obj["kind"] not in CLUSTER_SCOPED:
                obj.setdefault("metadata", {})["namespace"] = spec["namespace"]
    for image in spec.get("images", []):
        for obj in objects:
            _set_images(obj, image)
    return objects


# -- patches ------------------------------------------------------------------------------------------------


def _apply_patch(objects: list[dict], folder: Path, patch: dict) -> None:
    if set(patch) - {"path", "patch", "target"}:
        raise KustomizeError(f"unsupported patch fields {sorted(set(patch) - {'path', 'patch', 'target'})}")
    text = (folder / patch["path"]).read_text() if "path" in patch else patch["patch"]
    docs = [d for d in yaml.safe_load_all(text) if d is not None]
    if len(docs) == 1 and isinstance(docs[0], list):  # JSON 6902
        if "target" not in patch:
            raise KustomizeError("a JSON 6902 patch needs a target")
        for obj in _select(objects, patch["target"]):
            for op in docs[0]:
                _json6902(obj, op)
        return
    for doc in docs:  # strategic merge, one object per document
        target = patch.get("target") or {"kind": doc["kind"], "name": doc["metadata"]["name"]}
        matches = _select(objects, target)
        if not matches:
            raise KustomizeError(f"patch target {target} matches no object")
        for obj in matches:
            merged = _merge(obj, doc)
            obj.clear()
            obj.update(merged)


def _select(objects: list[dict], target: dict) -> list[dict]:
    if set(target) - {"kind", "name", "group", "version"}:
        raise KustomizeError(f"unsupported target fields in {target}")
    found = []
    for obj in objects:
        group, _, version = obj["apiVersion"].rpartition("/")
        if (
            target.get("kind", obj["kind"]) != obj["kind"]
            or target.get("name", obj["metadata"]["name"]) != obj["metadata"]["name"]
        ):
            continue
        if target.get("group", group) != group or target.get("version", version) != version:
            continue
        found.append(obj)
    return found


def _merge(base: Any, patch: Any, key: str | None = None) -> Any:
    """Strategic merge of ``patch`` into ``base`` (a new value; neither argument changes)."""
    if isinstance(base, dict) and isinstance(patch, dict):
        if any(k.startswith("$") for k in patch):
            raise KustomizeError(f"patch directives are not supported: {[k for k in patch if k.startswith('$')]}")
        out = copy.deepcopy(base)
        for k, v in patch.items():
            if v is None:
                out.pop(k, None)
            elif k in out:
                out[k] = _merge(out[k], v, k)
            else:
                out[k] = copy.deepcopy(v)
        return out
    if isinstance(base, list) and isinstance(patch, list) and key in MERGE_KEYS:
        # kustomize's order: the patch's items (merged into their base items) first, then the other base items.
        merge_key = MERGE_KEYS[key]
        patched = [item.get(merge_key) for item in patch]
        out = []
        for item in patch:
            old = next((b for b in base if b.get(merge_key) == item.get(merge_key)), None)
            out.append(copy.deepcopy(item) if old is None else _merge(old, item))
        return out + [copy.deepcopy(b) for b in base if b.get(merge_key) not in patched]
    return copy.deepcopy(patch)


def _json6902(obj: dict, op: dict) -> None:
    parts = [p.replace("~1", "/").replace("~0", "~") for p in op["path"].lstrip("/").split("/")]
    parent = obj
    for part in parts[:-1]:
        parent = parent[int(part)] if isinstance(parent, list) else parent[part]
    last = parts[-1]
    kind = op["op"]
    if isinstance(parent, list):
        index = len(parent) if last == "-" else int(last)
        if kind == "add":
            parent.insert(index, copy.deepcopy(op["value"]))
        elif kind == "replace":
            parent[index] = copy.deepcopy(op["value"])
        elif kind == "remove":
            del parent[index]
        else:
            raise KustomizeError(f"unsupported JSON 6902 op {kind!r}")
        return
    if kind in ("add", "replace"):
        if kind == "replace" and last not in parent:
            raise KustomizeError(f"JSON 6902 replace of a missing path {op['path']}")
        parent[last] = copy.deepcopy(op["value"])
    elif kind == "remove":
        del parent[last]
    else:
        raise KustomizeError(f"unsupported JSON 6902 op {kind!r}")


# -- images -------------------------------------------------------------------------------------------------


def _image_name(image: str) -> str:
    name = image.split("@", 1)[0]
    head, sep, tail = name.rpartition(":")
    return head if sep and "/" not in tail else name


def _set_images(node: Any, image: dict) -> None:
    if isinstance(node, list):
        for item in node:
            _set_images(item, image)
        return
    if not isinstance(node, dict):
        return
    for key, value in node.items():
        if key in ("containers", "initContainers") and isinstance(value, list):
            for container in value:
                if isinstance(container.get("image"), str) and _image_name(container["image"]) == image["name"]:
                    container["image"] = _new_image(container["image"], image)
        _set_images(value, image)


def _new_image(old: str, image: dict) -> str:
    name = image.get("newName", image["name"])
    if "digest" in image:
        return f"{name}@{image['digest']}"
    tag = image.get("newTag")
    if tag is None:
        rest = old[len(_image_name(old)) :]
        return name + rest
    return f"{name}:{tag}"
