"""The engine's log output: a line of text per event, or one JSON object a line.

Log calls that concern an alert or a gateway pass their figures as fields too
(``extra=fields(alert_id=..., event=..., ...)``): the text line says them in words, the
JSON object carries them as keys, so a log pipeline can count and filter without
parsing sentences.
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime

#: The formats ``configure`` takes.
FORMATS = ("text", "json")
_TEXT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def fields(**values: object) -> dict:
    """The ``extra`` argument of a log call carrying ``values`` as fields."""
    return {"fields": values}


class JsonFormatter(logging.Formatter):
    """One JSON object a record: time (UTC, ISO 8601), level, logger, message, and the
    record's fields."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry.update(getattr(record, "fields", {}))
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False, default=_plain)


def _plain(value: object) -> object:
    """numpy numbers and other objects JSON does not know."""
    if hasattr(value, "item"):
        return value.item()
    return str(value)


def configure(level: str = "info", form: str = "text") -> None:
    """Sends the engine's logs to standard error at ``level``, as ``form`` (text, json).
    Like :func:`logging.basicConfig`, it does nothing when the root logger has handlers
    already (a program embedding the engine, or a test runner, keeps its own)."""
    if form not in FORMATS:
        raise ValueError(f"log format must be one of {', '.join(FORMATS)}, got {form!r}")
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if form == "json" else logging.Formatter(_TEXT))
    logging.basicConfig(level=getattr(logging, level.upper()), handlers=[handler])
