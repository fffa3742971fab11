"""Log setup for the CLI: plain text, or one JSON object per line (--log-format json).

Records may carry ``extra={"fields": {...}}`` (the per-RPC line does); in JSON
those become top-level keys, in text the message shows them. A record is only
queued by the thread that logs it; a background thread formats and writes it. The
per-RPC access line (``access``) goes further: its fields alone are queued, and the
writer thread makes the log record, so it costs a call a couple of microseconds.
"""
from __future__ import annotations

import atexit
import datetime
import json
import logging
import logging.handlers
import queue
import sys
import time
from typing import Any

LOG_FORMATS = ("text", "json")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {"time": datetime.datetime.fromtimestamp(record.created, datetime.timezone.utc)
               .isoformat(timespec="milliseconds"),
               "level": record.levelname, "logger": record.name}
        fields = getattr(record, "fields", None)
        if fields:
            out.update(fields)
        else:
            out["message"] = record.getMessage()
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


class _Queued(logging.handlers.QueueHandler):
    """Hands records to the writer thread as they are: formatting happens there."""

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        return record


class _Writer(logging.handlers.QueueListener):
    """The writer thread: makes the records of queued access lines, then formats and writes."""

    def prepare(self, item: logging.LogRecord | tuple[float, dict[str, Any], Any]) -> logging.LogRecord:
        if isinstance(item, logging.LogRecord):
            return item
        created, fields, message = item
        record = ACCESS.makeRecord(ACCESS.name, logging.INFO, "(access)", 0, "%s", (message,), None,
                                   extra={"fields": fields})
        record.created, record.msecs = created, (created % 1) * 1000
        return record


ACCESS = logging.getLogger("gradgate_server.rpc")
_listener: _Writer | None = None
_records: queue.SimpleQueue | None = None


def access(fields: dict[str, Any], message: Any) -> None:
    """One access-log line (INFO on gradgate_server.rpc): ``fields`` for JSON, ``message`` for text.
    With the CLI's writer thread running, only the fields are queued; else it goes through logging."""
    if not ACCESS.isEnabledFor(logging.INFO):
        return
    if _records is not None:
        _records.put((time.time(), fields, message))
    else:
        ACCESS.info("%s", message, extra={"fields": fields})


def _stop_writer() -> None:
    """Stop the writer thread once it has written what is queued (at exit, or before a new one)."""
    global _listener, _records
    if _listener is not None:
        _records = None
        _listener.stop()
        _listener = None


def configure_logging(log_format: str = "text", level: int = logging.INFO) -> None:
    """Send all logs to stderr in ``log_format`` (text | json), written by a background thread."""
    global _listener, _records
    if log_format not in LOG_FORMATS:
        raise ValueError(f"log format must be one of {LOG_FORMATS}, got {log_format!r}")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else
                         logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    _stop_writer()
    records: queue.SimpleQueue = queue.SimpleQueue()
    _listener = _Writer(records, handler)
    _listener.start()
    logging.basicConfig(level=level, handlers=[_Queued(records)], force=True)
    _records = records


atexit.register(_stop_writer)  # drains the queue
