"""Logging to stderr in logfmt or JSON, as Prometheus exporters do (--log.level, --log.format)."""

from __future__ import annotations

import json
import logging
import os
import sys
import time
import traceback

LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warn": logging.WARNING, "error": logging.ERROR}
FORMATS = ("logfmt", "json")


def _timestamp(record: logging.LogRecord) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z"


def _fields(record: logging.LogRecord) -> dict[str, object]:
    level = {"WARNING": "warn"}.get(record.levelname, record.levelname.lower())
    fields: dict[str, object] = {"ts": _timestamp(record), "level": level, "msg": record.getMessage()}
    fields.update(getattr(record, "kv", {}) or {})
    if record.exc_info and record.exc_info[1] is not None:
        fields.update(_exception_fields(record.exc_info[1]))
    return fields


def describe_exception(exc: BaseException) -> str:
    """The exception's type and where it was raised, never its text: an OSError's text carries the path
    (below a generation, a secret's name) and another exception's text may quote what was read."""
    err = type(exc).__name__
    if isinstance(exc, OSError) and exc.strerror:
        err += f": {exc.strerror}"
    if exc.__traceback__ is not None:
        frame = traceback.extract_tb(exc.__traceback__)[-1]
        err += f" at {os.path.basename(frame.filename)}:{frame.lineno} in {frame.name}"
    return err


def _exception_fields(exc: BaseException) -> dict[str, str]:
    return {"err": describe_exception(exc)}


def _logfmt_value(value: object) -> str:
    text = str(value)
    if text and not any(c in text for c in ' ="\\\n\t') and text.isprintable():
        return text
    return json.dumps(text)


class LogfmtFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return " ".join(f"{key}={_logfmt_value(value)}" for key, value in _fields(record).items())


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return json.dumps(_fields(record), default=str)


def setup(level: str = "info", fmt: str = "logfmt") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else LogfmtFormatter())
    root = logging.getLogger("sops_nix_exporter")
    root.handlers[:] = [handler]
    root.setLevel(LEVELS[level])
    root.propagate = False
