"""Failure behaviour, probed as a careful user and an attacker would: corrupt shards are refused at read time, a NaN
volume is named, a crafted checkpoint runs no code, one rank's error ends the job at once, two "nodes" on this
machine train the curve one node does, and bad inputs get messages instead of tracebacks."""

from __future__ import annotations

import json
import logging
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import psutil
import pytest

from brainlm.exceptions import ConfigError, InputError, ShardError
from tests.conftest import ROOT, free_port, run_cli
from tests.test_pretrain import COMMON, VENV_BIN, assert_same, deepspeed_cmd, losses, run

pytestmark = pytest.mark.slow


def args_for(shards: Path, out: Path, steps: int = 20, *extra: str) -> list[str]:
    return [
        "--data.shards", str(shards), "--train.micro_batch_size", "4", "--train.max_steps", str(steps),
        "--train.ckpt_every", "10", "--train.out_dir", str(out), "--tracking.enabled", "false", *extra,
    ]  # fmt: skip


# -- shards verified as they are read -------------------------------------------------------------------------


@pytest.fixture
def shards(tiny_shards, tmp_path) -> Path:
    copy = tmp_path / "shards"
    shutil.copytree(tiny_shards, copy)
    return copy


def first_train_shard(shards: Path) -> Path:
    manifest = json.loads((shards / "manifest.json").read_text())
    return shards / next(s["url"] for s in manifest["shards"] if s["split"] == "train")


def read_all(shards: Path, on_corrupt: str = "error") -> int:
    from brainlm.data.loader import read_shard
    from brainlm.data.shardset import ShardSet

    manifest = ShardSet.open(str(shards)).manifest
    info = manifest.shards_of("train")[0]
    return sum(1 for _ in read_shard(str(first_train_shard(shards)), info["digests"], info["samples"], on_corrupt))


def test_flipped_bytes_in_a_shard_are_refused_or_skipped(shards):
    assert read_all(shards) == 34
    import tarfile

    path = first_train_shard(shards)
    with tarfile.open(path) as tar:  # the payload of the 10th sample's signal, not a tar header
        member = [m for m in tar.getmembers() if m.name.endswith(".signal.npy")][10]
    data = bytearray(path.read_bytes())
    at = member.offset_data + member.size // 2
    data[at : at + 64] = bytes(b ^ 0xFF for b in data[at : at + 64])
    path.write_bytes(bytes(data))
    with pytest.raises(ShardError, match=r"train-000000.tar is corrupt: sample \d+ .* does not match its checksum"):
        read_all(shards)
    assert read_all(shards, on_corrupt="skip") == 33  # the bad sample is left out, the rest read


def test_a_member_claiming_more_than_its_shard_is_refused_before_it_is_read(shards):
    from brainlm.data.loader import read_shard

    path = first_train_shard(shards)
    data = bytearray(path.read_bytes())
    header = data[:512]  # the first member's tar header: its size field patched to 1 GiB, the checksum redone
    header[124:136] = b"%011o\x00" % (1 << 30)
    header[148:156] = b" " * 8
    header[148:156] = b"%06o\x00 " % sum(header)
    data[:512] = header
    path.write_bytes(bytes(data))
    with pytest.raises(ShardError, match=rf"member \S+ claims {1 << 30} bytes, more than the shard's {len(data)}"):
        list(read_shard(str(path), size=len(data)))


def test_a_truncated_shard_is_short_of_its_samples(shards):
    path = first_train_shard(shards)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])
    with pytest.raises(ShardError, match=r"is corrupt: .*(unreadable|sample\(s\) read but the manifest lists 34)"):
        read_all(shards)


