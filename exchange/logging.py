"""Structured logging (structlog): JSON lines in production, readable lines on a terminal.

Secrets and personal data never go into log events: callers log identifiers (key ids,
study ids, counts), never keys, tokens, pseudonyms or record values. `redact_secrets` is a
last line of defence that blanks values of keys that look secret.
"""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import MutableMapping
from typing import Any

import structlog

SECRET_MARKERS = ("secret", "password", "token", "api_key", "api-key", "apikey", "authorization",
                  "private", "seed", "signature_input")


@functools.lru_cache(maxsize=4096)
def _looks_secret(key: str) -> bool:
    lowered = key.lower()
    return any(marker in lowered for marker in SECRET_MARKERS)


def redact_secrets(_logger: Any, _method: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    # Field names repeat (every access line has the same seven), so the substring scan is
    # cached per name (it was a large share of a log line's cost).
    for key in list(event):
        if type(key) is str and _looks_secret(key):
            event[key] = "[redacted]"
    return event


def configure_logging(level: str = "INFO", json_format: bool = True) -> None:
    renderer: Any = (structlog.processors.JSONRenderer() if json_format
                     else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty()))
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            redact_secrets,
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )


def get_logger(name: str) -> Any:
    return structlog.get_logger(name)
