"""Exceptions raised by vaepipe's library code.

Every message says what went wrong and how to fix it; the CLI prints it as one line
and exits non-zero. Internal invariants use ``assert`` instead.
"""


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
