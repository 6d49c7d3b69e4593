"""structlog set-up: JSON lines for journald (or any pipe), readable console on a terminal.

uvicorn's and llama-cpp's stdlib loggers go through the same processors, so every line in
`journalctl -u llamad -o json` has the same fields: `event`, `level`, `logger`,
`timestamp`, and `request_id` for lines logged while serving a request.
"""

from __future__ import annotations

import logging
import os
import sys

import structlog

LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


def _use_json(fmt: str) -> bool:
    if fmt == "json":
        return True
    if fmt == "console":
        return False
    # systemd sets JOURNAL_STREAM when stdout/stderr is the journal.
    return bool(os.environ.get("JOURNAL_STREAM")) or not sys.stderr.isatty()


def configure(level: str = "info", fmt: str = "auto") -> None:
    shared = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer = (
        structlog.processors.JSONRenderer()
        if _use_json(fmt)
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    structlog.configure(
        # A call below the level ends at the first processor: without it, every debug line
        # (a model's load logs some 3,000 of llama.cpp's) went through the whole chain,
        # timestamp included, before logging dropped it: 0.13 s holding the GIL per load,
        # taken from the models serving meanwhile.
        processors=[structlog.stdlib.filter_by_level] + shared + [structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=False,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info,
            renderer,
        ],
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    set_level(level)
    for name in ("uvicorn", "uvicorn.error"):
        logger = logging.getLogger(name)
        logger.handlers[:] = []
        logger.propagate = True
    # One line per request comes from llamad itself; uvicorn's access log would repeat it.
    logging.getLogger("uvicorn.access").disabled = True


def set_level(level: str) -> None:
    logging.getLogger().setLevel(LEVELS.get(level, logging.INFO))