def test_training_on_a_corrupt_shard_stops_naming_it(shards, tmp_path):
    path = first_train_shard(shards)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # a header cut off: the reader stops early
    proc = run(deepspeed_cmd(args_for(shards, tmp_path / "run", 40), ranks=1))  # every slot passes every shard
    assert proc.returncode != 0 and "train-000000.tar is corrupt" in proc.stdout + proc.stderr


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda m: m["shards"][0]["digests"].pop(), r"lists \d+ samples but \d+ sample checksums"),
        (lambda m: m["shards"][0].pop("digests"), r"shard entry 0 lacks digests"),
        (lambda m: m["shards"].append(dict(m["shards"][0])), r"is listed twice"),
        (lambda m: m["splits"]["train"].update(samples=1), r"split 'train' lists 1 samples, its shards \d+"),
        (lambda m: m["shards"][0].update(split="tset"), r"in split 'tset', not one of"),
    ],
)
def test_a_manifest_that_disagrees_with_itself_is_not_read(shards, damage, message):
    from brainlm.data.shardset import ShardSet

    manifest = json.loads((shards / "manifest.json").read_text())
    damage(manifest)
    (shards / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ShardError, match=message + ".*rebuild the shard set"):
        ShardSet.open(str(shards))
    proc = run_cli("-m", "data_prep", "inspect", str(shards))
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-2000:]


def test_skipping_corrupt_samples_ends_when_nothing_is_left_and_says_so_sparingly(shards, caplog):
    from brainlm.data.loader import TrainLoader
    from brainlm.data.shardset import ShardSet

    shard_set = ShardSet.open(str(shards))

    manifest = shard_set.manifest
    for info in manifest.shards_of("train"):  # every training shard cut short: nothing readable is left
        path = shards / info["url"]
        path.write_bytes(path.read_bytes()[:700])
    loader = TrainLoader(shard_set, "train", 4, 40, seed=0, on_corrupt="skip")
    with pytest.raises(ShardError, match=r"a whole pass over the 3 training shard\(s\) gave no readable sample"):
        next(loader)
    warnings = sum(r.levelno == logging.WARNING and "is corrupt" in r.getMessage() for r in caplog.records)
    assert 0 < warnings <= 3 * 4 * 3  # a few lines per shard and slot, not one per attempt
    # From a loader worker the error is the same one, not PyTorch's "Caught ShardError in DataLoader worker process 0"
    loader = TrainLoader(shard_set, "train", 4, 40, seed=0, num_workers=1, on_corrupt="skip")
    with pytest.raises(ShardError, match=r"^data.on_corrupt=skip: a whole pass over the 3 training shard") as caught:
        next(loader)
    assert "Caught" not in str(caught.value) and "Traceback" not in str(caught.value)


# -- NIfTI: a NaN volume is named -----------------------------------------------------------------------------


def test_a_nan_volume_is_named_not_zeroed(tmp_path):
    from data_prep.build import BuildConfig, build

    labels = np.zeros((6, 6, 6), np.int16)
    labels[:3] = 1
    labels[3:] = 2
    nib.save(nib.Nifti1Image(labels, np.eye(4)), tmp_path / "atlas_dseg.nii.gz")
    (tmp_path / "atlas.tsv").write_text("name\tx\ty\tz\na\t1\t2\t3\nb\t4\t5\t6\n")
    rng = np.random.default_rng(0)
    src = tmp_path / "in"
    src.mkdir()
    for s in range(1, 6):
        data = rng.standard_normal((6, 6, 6, 50)).astype(np.float32) + 100
        if s == 3:
            data[..., 5] = np.nan
        img = nib.Nifti1Image(data, np.eye(4))
        img.header.set_zooms((1, 1, 1, 2.0))
        nib.save(img, src / f"sub-{s}_task-rest_bold.nii.gz")
    m = build(
        BuildConfig(
            inputs=str(src), out=str(tmp_path / "out"), atlas=str(tmp_path / "atlas_dseg.nii.gz"),
            atlas_table=str(tmp_path / "atlas.tsv"), crop=20, val_frac=0, test_frac=0, progress=False,
        )
    )  # fmt: skip
    reason = {s["recording"]: s["reason"] for s in m.skipped}["sub-3_task-rest"]
    assert "1 volume(s) hold non-finite values (NaN or inf): volume 5 (216 voxels)" in reason


# -- checkpoints: nothing is unpickled ------------------------------------------------------------------------


