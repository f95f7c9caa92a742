"""Log lines as JSON objects (`LOG_FORMAT=json`): one object per line, for the app's logs,
gunicorn's error log and the access log alike.

Every object has `time` (ISO 8601, UTC), `level`, `logger`, `pid` and `message`; an access
line (worker.Handler.log_request) adds its fields under their names (`remote`, `method`,
`path`, `status`, `bytes`, `seconds`, `user_agent`, and for a stream `events` and
`stream_bytes`); an error adds `exception` (the traceback as text). Written by hand: the
standard library has no JSON formatter, and this is a dozen lines.
"""

from __future__ import annotations

import datetime as dt
import json
import logging

ACCESS_FIELDS = "access_fields"  # the `extra` key an access line's fields travel under


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {
            "time": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "pid": record.process,
        }
        fields = getattr(record, ACCESS_FIELDS, None)
        if isinstance(fields, dict):
            out.update(fields)
        else:
            out["message"] = record.getMessage()
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def logconfig_dict(level: str) -> dict:
    """gunicorn's `logconfig_dict` for JSON lines on stdout (error and access logs)."""
    handler = {"class": "logging.StreamHandler", "formatter": "json", "stream": "ext://sys.stdout"}
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"json": {"()": "services.logs.JsonFormatter"}},
        "handlers": {"console": handler},
        "root": {"level": level.upper(), "handlers": ["console"]},
        "loggers": {
            "gunicorn.error": {"level": level.upper(), "handlers": ["console"], "propagate": False},
            "gunicorn.access": {"level": "INFO", "handlers": ["console"], "propagate": False},
        },
    }
