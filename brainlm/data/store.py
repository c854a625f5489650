"""Object store access: a local folder (the embedded default) or ``s3://bucket/prefix`` through boto3.

Every write is atomic: a reader sees either the whole object or nothing. Locally a temporary file is
renamed into place; on S3 an object becomes visible only when its (multipart) upload completes. The S3
endpoint and credentials come from boto3's standard chain (``AWS_ENDPOINT_URL`` /
``AWS_ENDPOINT_URL_S3``, ``AWS_ACCESS_KEY_ID`` ...), so the same code runs against AWS, MinIO or
SeaweedFS. boto3 is imported here and nowhere else.
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import IO, Protocol
from urllib.parse import urlparse

from brainlm import atomic
from brainlm.exceptions import StoreError

CHUNK = 8 * 1024 * 1024


def sha256_stream(stream: IO[bytes]) -> tuple[str, int]:
    """sha256 hex digest and byte count of a stream."""
    digest, size = hashlib.sha256(), 0
    while chunk := stream.read(CHUNK):
        digest.update(chunk)
        size += len(chunk)
    return digest.hexdigest(), size


def sha256_file(path: str | Path) -> tuple[str, int]:
    with open(path, "rb") as f:
        return sha256_stream(f)


class Store(Protocol):
    """What the rest of the code needs from an object store. Keys are ``/``-separated relative paths."""

    url: str

    def url_of(self, key: str) -> str: ...
    def exists(self, key: str) -> bool: ...
    def size(self, key: str) -> int: ...
    def read_bytes(self, key: str) -> bytes: ...
    def write_bytes(self, key: str, data: bytes, metadata: dict[str, str] | None = None) -> None: ...
    def upload_file(
        self,
        path: str | Path,
        key: str,
        metadata: dict[str, str] | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> None: ...
    def open(self, key: str) -> IO[bytes]: ...
    def list(self, prefix: str = "") -> list[str]: ...
    def delete(self, key: str) -> None: ...
    def metadata(self, key: str) -> dict[str, str]: ...


def _clean_key(key: str) -> str:
    key = key.strip("/")
    if not key or any(part in ("", ".", "..") for part in key.split("/")):
        raise StoreError(f"invalid object key {key!r}: expected a relative path like 'shards/train/x.tar'")
    return key


class LocalStore:
    """A folder on a local or shared file system."""

    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser().resolve()
        self.url = str(self.root)

    def _path(self, key: str) -> Path:
        return self.root / _clean_key(key)

    def url_of(self, key: str) -> str:
        return str(self._path(key))

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def size(self, key: str) -> int:
        return self._path(key).stat().st_size

    def read_bytes(self, key: str) -> bytes:
        path = self._path(key)
        try:
            return path.read_bytes()
        except FileNotFoundError:
            raise StoreError(f"{path} does not exist") from None

    def write_bytes(self, key: str, data: bytes, metadata: dict[str, str] | None = None) -> None:
        atomic.write_bytes(self._path(key), data)

    def upload_file(
        self,
        path: str | Path,
        key: str,
        metadata: dict[str, str] | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> None:
        def copy(tmp: str) -> None:
            with open(path, "rb") as src, open(tmp, "wb") as dst:
                while chunk := src.read(CHUNK):
                    dst.write(chunk)
                    if progress:
                        progress(len(chunk))

        atomic.write_all([(self._path(key), copy)])

    def open(self, key: str) -> IO[bytes]:
        return open(self._path(key), "rb")

    def list(self, prefix: str = "") -> list[str]:
        base = self.root / prefix.strip("/") if prefix.strip("/") else self.root
        if not base.exists():
            return []
        out = []
        for p in base.rglob("*"):
            if p.is_file() and not p.name.startswith("."):
                out.append(p.relative_to(self.root).as_posix())
        return sorted(out)

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def metadata(self, key: str) -> dict[str, str]:
        return {}

    def remove_stale_temporaries(self) -> int:
        """Delete temporary files a killed writer left behind; returns how many."""
        count = 0
        if self.root.exists():
            for p in self.root.rglob(".*.tmp"):
                p.unlink(missing_ok=True)
                count += 1
        return count


_clients: dict[tuple[int, int], object] = {}
_clients_lock = threading.Lock()


def s3_client():
    """One boto3 client per process and thread (boto3 clients must not cross a fork)."""
    ident = (os.getpid(), threading.get_ident())
    with _clients_lock:
        client = _clients.get(ident)
        if client is None:
            import boto3
            from botocore.config import Config

            # Bounded: a store that stops answering is an error after ATTEMPTS x TIMEOUT, not a silent wait.
            timeout = float(os.environ.get("BRAINLM_S3_TIMEOUT_S", 30))
            attempts = int(os.environ.get("BRAINLM_S3_ATTEMPTS", 5))
            retries = {"max_attempts": attempts, "mode": "standard"}
            config = Config(retries=retries, connect_timeout=timeout, read_timeout=timeout)
            client = boto3.session.Session().client("s3", config=config)
            _clients[ident] = client
    return client


def unanswered(url: str, err: BaseException) -> StoreError | None:
    """A read that failed because the object store did not answer (a timeout, a dropped connection), as the
    project's storage error; None for any other error (the data's own fault, for the caller to judge)."""
    if isinstance(err, StoreError):
        return err
    if not type(err).__module__.startswith(("botocore", "urllib3", "requests", "socket")) and not isinstance(
        err, (TimeoutError, ConnectionError)
    ):
        return None
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or "the S3 endpoint"
    timeout = os.environ.get("BRAINLM_S3_TIMEOUT_S", "30")
    return StoreError(
        f"the object store at {endpoint} did not answer while {url} was read ({type(err).__name__}: {err}); the "
        f"data was not judged: check the store and re-run (reads give up after BRAINLM_S3_ATTEMPTS x "
        f"BRAINLM_S3_TIMEOUT_S = {os.environ.get('BRAINLM_S3_ATTEMPTS', '5')} x {timeout} s)"
    )


def _s3_error(op: str, url: str, err: Exception) -> StoreError:
    return StoreError(
        f"S3 {op} of {url} failed: {err}. Check the endpoint (AWS_ENDPOINT_URL / AWS_ENDPOINT_URL_S3), the "
        "credentials (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or a profile) and that the bucket exists."
    )


class S3Store:
    """``s3://bucket/prefix`` through boto3, with retries and multipart uploads."""

    def __init__(self, url: str):
        parsed = urlparse(url)
        if parsed.scheme != "s3" or not parsed.netloc:
            raise StoreError(f"expected an URL like s3://bucket/prefix, got {url!r}")
        self.bucket = parsed.netloc
        self.prefix = parsed.path.strip("/")
        self.url = f"s3://{self.bucket}/{self.prefix}".rstrip("/")

    def _key(self, key: str) -> str:
        key = _clean_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def url_of(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._key(key)}"

    def _head(self, key: str) -> dict | None:
        from botocore.exceptions import ClientError

        try:
            return s3_client().head_object(Bucket=self.bucket, Key=self._key(key))
        except ClientError as err:
            if err.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return None
            raise _s3_error("HEAD", self.url_of(key), err) from err

    def exists(self, key: str) -> bool:
        return self._head(key) is not None

    def size(self, key: str) -> int:
        head = self._head(key)
        if head is None:
            raise StoreError(f"{self.url_of(key)} does not exist")
        return int(head["ContentLength"])

    def metadata(self, key: str) -> dict[str, str]:
        head = self._head(key)
        return dict(head.get("Metadata", {})) if head else {}

    def read_bytes(self, key: str) -> bytes:
        with self.open(key) as f:
            return f.read()

    def write_bytes(self, key: str, data: bytes, metadata: dict[str, str] | None = None) -> None:
        try:
            s3_client().put_object(Bucket=self.bucket, Key=self._key(key), Body=data, Metadata=metadata or {})
        except Exception as err:
            raise _s3_error("PUT", self.url_of(key), err) from err

    def upload_file(
        self,
        path: str | Path,
        key: str,
        metadata: dict[str, str] | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> None:
        from boto3.s3.transfer import TransferConfig

        config = TransferConfig(multipart_threshold=64 * 1024 * 1024, multipart_chunksize=64 * 1024 * 1024)
        try:
            s3_client().upload_file(
                str(path),
                self.bucket,
                self._key(key),
                ExtraArgs={"Metadata": metadata or {}},
                Config=config,
                Callback=progress,
            )
        except Exception as err:
            raise _s3_error("upload", self.url_of(key), err) from err

    def open(self, key: str) -> IO[bytes]:
        from botocore.exceptions import ClientError

        try:
            return s3_client().get_object(Bucket=self.bucket, Key=self._key(key))["Body"]
        except ClientError as err:
            raise _s3_error("GET", self.url_of(key), err) from err

    def list(self, prefix: str = "") -> list[str]:
        full = self._key(prefix) if prefix.strip("/") else self.prefix
        full = f"{full}/" if full else ""
        out = []
        try:
            pages = s3_client().get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=full)
            for page in pages:
                for obj in page.get("Contents", []):
                    rel = obj["Key"][len(self.prefix) + 1 :] if self.prefix else obj["Key"]
                    out.append(rel)
        except Exception as err:
            raise _s3_error("LIST", f"s3://{self.bucket}/{full}", err) from err
        return sorted(out)

    def delete(self, key: str) -> None:
        try:
            s3_client().delete_object(Bucket=self.bucket, Key=self._key(key))
        except Exception as err:
            raise _s3_error("DELETE", self.url_of(key), err) from err