class Exploit:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_crafted_checkpoint_runs_no_code(tiny_shards, tmp_path):
    out = tmp_path / "run"
    first = run(deepspeed_cmd(args_for(tiny_shards, out, 10), ranks=1))
    assert first.returncode == 0, first.stderr[-3000:]
    ckpt = out / "checkpoints" / "step_00000010"
    assert (ckpt / "rng_rank0.safetensors").exists() and not (ckpt / "rng_rank0.pt").exists()
    marker = tmp_path / "pwned"
    optim = next(ckpt.glob("*optim_states.pt"))
    optim.write_bytes(pickle.dumps(Exploit(str(marker))))
    resumed = run(deepspeed_cmd(args_for(tiny_shards, out, 20, "--train.resume", "auto"), ranks=1))
    assert resumed.returncode != 0 and not marker.exists()
    assert "holds objects a checkpoint should not" in resumed.stdout + resumed.stderr


# -- one rank's failure ends the job --------------------------------------------------------------------------


def test_a_killed_loader_worker_ends_the_job_within_a_minute(tiny_shards, tmp_path):
    out = tmp_path / "run"
    cmd = deepspeed_cmd(args_for(tiny_shards, out, 400, "--data.num_workers", "1", "--train.dist_timeout_s", "300"))
    proc = subprocess.Popen(
        cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
        env={**os.environ, "PATH": f"{VENV_BIN}:{os.environ['PATH']}"},
    )  # fmt: skip
    try:
        deadline = time.time() + 180
        workers = []
        while not workers:
            assert time.time() < deadline and proc.poll() is None, "no loader worker appeared"
            time.sleep(0.5)
            ranks = [p for p in psutil.Process(proc.pid).children(recursive=True) if "--local_rank=1" in p.cmdline()]
            workers = [c for r in ranks for c in r.children() if c.cmdline() == r.cmdline()]  # its forked loader worker
        time.sleep(2)  # training is under way
        killed = time.time()
        workers[0].send_signal(signal.SIGKILL)
        output, _ = proc.communicate(timeout=90)
        took = time.time() - killed
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode != 0 and took < 60, f"the job took {took:.0f} s to end"
    assert "rank 1: RuntimeError" in output and "DataLoader worker" in output, output[-3000:]


def test_every_process_group_gets_the_configured_timeout():
    """The groups DeepSpeed creates itself (new_group without a timeout) take torch's module default: 30 minutes
    unless it is set to train.dist_timeout_s first."""
    code = (
        "import torch.distributed as dist, torch.distributed.distributed_c10d as c;"
        " from brainlm.training import engine; engine.init_distributed(7); g = dist.new_group();"
        " print(c._get_default_timeout(c.Backend.GLOO).total_seconds()); dist.destroy_process_group()"
    )
    proc = run_cli("-c", code)
    assert proc.returncode == 0 and proc.stdout.split()[-1] == "7.0", proc.stdout + proc.stderr[-2000:]


def test_a_frozen_rank_ends_the_job_within_the_configured_timeout(tiny_shards, tmp_path):
    """SIGSTOP, not a kill: the frozen rank holds its sockets open, so only the collectives' timeout can end the job,
    DeepSpeed's own process groups included."""
    cmd = deepspeed_cmd(args_for(tiny_shards, tmp_path / "run", 5000, "--train.dist_timeout_s", "15"))
    proc = subprocess.Popen(
        cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
        env={**os.environ, "PATH": f"{VENV_BIN}:{os.environ['PATH']}"},
    )  # fmt: skip
    try:
        for line in proc.stdout:  # training under way on both ranks
            if line.startswith("step     20/"):
                break
        rank1 = [p for p in psutil.Process(proc.pid).children(recursive=True) if "--local_rank=1" in p.cmdline()]
        frozen = time.time()
        rank1[0].send_signal(signal.SIGSTOP)
        output, _ = proc.communicate(timeout=600)
        took = time.time() - frozen
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode != 0 and took < 15 + 90, f"the job took {took:.0f} s to end after the freeze"
    assert "timed out" in output.lower(), output[-3000:]


# -- two nodes on one machine ---------------------------------------------------------------------------------


