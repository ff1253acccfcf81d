"""Exceptions raised by vaepipe's library code.

Every message says what went wrong and how to fix it; the CLI prints it as one line
and exits non-zero. Internal invariants use ``assert`` instead.
"""
import re


class VaePipeError(Exception):
    """Base class: a user-facing error with an actionable one-line message."""


class ConfigError(VaePipeError, ValueError):
    """An invalid model or job configuration."""


class CheckpointError(VaePipeError):
    """A checkpoint that is missing, truncated, tampered with or incompatible."""


class StorageError(VaePipeError):
    """A storage URL that cannot be read or written (missing bucket, bad credentials, ...)."""


class NoShardsError(VaePipeError):
    """A data URL that matched no shards."""


class ShardError(VaePipeError):
    """A shard that cannot be read (truncated tar, unreadable Parquet, ...)."""


class ImageDecodeError(VaePipeError):
    """Bytes that do not decode to a usable image."""


# A worker's failure travels to the driver as text inside whatever the runner wraps it in (the
# DirectRunner's worker processes send a traceback string; Dask pickles the exception). The
# worker puts its cause on one marked line; the driver prints that line and nothing else.
WORKER_MARK = "[vaepipe worker] "


class WorkerError(VaePipeError):
    """A failure inside a pipeline worker, carrying its cause as one marked line."""


def describe_failure(exc: BaseException) -> str:
    """One line naming an exception's cause: the message of a vaepipe error, else ``Type: message``."""
    text = " ".join(str(exc).split())
    if isinstance(exc, VaePipeError):
        return text or type(exc).__name__
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def worker_error(exc: BaseException) -> WorkerError:
    """The exception a worker raises for ``exc``: its cause on one marked line."""
    if isinstance(exc, WorkerError):
        return exc
    cause = worker_failure(exc) or describe_failure(exc)
    return WorkerError(WORKER_MARK + cause)


def worker_failure(exc: BaseException) -> str | None:
    """The marked cause line inside ``exc`` (its message, args, causes and contexts), if any."""
    seen: set[int] = set()
    todo: list[BaseException] = [exc]
    while todo:
        e = todo.pop()
        if id(e) in seen:
            continue
        seen.add(id(e))
        for text in (str(e), *map(str, getattr(e, "args", ()))):
            at = text.find(WORKER_MARK)
            if at >= 0:
                rest = text[at + len(WORKER_MARK):]
                cause = re.split(r"\r?\n|\\n", rest, maxsplit=1)[0].strip().rstrip("'\"")
                if cause:
                    return cause
        todo.extend(x for x in (e.__cause__, e.__context__) if x is not None)
    return None
