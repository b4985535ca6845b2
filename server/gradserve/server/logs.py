"""Structured logging: one line per event, ``key=value`` (default) or JSON.

Messages are written as ``event=name key=value ...``; the formatter prefixes
time, level and logger, or, for JSON, parses those pairs into an object."""
from __future__ import annotations

import json
import logging
import shlex
import sys
import time


class KeyValueFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z"
        line = f"ts={ts} level={record.levelname.lower()} logger={record.name} {record.getMessage()}"
        if record.exc_info:
            line += " exc=" + json.dumps(self.formatException(record.exc_info))
        return line


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {"ts": record.created, "level": record.levelname.lower(), "logger": record.name}
        message = record.getMessage()
        try:
            for token in shlex.split(message):
                key, _, value = token.partition("=")
                out[key] = value
        except ValueError:
            out["message"] = message
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out)


def configure(level: str = "info", fmt: str = "kv") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else KeyValueFormatter())
    root = logging.getLogger("gradserve")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False