def torchrun_node(node: int, port: int, args: list[str], log: Path) -> subprocess.Popen:
    cmd = [
        f"{VENV_BIN}/torchrun", "--nnodes", "2", "--node-rank", str(node), "--nproc-per-node", "1",
        "--master-addr", "127.0.0.1", "--master-port", str(port), "launcher/pretrain.py", "--deepspeed",
        "ds_config.json", *COMMON, *args,
    ]  # fmt: skip
    return subprocess.Popen(
        cmd, cwd=ROOT, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True,
        env={**os.environ, "PATH": f"{VENV_BIN}:{os.environ['PATH']}", "OMP_NUM_THREADS": "1"},
    )  # fmt: skip


def test_two_nodes_train_the_one_node_curve_and_resume(tiny_shards, tmp_path):
    one = tmp_path / "one"
    assert run(deepspeed_cmd(args_for(tiny_shards, one, 20))).returncode == 0
    two = tmp_path / "two"
    port = free_port()
    nodes = [torchrun_node(n, port, args_for(tiny_shards, two, 10), tmp_path / f"node{n}.log") for n in (0, 1)]
    assert [p.wait(300) for p in nodes] == [0, 0], (tmp_path / "node0.log").read_text()[-3000:]
    assert_same(losses(two), losses(one), range(1, 11))
    # Resume on both nodes continues the curve.
    port = free_port()
    resume = args_for(tiny_shards, two, 20, "--train.resume", "auto")
    nodes = [torchrun_node(n, port, resume, tmp_path / f"resume{n}.log") for n in (0, 1)]
    assert [p.wait(300) for p in nodes] == [0, 0], (tmp_path / "resume0.log").read_text()[-3000:]
    assert "resumed from" in (tmp_path / "resume0.log").read_text()
    assert_same(losses(two), losses(one), range(1, 21))
    # A node lost (its launcher and its ranks killed) ends the other node's job within the process-group timeout.
    port = free_port()
    long = args_for(tiny_shards, tmp_path / "long", 5000, "--train.dist_timeout_s", "30", "--train.log_every", "50")
    nodes = [torchrun_node(n, port, long, tmp_path / f"long{n}.log") for n in (0, 1)]
    deadline = time.time() + 180
    while "step" not in (tmp_path / "long0.log").read_text():
        assert time.time() < deadline and nodes[0].poll() is None, (tmp_path / "long0.log").read_text()[-2000:]
        time.sleep(0.5)
    for p in [*psutil.Process(nodes[1].pid).children(recursive=True), psutil.Process(nodes[1].pid)]:
        p.send_signal(signal.SIGKILL)
    start = time.time()
    assert nodes[0].wait(120) != 0 and time.time() - start < 90


# -- messages instead of tracebacks ---------------------------------------------------------------------------