def open_store(url: str | Path) -> LocalStore | S3Store:
    """The store behind ``url``: a local path, ``file://path`` or ``s3://bucket/prefix``."""
    url = str(url)
    parsed = urlparse(url)
    if parsed.scheme == "s3":
        return S3Store(url)
    if parsed.scheme == "file":
        return LocalStore(parsed.path)
    if parsed.scheme == "" or len(parsed.scheme) == 1:  # a plain path (or a Windows drive letter)
        return LocalStore(url)
    raise StoreError(f"unsupported store URL {url!r}: use a local path, file://PATH or s3://BUCKET/PREFIX")


def split_url(url: str) -> tuple[str, str]:
    """``s3://b/p/manifest.json`` -> (``s3://b/p``, ``manifest.json``)."""
    url = str(url).rstrip("/")
    head, _, tail = url.rpartition("/")
    return head, tail


# -- WebDataset ``s3://`` support -------------------------------------------------------------------------


class _BufferedBody(io.RawIOBase):
    """A readable raw stream over a botocore StreamingBody, so it can be wrapped in a BufferedReader."""

    def __init__(self, body):
        self.body = body

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        data = self.body.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def close(self) -> None:
        self.body.close()
        super().close()


def gopen_s3(url: str, mode: str = "rb", bufsize: int = 8192, **_: object) -> IO[bytes]:
    """WebDataset gopen handler: stream ``s3://bucket/key`` with this process's boto3 client."""
    if mode != "rb":
        raise StoreError(f"the s3 gopen handler only reads; got mode {mode!r} for {url}")
    parsed = urlparse(url)
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        body = s3_client().get_object(Bucket=parsed.netloc, Key=parsed.path.lstrip("/"))["Body"]
    except ClientError as err:
        raise _s3_error("GET", url, err) from err
    except BotoCoreError as err:  # no answer (timeouts, connection errors): the store's fault, said so
        raise unanswered(url, err) from err
    return io.BufferedReader(_BufferedBody(body), buffer_size=max(bufsize, 1024 * 1024))


def register_webdataset_s3() -> None:
    """Teach WebDataset to open ``s3://`` URLs (idempotent; call in every process that reads shards)."""
    import importlib

    # ``webdataset.gopen`` as an attribute is the gopen function; the module holds the dispatch table.
    importlib.import_module("webdataset.gopen").gopen_schemes["s3"] = gopen_s3


def copy_tree(src: str, dst: str) -> None:
    """Copy every object under one store URL to another (for pushing local shards to S3)."""
    s, d = open_store(src), open_store(dst)
    for key in s.list():
        if isinstance(s, LocalStore):
            d.upload_file(s._path(key), key)
        else:
            with tempfile.NamedTemporaryFile() as tmp, s.open(key) as f:
                shutil.copyfileobj(f, tmp)
                tmp.flush()
                d.upload_file(tmp.name, key)
