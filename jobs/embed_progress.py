"""The progress display of ``vaepipe embed`` (the callback of pipeline.progress.ProgressWatcher).

On an interactive terminal: a tqdm bar over shards, with images and images/s. Otherwise
(a scheduler, a pipe, a log file): plain log lines, formatted like every other log line
(``--log-format json`` included).
"""
from __future__ import annotations

import logging
import sys
from typing import IO

from pipeline.progress import Progress

log = logging.getLogger("pipeline.progress")


class EmbedProgress:
    """Call with each :class:`Progress`; :meth:`close` at the end (also a context manager)."""

    def __init__(self, stream: IO[str] | None = None, interactive: bool | None = None) -> None:
        self.stream = stream or sys.stderr
        self.interactive = _isatty(self.stream) if interactive is None else interactive
        self.bar = None

    def __call__(self, progress: Progress) -> None:
        if not self.interactive:
            log.info("%s", progress)
            return
        if self.bar is None:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=progress.shards_total, unit="shard", desc="embed", file=self.stream)
        self.bar.n = progress.shards_done
        self.bar.set_postfix_str(f"{progress.images} images, {progress.images_per_s:.0f} img/s", refresh=False)
        self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def __enter__(self) -> "EmbedProgress":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _isatty(stream: IO[str]) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # closed or not a real file
        return False
