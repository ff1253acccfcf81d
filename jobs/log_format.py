"""``vaepipe --log-format json``: one JSON object a line, for log collectors.

Each line holds ``ts`` (UTC, ISO 8601), ``level``, ``logger``, ``message`` (the formatted
``%s`` message), ``pid``, and ``exc`` when an exception is logged; fields passed with
``extra={...}`` are added as they are (made JSON-safe with ``str``).
"""
from __future__ import annotations

import datetime as dt
import json
import logging

LOG_FORMATS = ("text", "json")
TEXT_FORMAT = "%(levelname)s %(name)s: %(message)s"
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """A logging formatter that writes each record as one line of JSON."""

    def format(self, record: logging.LogRecord) -> str:
        out = {"ts": dt.datetime.fromtimestamp(record.created, dt.timezone.utc).isoformat(timespec="milliseconds"),
               "level": record.levelname, "logger": record.name, "message": record.getMessage(), "pid": record.process}
        out.update({k: v for k, v in vars(record).items() if k not in _STANDARD and not k.startswith("_")})
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def formatter(log_format: str) -> logging.Formatter:
    return JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT)
