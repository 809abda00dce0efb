"""LOG_FORMAT=json: one JSON object per log line, for log collectors (CloudWatch Logs, Loki).

A formatter of a few lines rather than a dependency: the record's fields map straight to JSON.
"""
from __future__ import annotations

import json
import logging
import re
import sys
from datetime import datetime, timezone

TEXT_FORMAT = "[%(asctime)s] [%(process)d] [%(levelname)s] %(message)s"

# What str.splitlines (and log collectors, terminals) take as the end of a line.
_LINE_BREAKS = re.compile("[\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029]")


def one_line_for_log(text: str) -> str:
    """`text` for a log line: each line break written as its escape (`\\n`), as repr would.

    For text that others chose (a request's path, an alert's context key quoted by a dead letter's
    reason): in the text format one log record is one line, and a line break in such text began a
    line of its own, which read as a record of ours (`[...] [ERROR] ...`) forged by whoever wrote it.
    """
    return _LINE_BREAKS.sub(lambda line_break: repr(line_break[0])[1:-1], text)


class JsonLogFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "pid": record.process,
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, default=str)


def faust_logging_config(log_format: str) -> dict | None:
    """What Faust's worker merges into its logging set-up (`App.conf.logging_config`); None keeps its own."""
    if log_format != "json":
        return None
    return {
        "merge": True,  # mode's defaults (root level from `-l`) with our handler in place of its coloured one
        "formatters": {"json": {"()": f"{__name__}.JsonLogFormatter"}},
        "handlers": {"default": {"class": "logging.StreamHandler", "formatter": "json",
                                 "stream": "ext://sys.stderr"}},
    }


# Loggers kept at or above a level whatever the worker's: aiokafka logs every request it sends at
# DEBUG, the SASL login's included, and with SASL PLAIN that request holds the password in clear.
QUIETER_LOGGERS = {"aiokafka.conn": logging.INFO}


def quiet_credential_loggers() -> None:
    # A logger's own level outlives Faust's logging set-up, which configures the root and its handlers.
    for name, level in QUIETER_LOGGERS.items():
        logging.getLogger(name).setLevel(level)


def log_to_stderr(log_format: str, level: str | int) -> None:
    """Logging before Faust sets up its own (the worker's wait for its services)."""
    quiet_credential_loggers()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonLogFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT))
    logging.root.handlers[:] = [handler]
    logging.root.setLevel(level.upper() if isinstance(level, str) else level)
