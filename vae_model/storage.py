"""fsspec helpers shared by checkpoints, shards and pipeline outputs.

URLs may be plain paths or any fsspec URL (``file://``, ``s3://``, ``gs://``, ``memory://``).
Endpoints and credentials come the usual fsspec/botocore way (``AWS_ENDPOINT_URL``,
``AWS_ACCESS_KEY_ID``...) or through ``storage_options``.

S3 retry policy (vaepipe's own, so a run behaves the same whatever botocore's defaults are):
each S3 request is tried up to ``S3_MAX_ATTEMPTS`` = 5 times by botocore's ``standard`` retry
mode (HTTP 500/502/503/504, throttling codes such as ``SlowDown``, refused/reset/closed
connections, timeouts), with jittered exponential backoff of at most 1, 2, 4, 8 s between
attempts. s3fs repeats a call up to ``S3FS_RETRIES`` = 3 times when its failure is one s3fs
knows to be transient: a dropped connection, also one *while reading a body* (a ranged GET of a
tar shard cut off halfway, which botocore alone cannot retry), or ``SlowDown`` after botocore
gave up. A refused connection (endpoint down) is not repeated by s3fs: a request to a stopped
server fails after botocore's 5 attempts, with at most 15 s of backoff. An endpoint that accepts
connections and drops every one is the slow worst case, because s3fs nests its loop (call and
body read) and aiohttp re-sends an idempotent request once on a dropped keep-alive connection:
a read then makes many times 5 attempts and can take minutes before it fails. botocore's
connect and read timeouts stay at s3fs's 5 s and 15 s. A ``retries`` entry in ``config_kwargs``
of the storage options replaces the botocore part, e.g.
``{"config_kwargs": {"retries": {"max_attempts": 10, "mode": "adaptive"}}}``.
"""
from __future__ import annotations

import json
import os
import uuid
from typing import Any

import fsspec
from fsspec.core import url_to_fs

from .errors import StorageError

StorageOptions = dict[str, Any] | None

S3_MAX_ATTEMPTS = 5  # botocore attempts per S3 request (first try included), "standard" mode
S3FS_RETRIES = 3  # s3fs attempts per call around botocore's (transient errors, incl. body reads)
_S3_PROTOCOLS = ("s3", "s3a")


def parse_storage_options(text: str | None) -> dict[str, Any]:
    """Parse a ``--storage-options`` JSON object (``None``/empty gives ``{}``)."""
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise StorageError(f"--storage-options is not valid JSON ({exc.msg}); pass an object such as "
                           '\'{"client_kwargs": {"endpoint_url": "http://..."}}\'') from None
    if not isinstance(value, dict):
        raise StorageError("--storage-options must be a JSON object, e.g. '{\"anon\": true}'")
    return value


