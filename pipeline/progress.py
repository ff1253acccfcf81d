"""Progress of a running embed job, read from what has been committed to the output.

Works with every runner (the committed files are the source of truth, not worker state): a
background thread lists the run's expected output files every few seconds and reports shards
done/total and images/s through a callback.
"""
from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass
from typing import Callable

from pipeline.writer import read_metadata
from vae_model.storage import StorageOptions, fresh_fs

log = logging.getLogger(__name__)


@dataclass
class Progress:
    shards_done: int
    shards_total: int
    images: int
    seconds: float

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0

    def __str__(self) -> str:
        return (f"shards {self.shards_done}/{self.shards_total}, {self.images} images, "
                f"{self.images_per_s:.0f} img/s")


class ProgressWatcher:
    """Polls ``folder`` for the files in ``expected`` (names) committed since the start."""

    def __init__(self, folder: str, expected: list[str], callback: Callable[[Progress], None],
                 storage_options: StorageOptions = None, interval: float = 2.0) -> None:
        self.folder, self.expected, self.callback = folder, set(expected), callback
        self.so, self.interval = storage_options, interval
        self._seen: dict[str, int] = {}
        self._before: dict[str, tuple] = {}
        self._stop = threading.Event()
        self._t0 = time.monotonic()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _listing(self) -> dict[str, tuple]:
        fs, path = fresh_fs(self.folder, self.so)  # workers write here: never a cached listing
        try:
            entries = fs.ls(path, detail=True)
        except FileNotFoundError:
            return {}
        out = {}
        for e in entries:
            name = e["name"].rstrip("/").rsplit("/", 1)[-1]
            if name in self.expected:
                out[name] = (e.get("size"), str(e.get("mtime") or e.get("LastModified") or e.get("ETag") or ""))
        return out

    def __enter__(self) -> "ProgressWatcher":
        try:
            self._before = self._listing()  # outputs of earlier runs (maybe skipped, maybe redone)
        except Exception as exc:
            log.debug("progress listing failed: %s", exc)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def poll(self) -> Progress:
        """Shards committed by this run so far (files new or changed since it started)."""
        for name, info in self._listing().items():
            if name in self._seen or self._before.get(name) == info:
                continue
            md = read_metadata(f"{self.folder.rstrip('/')}/{name}", self.so) or {}
            try:
                self._seen[name] = json.loads(md.get("vaepipe.counts", "{}")).get("images_seen", 0)
            except json.JSONDecodeError:
                self._seen[name] = 0
        return Progress(len(self._seen), len(self.expected), sum(self._seen.values()),
                        time.monotonic() - self._t0)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.callback(self.poll())
            except Exception as exc:  # progress must never break the job
                log.debug("progress poll failed: %s", exc)
