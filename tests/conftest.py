"""Shared fixtures: real servers on free loopback ports, tiny cohorts written to disk."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tests.s3server import free_port, seaweedfs  # noqa: F401 (free_port is shared with the tests)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A real S3-compatible server on loopback ports for the whole session; boto3 finds it via AWS_* variables."""
    try:
        with seaweedfs(tmp_path_factory.mktemp("seaweedfs")) as server:
            yield server
    except RuntimeError as err:
        pytest.fail(str(err))


@pytest.fixture(scope="session")
def s3_endpoint(s3_server) -> str:
    return s3_server.endpoint


@pytest.fixture
def s3_bucket(s3_endpoint) -> str:
    """A fresh, empty bucket on the test S3 server; returns its s3:// URL."""
    import boto3

    name = f"test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3").create_bucket(Bucket=name)
    return f"s3://{name}"


# -- tiny cohorts --------------------------------------------------------------------------------------------

NETWORKS = ["Visual", "Visual", "DefaultMode", "DefaultMode", "DefaultMode", "Motor", "Motor"]


def write_atlas_table(path: Path, num_parcels: int = 7) -> Path:
    rng = np.random.default_rng(0)
    coords = rng.uniform(-60, 60, (num_parcels, 3)).round(2)
    pd.DataFrame(
        {
            "index": np.arange(1, num_parcels + 1),
            "name": [f"p{i}" for i in range(num_parcels)],
            "x": coords[:, 0],
            "y": coords[:, 1],
            "z": coords[:, 2],
            "network": (NETWORKS * (num_parcels // len(NETWORKS) + 1))[:num_parcels],
        }
    ).to_csv(path, sep="\t", index=False)
    return path


def make_signal(rng: np.random.Generator, num_parcels: int, timepoints: int) -> np.ndarray:
    """Slow random signals in scanner-like units, [R, T] float32."""
    white = rng.standard_normal((num_parcels, timepoints + 20))
    kernel = np.hanning(9)
    slow = np.stack([np.convolve(w, kernel, mode="valid")[:timepoints] for w in white])
    offsets = rng.uniform(500, 1500, (num_parcels, 1))
    return (offsets * (1 + 0.01 * slow)).astype(np.float32)


@pytest.fixture
def array_cohort(tmp_path) -> Path:
    """6 subjects x 2 runs of 7 parcels x 53 timepoints as .npy with BIDS names, an atlas table and phenotypes."""
    root = tmp_path / "cohort"
    root.mkdir()
    write_atlas_table(root / "atlas.tsv")
    rng = np.random.default_rng(1)
    for s in range(1, 7):
        for run in (1, 2):
            task = "rest" if run == 1 else "task"
            np.save(root / f"sub-{s:02d}_task-{task}_run-{run}_bold.npy", make_signal(rng, 7, 53))
    pd.DataFrame({"participant_id": [f"sub-{s:02d}" for s in range(1, 7)], "age": [21, 34, 45, 52, 67, 70]}).to_csv(
        root / "participants.tsv", sep="\t", index=False
    )
    return root


def run_cli(*args: str, env: dict | None = None, timeout: int | None = None) -> subprocess.CompletedProcess:
    """Run ``python -m ...`` in a subprocess from the repo root; returns the completed process. No time limit of its
    own: pytest-timeout guards every test (a slow machine makes the suite slower, not red), and subprocess.run kills
    the child when the guard fires."""
    return subprocess.run(
        [sys.executable, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def build_tiny(root: Path, parcels: int, seed: int, tr: float = 0.8):
    """A small array cohort (10 subjects x 2 runs of 90 timepoints) under ``root``/cohort, built into ``root``/shards
    at TR ``tr`` (0.8 s): crops of 40 timepoints (stride 10), shards of 34 crops. Returns the manifest."""
    from data_prep.build import BuildConfig, build

    src = root / "cohort"
    src.mkdir()
    write_atlas_table(src / "atlas.tsv", parcels)
    rng = np.random.default_rng(seed)
    subjects = [f"sub-{s:02d}" for s in range(1, 11)]
    for sub in subjects:
        for run, cond in ((1, "rest"), (2, "task")):
            np.save(src / f"{sub}_task-{cond}_run-{run}_bold.npy", make_signal(rng, parcels, 90))
    pd.DataFrame({"participant_id": subjects, "age": np.linspace(20, 80, len(subjects)).round(1)}).to_csv(
        src / "participants.tsv", sep="\t", index=False
    )
    return build(
        BuildConfig(
            inputs=str(src),
            out=str(root / "shards"),
            tr=tr,
            crop=40,
            stride=10,
            samples_per_shard=34,
            val_frac=0.1,
            test_frac=0.1,
            progress=False,
        )
    )


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory) -> Path:
    """A small local shard set: 7 parcels, crops of 40 timepoints, 3 uneven train shards (34, 34, 28 crops)."""
    root = tmp_path_factory.mktemp("tiny")
    m = build_tiny(root, 7, seed=3)
    assert [s["samples"] for s in m.shards_of("train")] == [34, 34, 28], m.shards_of("train")
    return root / "shards"


@pytest.fixture(scope="session")
def tiny_shards_5(tmp_path_factory) -> Path:
    """Another atlas (5 parcels), built as ``tiny_shards``: a second shard set for a mixture."""
    root = tmp_path_factory.mktemp("tiny5")
    build_tiny(root, 5, seed=4)
    return root / "shards"
