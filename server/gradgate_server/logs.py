"""Log setup for the CLI: plain text, or one JSON object per line (--log-format json).

Records may carry ``extra={"fields": {...}}`` (the per-RPC line does); in JSON
those become top-level keys, in text the message shows them. A record is only
queued by the thread that logs it; a background thread formats and writes it, so a
call's access-log line costs it a few microseconds, not a write to stderr.
"""
from __future__ import annotations

import datetime
import atexit
import json
import logging
import logging.handlers
import queue
import sys

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


_listener: logging.handlers.QueueListener | None = None


def configure_logging(log_format: str = "text", level: int = logging.INFO) -> None:
    """Send all logs to stderr in ``log_format`` (text | json), written by a background thread."""
    global _listener
    if log_format not in LOG_FORMATS:
        raise ValueError(f"log format must be one of {LOG_FORMATS}, got {log_format!r}")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else
                         logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    if _listener is not None:
        _listener.stop()
    records: queue.SimpleQueue[logging.LogRecord] = queue.SimpleQueue()
    _listener = logging.handlers.QueueListener(records, handler)
    _listener.start()
    atexit.register(_listener.stop)  # drains the queue
    logging.basicConfig(level=level, handlers=[_Queued(records)], force=True)