def test_bad_inputs_get_messages_not_tracebacks(tiny_shards, tmp_path):
    from brainlm.model import BrainLM, get_preset
    from brainlm.training.ds_config import read_ds_config
    from brainlm.training.recipe import load_recipe

    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("model:\n  preset: debug\n   mask_ratio: 0.5\n")
    with pytest.raises(ConfigError, match=r"recipe .*bad.yaml is not valid YAML at line 3"):
        load_recipe(bad_yaml)
    bad_json = tmp_path / "ds.json"
    bad_json.write_text('{"train_batch_size": "auto",}')
    with pytest.raises(ConfigError, match=r"is not valid JSON: .* line 1"):
        read_ds_config(bad_json)
    ds = json.loads((ROOT / "ds_config.json").read_text())
    with pytest.raises(ConfigError, match=r"optimizer.type 'SGD'.*use AdamW or Adam"):
        read_ds_config({**ds, "optimizer": {"type": "SGD", "params": {}}})
    with pytest.raises(
        ConfigError, match=r"unknown DeepSpeed key\(s\) 'gradient_cliping' \(did you mean 'gradient_clipping'"
    ):
        read_ds_config({**ds, "gradient_cliping": 1.0})

    model_dir = tmp_path / "model"
    BrainLM(get_preset("debug", num_parcels=7)).save_pretrained(model_dir)
    weights = (model_dir / "model.safetensors").read_bytes()
    (model_dir / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    proc = run_cli("-m", "brainlm.cli", "reconstruct", "--model", str(model_dir), "--shards", str(tiny_shards),
                   "--out", str(tmp_path / "r"))  # fmt: skip
    assert proc.returncode == 2 and "truncated or damaged" in proc.stderr and "Traceback" not in proc.stderr
    (model_dir / "config.json").write_text("{not json")
    proc = run_cli("-m", "brainlm.cli", "reconstruct", "--model", str(model_dir), "--shards", str(tiny_shards),
                   "--out", str(tmp_path / "r"))  # fmt: skip
    assert proc.returncode == 2 and "config.json is not valid JSON" in proc.stderr and "Traceback" not in proc.stderr

    src = tmp_path / "arrays"
    src.mkdir()
    np.save(src / "a.npy", np.random.default_rng(0).standard_normal((7, 60)).astype(np.float32))
    rows = "".join(f"p{i}\t{i}\t0\t0\n" for i in range(6))

    def build(*extra: str) -> str:
        proc = run_cli("-m", "data_prep", "build", "--inputs", str(src), "--out", str(tmp_path / "o"), *extra)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
        return proc.stderr

    (src / "atlas.tsv").write_text("name\tx\ty\tz\n" + rows + "p6\tleft\t0\t0\n")
    (src / "recordings.tsv").write_text("file\tsubject\ttr\na.npy\ts1\tfast\n")
    assert "column x of row 7 (p6) is 'left'; expected MNI coordinates" in build()
    (src / "atlas.tsv").write_text("name\tx\ty\tz\n" + rows + "p6\t6\t0\t0\n")
    assert "missing.nii.gz: no such file" in build("--atlas", str(tmp_path / "missing.nii.gz"))
    assert "the tr of a.npy is 'fast'; expected seconds" in build()
    (src / "recordings.tsv").write_text("file\tsubject\ttr\na.npy\ts1\t0.7\n")
    assert "nope.tsv: no such file" in build("--splits", str(tmp_path / "nope.tsv"))
    (tmp_path / "latin1.tsv").write_bytes("subject\tsplit\nJos\xe9\ttrain\n".encode("latin-1"))
    assert "--splits" in (msg := build("--splits", str(tmp_path / "latin1.tsv"))) and "not UTF-8 text" in msg
    (src / "recordings.tsv").write_bytes("file\tsubject\ttr\na.npy\tJos\xe9\t0.7\n".encode("latin-1"))
    assert "recordings table" in (msg := build()) and "not UTF-8 text (a byte 0xe9)" in msg
    (src / "recordings.tsv").write_text("file\tsubject\ttr\na.npy\ts1\t0.7\n")
    # A file name that is not UTF-8 (it could not be written into the manifest) is refused before any work.
    (src / os.fsdecode(b"b\xff.npy")).write_bytes((src / "a.npy").read_bytes())
    assert "1 file name(s) are not UTF-8" in build() and not (tmp_path / "o" / "parcellated").exists()
    (src / os.fsdecode(b"b\xff.npy")).unlink()
    proc = run_cli("-m", "data_prep", "build", "--inputs", str(tmp_path / "empty"), "--out", str(tmp_path / "o"))
    assert proc.returncode == 2 and "no such folder" in proc.stderr and "atlas is needed" not in proc.stderr


def test_split_conflicts_are_errors_and_unknown_subjects_a_warning(tmp_path):
    from data_prep.build import read_split_file

    both = tmp_path / "both.tsv"
    both.write_text("subject\tsplit\ns1\ttrain\ns1\ttest\n")
    with pytest.raises(InputError, match="subject s1 is listed in train and test"):
        read_split_file(str(both))


def test_written_files_follow_the_umask(tiny_shards):
    mode = (tiny_shards / "manifest.json").stat().st_mode & 0o777
    shard = next((tiny_shards / "shards" / "train").glob("*.tar")).stat().st_mode & 0o777
    umask = os.umask(0)
    os.umask(umask)
    expected = 0o666 & ~umask
    assert mode == shard == expected, (oct(mode), oct(shard))


def test_a_resume_drops_the_line_a_kill_tore_and_a_save_clears_what_a_killed_save_left(tmp_path):
    from brainlm.model import BrainLM, get_preset
    from brainlm.training.pretrain import forget_after

    log = tmp_path / "metrics.jsonl"
    log.write_text('{"step": 10, "loss": 1.0}\n{"step": 20, "loss": 0.9}\n{"step": 30, "lo')  # killed mid-line
    forget_after(log, 20)
    assert log.read_text() == '{"step": 10, "loss": 1.0}\n{"step": 20, "loss": 0.9}\n'
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / ".config.json.abc123.tmp").write_text("{half")  # an export killed before its rename
    BrainLM(get_preset("debug", num_parcels=7)).save_pretrained(folder)
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]


