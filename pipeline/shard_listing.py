"""Listing shards: which files behind a URL, glob or folder are shards, and of which format.

Tar and Parquet files are one shard each; image files are grouped into shards of
``images_per_group``. Files and folders whose names start with ``.`` are ignored (temporary
files, macOS ``._*`` resource forks); other files that are neither shards nor images are ignored
with one warning line that counts them. Symbolic links to files are followed.
"""
from __future__ import annotations

import logging
import os
import re

import fsspec

from vae_model.errors import ConfigError, NoShardsError, ShardError, StorageError
from vae_model.storage import StorageOptions, describe_storage_error, get_fs, is_local, unstrip

from .decode import SUPPORTED_EXTS
from .shards import ShardSpec

log = logging.getLogger(__name__)

TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")


def suffix_kind(path: str) -> str | None:
    """``"tar"``, ``"parquet"`` or ``"images"`` by the file name's suffix; ``None`` for other files."""
    low = path.lower()
    if low.endswith(TAR_SUFFIXES):
        return "tar"
    if low.endswith(".parquet"):
        return "parquet"
    if "." in low.rsplit("/", 1)[-1] and low.rsplit(".", 1)[-1] in SUPPORTED_EXTS:
        return "images"
    return None


def rel_path(path: str, root: str) -> str:
    """``path`` relative to the folder ``root`` (its file name when it is not under ``root``)."""
    return path[len(root) + 1:] if root and path.startswith(root + "/") else path.rsplit("/", 1)[-1]


def list_files(url: str, storage_options: StorageOptions) -> tuple[fsspec.AbstractFileSystem, str, list[str]]:
    """Files matched by a file URL, a glob or a folder: ``(fs, root folder path, sorted file paths)``."""
    fs, path = get_fs(url, storage_options)
    try:
        magic = re.search(r"[*?\[]", path)
        if magic:
            root = path[:magic.start()].rsplit("/", 1)[0]
            found = fs.glob(path, detail=True)
        elif fs.isdir(path):
            root = path.rstrip("/")
            found = fs.find(root, detail=True)
        elif fs.isfile(path):
            root, found = path.rsplit("/", 1)[0] if "/" in path else "", {path: {"type": "file"}}
        else:
            root, found = path, {}
        bucket = path.split("/", 1)[0]
        # Object stores list a missing bucket as empty; say so rather than "no shards".
        bucket_missing = not found and not is_local(fs) and "memory" not in fs.protocol and not fs.exists(bucket)
    except StorageError:
        raise
    except Exception as exc:  # storage backends raise many types; report one line
        raise StorageError(describe_storage_error(url, exc)) from None
    if bucket_missing:
        raise StorageError(f"{url}: the bucket does not exist")
    files = sorted(p for p, info in found.items()
                   if _is_file(fs, p, info) and not any(part.startswith(".") for part in rel_path(p, root).split("/")))
    return fs, root, files


def _is_file(fs: fsspec.AbstractFileSystem, path: str, info: dict) -> bool:
    """A regular file, or a symbolic link to one (local listings report links as ``other``). A
    dangling link counts too: its image becomes a dead letter instead of vanishing unseen."""
    if info.get("type") == "file":
        return True
    if not info.get("islink"):
        return False
    try:
        return fs.info(path).get("type") == "file"  # follows the link
    except FileNotFoundError:
        return True


def check_output_outside_input(data_url: str, out_url: str, storage_options: StorageOptions = None) -> None:
    """Refuse an output folder at or under an input *folder* (not a glob or a file): the next
    listing of that folder would take the run's own Parquet files as shards."""
    fs_in, path_in = get_fs(data_url, storage_options)
    fs_out, path_out = get_fs(out_url, storage_options)
    if type(fs_in) is not type(fs_out) or re.search(r"[*?\[]", path_in):
        return
    try:
        if not fs_in.isdir(path_in):
            return
    except Exception:  # listing problems are expand_shards' to report
        return
    root, out = path_in.rstrip("/"), path_out.rstrip("/")
    if is_local(fs_in):
        root, out = os.path.realpath(root), os.path.realpath(out)
    if out == root or out.startswith(root + "/"):
        raise ConfigError(f"--out {out_url} is inside the input folder {data_url}: the next run over that folder "
                          "would read this run's Parquet output as shards; write it elsewhere")


def warn_ignored(fs: fsspec.AbstractFileSystem, url: str, others: list[str]) -> None:
    """One warning line for files under ``url`` that are neither shards nor images (so none is skipped unsaid)."""
    if others:
        log.warning("%s: ignored %d file(s) that are not shards or images (pipeline.decode.SUPPORTED_EXTS), e.g. %s",
                    url, len(others), unstrip(fs, others[0]))


def expand_shards(url: str, storage_options: StorageOptions = None, images_per_group: int = 1000) -> list[ShardSpec]:
    """List the shards behind a file URL, a glob (``s3://b/x/*.tar``, ``/d/**/*.parquet``) or a folder.

    Folders are searched recursively. Tar and Parquet files come first, sorted by URL; image
    files follow in sorted groups of ``images_per_group``, named ``{folder}/images-{i:05d}``
    where ``folder`` is the given folder (for a glob, its fixed leading folder).

    Raises:
        NoShardsError: Nothing matched.
        StorageError: The URL cannot be listed (missing bucket, bad credentials, ...).
    """
    if images_per_group < 1:
        raise ShardError(f"images_per_group must be at least 1, got {images_per_group}")
    fs, root, files = list_files(url, storage_options)
    specs: list[ShardSpec] = []
    images: list[str] = []
    others: list[str] = []
    for path in files:
        kind = suffix_kind(path)
        if kind == "images":
            images.append(path)
        elif kind is not None:
            full = unstrip(fs, path)
            specs.append(ShardSpec(full, kind, (full,)))
        else:
            others.append(path)
    root_url = unstrip(fs, root) if root else root
    for i, start in enumerate(range(0, len(images), images_per_group)):
        group = tuple(unstrip(fs, p) for p in images[start:start + images_per_group])
        specs.append(ShardSpec(f"{root_url}/images-{i:05d}", "images", group))
    if not specs:
        hint = f"; ignored {len(others)} other file(s) such as {unstrip(fs, others[0])}" if others else ""
        raise NoShardsError(f"no shards matched URL: {url} (expected .tar, .parquet or image files){hint}")
    warn_ignored(fs, url, others)
    log.info("%s: %s shard(s)", url, len(specs))
    return specs
