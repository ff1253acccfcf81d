"""Read IDX files (the MNIST / Fashion-MNIST format) through fsspec.

An IDX file is a 4-byte magic ``00 00 <dtype> <ndim>``, ``ndim`` big-endian ``uint32`` sizes,
then the values in C order, big-endian. ``*-idx3-ubyte`` holds images ``(N, H, W)`` and
``*-idx1-ubyte`` labels ``(N,)``. Gzip-compressed files (``.gz``) are recognised by their
content, not their name. Whole files are read into memory (full MNIST is 47 MB).
"""
from __future__ import annotations

import gzip
import re
import zlib

import numpy as np

from vae_model.errors import ShardError, StorageError
from vae_model.storage import StorageOptions, describe_storage_error, get_fs

# IDX type code -> big-endian numpy dtype
_DTYPES: dict[int, str] = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_IDX_NAME = re.compile(r"idx\d+-ubyte(\.gz)?$", re.IGNORECASE)
_LABEL_SWAPS = (("images-idx3-ubyte", "labels-idx1-ubyte"), ("images.idx3-ubyte", "labels.idx1-ubyte"))


def is_idx_url(url: str) -> bool:
    """Whether ``url`` names an IDX file (``...-idxN-ubyte`` with an optional ``.gz``)."""
    return bool(_IDX_NAME.search(url.rstrip("/")))


def read_idx(url: str, storage_options: StorageOptions = None) -> np.ndarray:
    """Read an IDX file (optionally gzip-compressed) into an array of native byte order.

    Raises:
        StorageError: The file cannot be read (missing, no access, ...).
        ShardError: The content is not a well-formed IDX file (bad magic, unknown type code,
            size mismatch, corrupt gzip).
    """
    fs, path = get_fs(url, storage_options)
    try:
        with fs.open(path, "rb") as f:
            raw = f.read()
    except Exception as exc:  # storage backends raise many types; report one line
        raise StorageError(describe_storage_error(url, exc)) from None
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as exc:
            raise ShardError(f"{url}: corrupt gzip data ({exc}); re-download the file") from None
    return parse_idx(raw, url)


def parse_idx(raw: bytes, url: str = "<bytes>") -> np.ndarray:
    """Parse uncompressed IDX bytes; ``url`` only names the source in error messages."""
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise ShardError(f"{url}: not an IDX file (magic {raw[:4].hex() or 'missing'}, "
                         "expected 0000<type><ndim>); pass a *-idx3-ubyte images file")
    code, ndim = raw[2], raw[3]
    if code not in _DTYPES:
        raise ShardError(f"{url}: unknown IDX type code 0x{code:02x} "
                         f"(expected one of {', '.join(f'0x{c:02x}' for c in _DTYPES)})")
    if ndim == 0:
        raise ShardError(f"{url}: IDX header declares 0 dimensions")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ShardError(f"{url}: truncated IDX header ({len(raw)} bytes, need {header} for {ndim} dims)")
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    dtype = np.dtype(_DTYPES[code])
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    found = len(raw) - header
    if found != expected:
        raise ShardError(f"{url}: IDX data is {found} bytes but the header's shape {dims} needs {expected}; "
                         "the file is truncated or corrupt")
    arr = np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims)
    return arr.astype(dtype.newbyteorder("="))  # native byte order, writable copy


def labels_url_for(images_url: str, storage_options: StorageOptions = None) -> str | None:
    """The labels file beside an IDX images file, or ``None`` if there is none.

    ``.../train-images-idx3-ubyte.gz`` -> ``.../train-labels-idx1-ubyte.gz`` (the ``.gz`` suffix is
    kept; ``images.idx3-ubyte`` -> ``labels.idx1-ubyte`` too). Returned only if that file exists.
    """
    cut = images_url.rfind("/") + 1
    head, base = images_url[:cut], images_url[cut:]
    for old, new in _LABEL_SWAPS:
        pos = base.lower().rfind(old)
        if pos >= 0:
            candidate = head + base[:pos] + new + base[pos + len(old):]
            break
    else:
        return None
    fs, path = get_fs(candidate, storage_options)
    try:
        return candidate if fs.isfile(path) else None
    except Exception as exc:
        raise StorageError(describe_storage_error(candidate, exc)) from None