def test_one_writer_per_folder_and_a_dead_holders_lock_is_taken_over(tiny_shards, tmp_path):
    import socket

    from brainlm.lock import NAME, FolderBusyError, FolderLock

    folder = tmp_path / "out"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    folder.mkdir()
    (folder / NAME).write_text(json.dumps({"host": socket.gethostname(), "pid": dead.pid, "what": "a build"}))
    with FolderLock(folder, "a test"):  # its holder is gone: stale, taken over
        assert json.loads((folder / NAME).read_text())["pid"] == os.getpid()
    assert not (folder / NAME).exists()  # released
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (folder / NAME).write_text(json.dumps({"host": socket.gethostname(), "pid": alive.pid, "what": "a build"}))
        with pytest.raises(FolderBusyError, match=rf"is in use by a build \(pid {alive.pid} on"):
            FolderLock(folder, "a test").acquire()
        from data_prep.build import BuildConfig, build

        cohort = Path(json.loads((tiny_shards / "manifest.json").read_text())["args"]["inputs"])
        with pytest.raises(FolderBusyError):  # a build into a folder another job holds: before anything is touched
            build(BuildConfig(inputs=str(cohort), out=str(folder), tr=0.8, crop=40, progress=False))
        assert sorted(p.name for p in folder.iterdir()) == [NAME]
    finally:
        alive.kill()


