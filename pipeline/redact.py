"""Secrets never reach a log: a filter on the root handlers redacts them in every record,
third-party debug logs included (urllib3 logs whole request URLs, Flickr's ``api_key=...``
among them, at DEBUG).
"""

from __future__ import annotations

import logging
import re

#: ``name=value`` (URL query, form or command line) and ``Authorization`` headers
PATTERNS = [
    re.compile(r"(?i)\b(api_?key|apikey|access_?token|auth_?token|token|secret|client_secret|password|passwd|"
               r"oauth_signature|signature|sig)(=|%3D|:\s*|\"\s*:\s*\"|'\s*:\s*')([^&\s\"',;)]+)"),
    re.compile(r"(?i)\b(authorization)(:\s*|\"\s*:\s*\")((?:bearer|basic|token)\s+)?([^\s\"',;]+)"),
]
MASK = "***"


def redact(text: str) -> str:
    """``text`` with the values of secret-looking parameters replaced by ``***``."""
    text = PATTERNS[0].sub(lambda m: f"{m.group(1)}{m.group(2)}{MASK}", text)
    return PATTERNS[1].sub(lambda m: f"{m.group(1)}{m.group(2)}{m.group(3) or ''}{MASK}", text)


class RedactSecrets(logging.Filter):
    """Rewrites each record's message with :func:`redact` (arguments formatted first)."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a broken format: leave it to the handler to report
            return True
        clean = redact(message)
        if clean != message or record.args:
            record.msg, record.args = clean, None
        if record.exc_info and not record.exc_text:
            record.exc_text = redact(logging.Formatter().formatException(record.exc_info))
        elif record.exc_text:
            record.exc_text = redact(record.exc_text)
        return True


def install(logger: logging.Logger | None = None) -> None:
    """Add the filter to every handler of ``logger`` (the root logger by default)."""
    logger = logger or logging.getLogger()
    for handler in logger.handlers:
        if not any(isinstance(f, RedactSecrets) for f in handler.filters):
            handler.addFilter(RedactSecrets())