def get_fs(url: str, storage_options: StorageOptions = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """Return ``(filesystem, path)`` for a URL, with a clear error for unknown protocols."""
    s3 = fsspec.core.split_protocol(url)[0] in _S3_PROTOCOLS
    try:
        fs, path = url_to_fs(url, **(with_s3_retries(storage_options) if s3 else (storage_options or {})))
    except (ImportError, ValueError) as exc:
        proto = url.split("://", 1)[0] if "://" in url else "file"
        hint = {"s3": "pip install 'vaepipe[s3]'", "gs": "pip install 'vaepipe[gcs]'", "gcs": "pip install 'vaepipe[gcs]'"}
        raise StorageError(f"cannot open {url!r}: {exc}. "
                           f"{hint.get(proto, 'install the fsspec backend for ' + repr(proto))}") from None
    if s3:
        fs.retries = S3FS_RETRIES  # s3fs takes its own loop count from an attribute, not a constructor argument
    return fs, path


def with_s3_retries(storage_options: StorageOptions) -> dict[str, Any]:
    """``storage_options`` plus vaepipe's botocore retry config, unless they already set one."""
    so = dict(storage_options or {})
    config = dict(so.get("config_kwargs") or {})
    config.setdefault("retries", {"max_attempts": S3_MAX_ATTEMPTS, "mode": "standard"})
    so["config_kwargs"] = config
    return so


def fresh_fs(url: str, storage_options: StorageOptions = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """:func:`get_fs` for reading what another process may have written since this one looked.

    fsspec caches filesystem instances and object stores' directory listings; s3fs answers
    ``info``/``open``/``exists`` from a cached listing of the parent folder, so a file another
    process committed after that listing looks missing. This drops the path's cached listings.
    """
    fs, path = get_fs(url, storage_options)
    fs.invalidate_cache(path)  # s3fs/gcsfs drop the path and its parents; no-op for local files
    return fs, path


def unstrip(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """Turn a filesystem-internal path back into a full URL (``s3://b/k``, ``/abs/path``)."""
    return fs.unstrip_protocol(path) if _protocol(fs) not in ("file", "local") else path


def _protocol(fs: fsspec.AbstractFileSystem) -> str:
    proto = fs.protocol
    return proto[0] if isinstance(proto, (tuple, list)) else proto


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return _protocol(fs) in ("file", "local")


def join(url: str, *parts: str) -> str:
    """Join URL path components with ``/`` (works for local paths and object stores)."""
    out = url.rstrip("/")
    for p in parts:
        out = out + "/" + p.strip("/")
    return out


def describe_storage_error(url: str, exc: BaseException) -> str:
    """One-line description of a storage failure, naming the likely cause."""
    text = f"{type(exc).__name__}: {exc}".strip()
    # s3fs raises PermissionError("The request signature we calculated ...") from the botocore
    # ClientError that holds the error code (SignatureDoesNotMatch, InvalidAccessKeyId, AccessDenied).
    low = f"{text} {exc.__cause__!r}".lower() if exc.__cause__ is not None else text.lower()
    if "nosuchbucket" in low or "bucket does not exist" in low or "specified bucket does not exist" in low:
        cause = "the bucket does not exist"
    elif any(s in low for s in ("accessdenied", "access denied", "invalidaccesskeyid", "signaturedoesnotmatch",
                                "forbidden", "403")):
        cause = "access denied: check credentials (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or --storage-options)"
    elif isinstance(exc, FileNotFoundError):
        cause = "not found"
    elif isinstance(exc, PermissionError):
        cause = "permission denied"
    else:
        cause = text.splitlines()[0] if text else type(exc).__name__
    return f"{url}: {cause}"


def read_bytes(url: str, storage_options: StorageOptions = None) -> bytes:
    fs, path = get_fs(url, storage_options)
    try:
        with fs.open(path, "rb") as f:
            return f.read()
    except Exception as exc:  # storage backends raise many types; report one line
        raise StorageError(describe_storage_error(url, exc)) from None


def atomic_write_bytes(url: str, data: bytes, storage_options: StorageOptions = None) -> None:
    """Write ``data`` so that ``url`` never holds a partial file.

    Local (and other rename-capable) filesystems get a temp name in the same folder followed by
    an atomic rename; object stores get a single PUT, which becomes visible only when complete.
    """
    fs, path = get_fs(url, storage_options)
    try:
        if is_local(fs):
            parent = os.path.dirname(path) or "."
            os.makedirs(parent, exist_ok=True)
            tmp = os.path.join(parent, f".{os.path.basename(path)}.tmp-{uuid.uuid4().hex}")
            try:
                with open(tmp, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, path)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
        else:
            parent = path.rsplit("/", 1)[0]
            if _protocol(fs) == "memory":
                fs.makedirs(parent, exist_ok=True)
            fs.pipe_file(path, data)
    except StorageError:
        raise
    except Exception as exc:
        raise StorageError(describe_storage_error(url, exc)) from None


def exists(url: str, storage_options: StorageOptions = None) -> bool:
    fs, path = get_fs(url, storage_options)
    try:
        return fs.exists(path)
    except Exception as exc:
        raise StorageError(describe_storage_error(url, exc)) from None


def remove_if_exists(url: str, storage_options: StorageOptions = None) -> bool:
    """Delete the file at ``url`` if it is there (looked up past any cached listing: another
    process may have written or removed it); returns whether one was deleted."""
    fs, path = fresh_fs(url, storage_options)
    try:
        fs.rm(path)
    except FileNotFoundError:
        return False
    except Exception as exc:  # storage backends raise many types
        raise StorageError(describe_storage_error(url, exc)) from None
    return True
