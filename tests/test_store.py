"""The object-store layer: one ``Store`` over fsspec for every URL, and ``ShardSet`` read from any of them."""

from __future__ import annotations

import http.server
import threading
import uuid

import pytest
import torch

from brainlm.data.loader import TrainLoader, fixed_samples
from brainlm.data.shardset import ShardSet
from brainlm.data.store import copy_tree, open_store
from brainlm.exceptions import ShardError, StoreError


def test_a_shard_set_reads_the_same_from_any_fsspec_url(tiny_shards):
    """fsspec's in-memory filesystem stands for any object store brainlm has no code of its own for (gs://, az://):
    the copy reads, verifies and trains exactly as the folder does."""
    url = f"memory://sets-{uuid.uuid4().hex[:8]}/tiny"
    copy_tree(str(tiny_shards), url)
    local, remote = ShardSet.open(tiny_shards), ShardSet.open(url)
    assert remote.manifest == local.manifest and remote.root == url
    assert remote.urls("train") == [f"{url}/{s['url']}" for s in local.manifest.shards_of("train")]
    assert remote.verify(progress=False) == []
    a, meta_a = fixed_samples(local, "val", 6, 20)
    b, meta_b = fixed_samples(remote, "val", 6, 20)
    assert torch.equal(a, b) and meta_a == meta_b
    batches = [[next(TrainLoader(s, "train", 4, 40, seed=2))["signal"] for _ in range(3)] for s in (local, remote)]
    assert all(torch.equal(x, y) for x, y in zip(*batches, strict=True))
    # a shard changed in place is found by the check
    key = local.manifest.shards_of("train")[0]["url"]
    data = remote.store.read_bytes(key)
    remote.store.write_bytes(key, data[:1000] + bytes(255 - b for b in data[1000:1100]) + data[1100:])
    assert [p.split(":")[0] for p in remote.verify(progress=False)] == [key]


def test_store_keys_listing_and_missing_objects(tmp_path):
    store = open_store(tmp_path / "s")
    store.write_bytes("a/b.json", b"{}")
    seen = []
    (tmp_path / "big.bin").write_bytes(b"x" * 100_000)
    store.upload_file(tmp_path / "big.bin", "a/c.bin", progress=seen.append)
    (tmp_path / "s" / "a" / ".c.bin.1234.tmp").write_bytes(b"partial")  # a killed writer's temporary
    assert store.list() == ["a/b.json", "a/c.bin"] and store.list("a") == ["a/b.json", "a/c.bin"]
    assert store.list("nothing") == [] and sum(seen) == 100_000 and store.size("a/c.bin") == 100_000
    assert store.remove_stale_temporaries() == 1
    store.delete("a/b.json")
    store.delete("a/b.json")  # deleting what is gone is no error
    with pytest.raises(StoreError, match=r"a/b\.json does not exist"):
        store.read_bytes("a/b.json")
    with pytest.raises(StoreError, match="invalid object key"):
        store.write_bytes("../outside", b"")
    with pytest.raises(ShardError, match=r"no manifest\.json under .*re-run it to resume"):
        ShardSet.open(tmp_path / "s")


def test_an_url_without_a_filesystem_says_what_to_install():
    with pytest.raises(
        StoreError, match=r"cannot open nosuchfs:// URLs here .*install fsspec's nosuchfs:// filesystem"
    ):
        open_store("nosuchfs://bucket/prefix")
    with pytest.raises(StoreError, match=r"expected an URL like s3://bucket/prefix"):
        open_store("s3://")
    with pytest.raises(StoreError, match=r"'s3:/bucket' is neither a path nor an URL"):
        open_store("s3:/bucket")


def test_listing_and_copying_on_a_non_local_filesystem(tmp_path):
    url = f"memory://list-{uuid.uuid4().hex[:8]}/set"
    store = open_store(url)
    store.write_bytes("a/b.json", b"{}")
    store.write_bytes("c.bin", b"1")
    assert store.list() == ["a/b.json", "c.bin"] and store.list("a") == ["a/b.json"]
    copy_tree(url, str(tmp_path / "copy"))
    assert open_store(tmp_path / "copy").list() == ["a/b.json", "c.bin"]
    with pytest.raises(StoreError, match="nothing to copy under"):
        copy_tree(f"{url}-misspelled", str(tmp_path / "none"))


class Refusing(http.server.BaseHTTPRequestHandler):
    """An S3 endpoint that refuses every request as AWS does an expired token: 403 AccessDenied."""

    def do_GET(self):
        body = b"<?xml version='1.0'?><Error><Code>AccessDenied</Code><Message>Access Denied</Message></Error>"
        self.send_response(403)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_a_store_that_refuses_a_read_is_said_as_such_not_a_corrupt_shard(monkeypatch):
    from brainlm.data.loader import read_shard

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Refusing)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        for name in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):  # over the test S3 server's, if one runs
            monkeypatch.setenv(name, f"http://127.0.0.1:{server.server_address[1]}")
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "expired")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "expired")
        with pytest.raises(StoreError, match=r"GET of s3://bucket/shards/train-000000\.tar failed \(PermissionError"):
            list(read_shard("s3://bucket/shards/train-000000.tar", None, 10))
    finally:
        server.shutdown()
