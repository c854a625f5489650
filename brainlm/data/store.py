"""Object store access over fsspec: a local folder (the embedded default), ``s3://bucket/prefix`` (s3fs), or any
URL whose fsspec filesystem is installed (``gs://`` with gcsfs, ``az://`` with adlfs, ...).

Every write is atomic: a reader sees either the whole object or nothing. Locally a temporary file is renamed into
place (``brainlm.atomic``); in an object store an object becomes visible only when its (multipart) upload completes.
The S3 endpoint and credentials come from the standard AWS chain (``AWS_ENDPOINT_URL`` / ``AWS_ENDPOINT_URL_S3``,
``AWS_ACCESS_KEY_ID`` ...), so the same code runs against AWS, MinIO or SeaweedFS; reads give up after
``BRAINLM_S3_ATTEMPTS`` x ``BRAINLM_S3_TIMEOUT_S``. Writes and reads (shards streamed by WebDataset, Ray Tune's
storage) go through the same filesystem objects.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO
from urllib.parse import urlparse

import fsspec
from fsspec.asyn import sync
from fsspec.callbacks import DEFAULT_CALLBACK, Callback

from brainlm import atomic
from brainlm.exceptions import StoreError

CHUNK = 8 * 1024 * 1024
S3 = ("s3", "s3a")
# Object-store schemes WebDataset learns to open through fsspec (its own table has file, pipe, http(s), ...).
STREAMED = ("s3", "s3a", "gs", "gcs", "az", "abfs", "abfss")


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


def _endpoint() -> str | None:
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")


def _limits() -> tuple[float, int]:
    return float(os.environ.get("BRAINLM_S3_TIMEOUT_S", 30)), int(os.environ.get("BRAINLM_S3_ATTEMPTS", 5))


def _checksum_options() -> bool:
    """Whether this botocore knows the checksum settings (1.36 on; older ones add no checksums to refuse)."""
    from botocore.config import Config

    return "request_checksum_calculation" in Config.OPTION_DEFAULTS


_filesystems: dict[tuple, fsspec.AbstractFileSystem] = {}
CREDENTIALS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE")


def filesystem(protocol: str) -> fsspec.AbstractFileSystem:
    """This process's filesystem for ``protocol``, made once per process and settings (a forked DataLoader worker
    makes its own; new limits, endpoint or credentials in the environment make a new one)."""
    key = (
        os.getpid(),
        protocol,
        *((_limits(), _endpoint(), *map(os.environ.get, CREDENTIALS)) if protocol in S3 else ()),
    )
    if key not in _filesystems:
        _filesystems[key] = _make_filesystem(protocol)
    return _filesystems[key]


def _make_filesystem(protocol: str) -> fsspec.AbstractFileSystem:
    """S3 is bounded: a store that stops answering is an error after ATTEMPTS x TIMEOUT, not a silent wait; an
    S3-compatible endpoint gets the checksums it accepts (SeaweedFS refuses the ones newer AWS SDKs add to every
    upload)."""
    # Our own cache above decides when a filesystem is new: fsspec's would hand back one made under other settings
    # (botocore reads the endpoint and credentials when the filesystem is made).
    options: dict = {"skip_instance_cache": True}
    if protocol in S3:
        timeout, attempts = _limits()
        config = {
            "connect_timeout": timeout,
            "read_timeout": timeout,
            "retries": {"max_attempts": attempts, "mode": "standard"},
            # A loader holds one streamed shard per slot (open_url) at once, and a GET waits, without a timeout,
            # for a free connection: room for far more slots than a process serves.
            "max_pool_connections": 1024,
        }
        if _endpoint() and _checksum_options():
            config |= {"request_checksum_calculation": "when_required", "response_checksum_validation": "when_required"}
        # No listings cache: another process (a parallel build, a resumed one) writes the same prefix.
        options |= {"config_kwargs": config, "use_listings_cache": False}
    try:
        fs = fsspec.filesystem(protocol, **options)
    except (ImportError, ValueError) as err:
        extra = "pip install 'brainlm[s3]' (s3fs)" if protocol in S3 else f"install fsspec's {protocol}:// filesystem"
        raise StoreError(f"cannot open {protocol}:// URLs here ({err}): {extra}") from None
    if protocol in S3:
        fs.retries = 1  # botocore retries (ATTEMPTS); s3fs's own loop around it would multiply them
    return fs


def split_protocol(url: str) -> tuple[str, str]:
    """(protocol, path) of a store URL: ("file", absolute path) for a local path or ``file://``."""
    parsed = urlparse(url)
    if parsed.scheme == "file":
        return "file", str(Path(parsed.path).expanduser().resolve())
    if parsed.scheme == "" or len(parsed.scheme) == 1:  # a plain path (or a Windows drive letter)
        return "file", str(Path(url).expanduser().resolve())
    if "://" not in url:
        raise StoreError(f"{url!r} is neither a path nor an URL: use a folder, file://PATH or s3://BUCKET/PREFIX")
    return parsed.scheme, url.split("://", 1)[1].strip("/")