def test_a_second_training_into_the_same_folder_is_refused_naming_the_first(tiny_shards, tmp_path):
    out = tmp_path / "run"
    first = subprocess.Popen(
        [sys.executable, "launcher/pretrain.py", *COMMON, *args_for(tiny_shards, out, 400, "--train.ckpt_every", "0")],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        for _ in range(600):  # until the first holds the folder
            if (out / ".brainlm.lock").exists() or first.poll() is not None:
                break
            time.sleep(0.1)
        assert first.poll() is None, first.stdout.read()[-2000:]
        second = run([sys.executable, "launcher/pretrain.py", *COMMON, *args_for(tiny_shards, out, 5)])
        assert second.returncode != 0 and f"is in use by a pretraining run (pid {first.pid}" in second.stderr
    finally:
        first.kill()
        first.wait()


def test_a_crafted_model_folder_is_refused_before_anything_is_built(tmp_path):
    from brainlm.exceptions import CheckpointError
    from brainlm.model import BrainLM, get_preset

    folder = tmp_path / "m"
    BrainLM(get_preset("debug", num_parcels=7)).save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    for content, message in (
        ([1, 2], "holds a JSON list, not an object"),
        (None, "holds a JSON NoneType, not an object"),
        ({**config, "num_layers": 1_000_000}, r"num_layers 1000000 in config.json but 2 in the weights"),
        ({**config, "hidden_size": 65536}, r"hidden_size 65536 in config.json but 32 in the weights"),
        ({**config, "num_layers": "two"}, "is not a model config|not a"),
    ):
        (folder / "config.json").write_text(json.dumps(content))
        start = time.time()
        with pytest.raises((CheckpointError, ConfigError), match=message):
            BrainLM.from_pretrained(folder)
        assert time.time() - start < 5  # refused from the header, nothing built


@pytest.fixture
def small_disk(tmp_path):
    """A real 2 MiB file system (tmpfs), as root; skipped with the reason where it cannot be mounted."""
    mount = tmp_path / "disk"
    mount.mkdir()
    cmd = ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_fails_the_build_saying_so_and_a_rerun_loses_no_recording(array_cohort, small_disk):
    filler = small_disk / "filler"
    filler.write_bytes(b"\0" * (2 * 2**20 - 24 * 1024))  # leave room for a few parcellated recordings, not all
    out = small_disk / "shards"
    args = ("-m", "data_prep", "build", "--inputs", str(array_cohort), "--out", str(out), "--quiet", "--crop", "40")
    args += ("--tr", "0.8")
    proc = run_cli(*args)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "the disk is full (No space left on device)" in proc.stderr and "re-run the same command" in proc.stderr
    assert "Traceback" not in proc.stderr and not (out / "manifest.json").exists()
    records = [json.loads(p.read_text()) for p in (out / "parcellated").glob("*.json")]
    assert all(r["status"] == "ok" for r in records), records  # nothing blamed on a recording for the disk's fault
    filler.unlink()
    again = run_cli(*args)
    assert again.returncode == 0, again.stderr[-2000:]
    manifest = json.loads((out / "manifest.json").read_text())
    assert not manifest["skipped"] and len(manifest["recordings"]) == 12


def test_a_run_killed_between_export_and_registration_is_finished_by_a_rerun(tiny_shards, tmp_path):
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    out = tmp_path / "run"
    args = [*COMMON, *args_for(tiny_shards, out, 4), "--tracking.enabled", "true", "--tracking.tracking_uri", uri]
    args += ["--tracking.register_as", "brainlm-kill", "--tracking.experiment", "kill-test", "--train.resume", "auto"]
    first = subprocess.Popen(
        [sys.executable, "launcher/pretrain.py", *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, env={**os.environ, "MLFLOW_TRACKING_URI": uri},
    )  # fmt: skip
    for line in first.stdout:  # killed the moment the export is done: the registration never happens
        if line.startswith("exported "):
            first.send_signal(signal.SIGKILL)
            break
    first.wait()
    assert (out / "model" / "model.safetensors").exists()
    client = mlflow.MlflowClient(uri)
    assert not client.search_model_versions("name='brainlm-kill'")
    again = run([sys.executable, "launcher/pretrain.py", *args], MLFLOW_TRACKING_URI=uri)
    assert again.returncode == 0 and "already complete" in again.stdout, again.stderr[-2000:]
    versions = client.search_model_versions("name='brainlm-kill'")
    assert [int(v.version) for v in versions] == [1]
    (run_info,) = client.search_runs(client.get_experiment_by_name("kill-test").experiment_id)
    assert run_info.info.status == "FINISHED" and run_info.data.tags["brainlm.registered_version"] == "1"
    once_more = run([sys.executable, "launcher/pretrain.py", *args], MLFLOW_TRACKING_URI=uri)
    assert once_more.returncode == 0 and len(client.search_model_versions("name='brainlm-kill'")) == 1


def test_a_frozen_object_store_is_said_as_such_not_a_corrupt_shard(array_cohort, s3_server, s3_bucket, monkeypatch):
    from brainlm.data.loader import read_shard
    from brainlm.data.shardset import ShardSet
    from brainlm.exceptions import StoreError
    from data_prep.build import BuildConfig, build

    url = f"{s3_bucket}/frozen"
    build(BuildConfig(inputs=str(array_cohort), out=url, crop=20, stride=10, tr=0.8, progress=False))
    shard = ShardSet.open(url).urls("train")[0]
    monkeypatch.setenv("BRAINLM_S3_TIMEOUT_S", "2")
    monkeypatch.setenv("BRAINLM_S3_ATTEMPTS", "2")
    os.killpg(s3_server.pid, signal.SIGSTOP)
    try:
        start = time.time()
        with pytest.raises(StoreError, match=r"the object store at http://127.0.0.1:\d+ did not answer while .* read"):
            list(read_shard(shard, None, None))
        took = time.time() - start
    finally:
        os.killpg(s3_server.pid, signal.SIGCONT)
    assert took < 60, f"{took:.0f} s before the error"
    assert len(list(read_shard(shard, None, None))) > 0  # the same shard reads once the store answers again