def _clean_key(key: str) -> str:
    key = key.strip("/")
    if not key or any(part in ("", ".", "..") for part in key.split("/")):
        raise StoreError(f"invalid object key {key!r}: expected a relative path like 'shards/train/x.tar'")
    return key


class _Progress(Callback):
    def __init__(self, progress: Callable[[int], None]):
        super().__init__()
        self.progress = progress

    def relative_update(self, inc: int = 1) -> None:
        self.progress(inc)


class Store:
    """A folder or an object-store prefix; keys are ``/``-separated paths relative to it."""

    def __init__(self, url: str | Path):
        url = str(url)
        self.protocol, self.root = split_protocol(url)
        self.local = self.protocol == "file"
        if not self.local and not self.root:
            raise StoreError(f"expected an URL like {self.protocol}://bucket/prefix, got {url!r}")
        self.fs = filesystem(self.protocol)
        self.url = self.root if self.local else f"{self.protocol}://{self.root}"

    def _path(self, key: str) -> str:
        return f"{self.root}/{_clean_key(key)}"

    def url_of(self, key: str) -> str:
        return self._path(key) if self.local else f"{self.protocol}://{self._path(key)}"

    @contextlib.contextmanager
    def _errors(self, op: str, key: str) -> Iterator[None]:
        """Store errors as the project's: a missing object said as such, anything else with what to check."""
        try:
            yield
        except FileNotFoundError:
            raise StoreError(f"{self.url_of(key)} does not exist") from None
        except StoreError:
            raise
        except Exception as err:
            if self.local or not _from_store(err):  # a local error says itself; a bug is not the store's
                raise
            raise _failed(op, self.url_of(key), self.protocol, err) from err

    def exists(self, key: str) -> bool:
        """Whether ``key`` is an object; a store that does not answer is an error, not False (fsspec's isfile
        would say False, and a build would redo what it has)."""
        if self.local:
            return Path(self._path(key)).is_file()
        with self._errors("HEAD", key):
            try:
                if self.protocol in S3:  # one HEAD (s3fs's info also lists the prefix when the key is missing)
                    return self.fs.metadata(self._path(key)) is not None
                return self.fs.info(self._path(key))["type"] == "file"
            except FileNotFoundError:
                return False

    def size(self, key: str) -> int:
        with self._errors("HEAD", key):
            return int(self.fs.size(self._path(key)))

    def metadata(self, key: str) -> dict[str, str]:
        """User metadata stored with an object (S3's ``x-amz-meta-*``); empty where the store keeps none."""
        if self.protocol not in S3:
            return {}
        with self._errors("HEAD", key):
            return dict(self.fs.metadata(self._path(key)))

    def _metadata_kwargs(self, metadata: dict[str, str] | None) -> dict:
        return {"Metadata": metadata} if metadata and self.protocol in S3 else {}

    def read_bytes(self, key: str) -> bytes:
        with self._errors("GET", key):
            return self.fs.cat_file(self._path(key))

    def write_bytes(self, key: str, data: bytes, metadata: dict[str, str] | None = None) -> None:
        if self.local:
            atomic.write_bytes(self._path(key), data)
            return
        with self._errors("PUT", key):
            self.fs.pipe_file(self._path(key), data, **self._metadata_kwargs(metadata))

    def upload_file(
        self,
        path: str | Path,
        key: str,
        metadata: dict[str, str] | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> None:
        if not self.local:
            callback = _Progress(progress) if progress else DEFAULT_CALLBACK
            with self._errors("upload", key):
                self.fs.put_file(str(path), self._path(key), callback=callback, **self._metadata_kwargs(metadata))
            return

        def copy(tmp: str) -> None:
            with open(path, "rb") as src, open(tmp, "wb") as dst:
                while chunk := src.read(CHUNK):
                    dst.write(chunk)
                    if progress:
                        progress(len(chunk))

        atomic.write_all([(Path(self._path(key)), copy)])

    def open(self, key: str) -> IO[bytes]:
        with self._errors("GET", key):
            return open_url(self.url_of(key))

    def list(self, prefix: str = "") -> list[str]:
        """Every object's key under ``prefix``, sorted; dot-files (a writer's temporaries) left out."""
        base = f"{self.root}/{prefix.strip('/')}" if prefix.strip("/") else self.root
        with self._errors("LIST", prefix or "."):
            found = self.fs.find(base) if self.fs.isdir(base) else []
        root = self.root.strip("/")  # memory:// answers "/bucket/key" for "bucket/key"
        keys = [p.strip("/")[len(root) + 1 :] for p in found]
        return sorted(k for k in keys if not any(part.startswith(".") for part in k.split("/")))

    def delete(self, key: str) -> None:
        with self._errors("DELETE", key), contextlib.suppress(FileNotFoundError):
            self.fs.rm_file(self._path(key))

    def remove_stale_temporaries(self) -> int:
        """Delete temporary files a killed local writer left behind; returns how many."""
        count = 0
        if self.local and Path(self.root).exists():
            for p in Path(self.root).rglob(".*.tmp"):
                p.unlink(missing_ok=True)
                count += 1
        return count


def open_store(url: str | Path) -> Store:
    """The store behind ``url``: a local path, ``file://PATH``, ``s3://BUCKET/PREFIX`` or another fsspec URL."""
    return Store(url)


def split_url(url: str) -> tuple[str, str]:
    """``s3://b/p/manifest.json`` -> (``s3://b/p``, ``manifest.json``)."""
    url = str(url).rstrip("/")
    head, _, tail = url.rpartition("/")
    return head, tail


CLIENT_MODULES = ("botocore", "aiobotocore", "aiohttp", "urllib3", "requests", "socket", "google", "azure")


def _from_store(err: BaseException) -> bool:
    """An error of the store or its client (s3fs says S3's refusals as OSError / PermissionError)."""
    return isinstance(err, OSError) or type(err).__module__.startswith(CLIENT_MODULES)


def _failed(op: str, url: str, protocol: str, err: BaseException) -> StoreError:
    """A request the store refused (or failed), with what to check."""
    where = (
        "the endpoint (AWS_ENDPOINT_URL / AWS_ENDPOINT_URL_S3), the credentials (AWS_ACCESS_KEY_ID / "
        "AWS_SECRET_ACCESS_KEY or a profile)"
        if protocol in S3
        else f"the {protocol} credentials"
    )
    return StoreError(f"{op} of {url} failed ({type(err).__name__}: {err}). Check {where} and that the bucket exists.")


def read_failure(url: str, protocol: str, err: BaseException) -> StoreError | None:
    """A shard read that failed through the store's fault, as the project's storage error: missing, unanswered or
    refused (403, 5xx); None for any other error (the data's own fault or a bug, for the caller to judge)."""
    if isinstance(err, FileNotFoundError):
        return StoreError(f"{url} does not exist")
    answer = unanswered(url, err)
    if answer is None and _from_store(err):
        return _failed("GET", url, protocol, err)
    return answer


def unanswered(url: str, err: BaseException) -> StoreError | None:
    """A read that failed because the object store did not answer (a timeout, a dropped connection), as the
    project's storage error; None for any other error (the data's own fault, for the caller to judge)."""
    if isinstance(err, StoreError):
        return err
    if not type(err).__module__.startswith(CLIENT_MODULES) and not isinstance(err, (TimeoutError, ConnectionError)):
        return None
    endpoint = _endpoint() or "the S3 endpoint"
    timeout, attempts = _limits()
    return StoreError(
        f"the object store at {endpoint} did not answer while {url} was read ({type(err).__name__}: {err}); the "
        f"data was not judged: check the store and re-run (reads give up after BRAINLM_S3_ATTEMPTS x "
        f"BRAINLM_S3_TIMEOUT_S = {attempts} x {timeout:g} s)"
    )


# -- reading shards: the loader opens them here; WebDataset pipelines of a user's own may register the same ---------


def open_url(url: str, mode: str = "rb", bufsize: int = CHUNK, **_: object) -> IO[bytes]:
    """A shard's byte stream: a local path, or an object-store URL through this process's fsspec filesystem (also
    WebDataset's gopen handler, after ``register_webdataset``)."""
    if mode != "rb":
        raise StoreError(f"shards are opened for reading only; got mode {mode!r} for {url}")
    protocol, path = split_protocol(url)
    if protocol == "file":
        return open(path, "rb")
    fs = filesystem(protocol)
    try:
        if protocol in S3:
            return io.BufferedReader(_Streamed(fs, protocol, path, url), buffer_size=max(bufsize, 1 << 20))
        return fs.open(path, "rb", block_size=max(bufsize, CHUNK))
    except Exception as err:
        failure = read_failure(url, protocol, err)
        if failure is None:
            raise
        raise failure from err


async def _read_up_to(file, size: int) -> bytes:
    """``size`` bytes, or what is left: the body gives what has arrived (tens of KiB), so one hop over to the event
    loop fills the whole buffer."""
    parts, got = [], 0
    while got < size:
        part = await file.read(size - got)
        if not part:
            break
        parts.append(part)
        got += len(part)
    return b"".join(parts)


class _Streamed(io.RawIOBase):
    """One GET, read as the reader consumes it (s3fs's streamed file driven from this thread): one request per shard
    and nothing fetched that is not read. fsspec's block-cached files fetch 8 MiB ranges instead, which read 0.8x as
    many crops/s through the training loader (docs/benchmarks.md, section 5b)."""

    def __init__(self, fs, protocol: str, path: str, url: str):
        self.fs, self.protocol, self.url = fs, protocol, url
        self.file = sync(fs.loop, fs.open_async, path, "rb")

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        try:
            data = sync(self.fs.loop, _read_up_to, self.file, len(buffer))
        except Exception as err:  # a refusal (403, 5xx) or no answer: the store's, never the shard's
            failure = read_failure(self.url, self.protocol, err)
            if failure is None:
                raise
            raise failure from err
        buffer[: len(data)] = data
        return len(data)

    def close(self) -> None:
        body = getattr(self.file, "r", None)  # the response: its connection goes back to the pool now, not at GC
        if body is not None and not self.closed:
            self.fs.loop.call_soon_threadsafe(body.close)
        super().close()


def register_webdataset() -> None:
    """Teach WebDataset to open object-store URLs through ``open_url`` (idempotent; per process), for a pipeline of
    your own over a shard set's URLs (``ShardSet.urls``); brainlm's own readers open shards directly."""
    import importlib

    # ``webdataset.gopen`` as an attribute is the gopen function; the module holds the dispatch table.
    schemes = importlib.import_module("webdataset.gopen").gopen_schemes
    for scheme in STREAMED:
        schemes[scheme] = open_url


def copy_tree(src: str, dst: str) -> None:
    """Copy every object under one store URL to another (for pushing local shards to S3)."""
    s, d = open_store(src), open_store(dst)
    keys = s.list()
    if not keys:
        raise StoreError(f"nothing to copy under {s.url}: check the source (a shard set's folder or prefix)")
    for key in keys:
        if s.local:
            d.upload_file(s.url_of(key), key)
        else:
            with tempfile.NamedTemporaryFile() as tmp, s.open(key) as f:
                shutil.copyfileobj(f, tmp)
                tmp.flush()
                d.upload_file(tmp.name, key)
