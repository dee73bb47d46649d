"""Logging helpers referenced from settings.LOGGING."""

from __future__ import annotations

import logging


class ExceptionAsOneLine(logging.Filter):
    """Log an expected outage as one line instead of a traceback.

    channels-redis logs a full traceback every second while Redis is unreachable (its
    receive loop retries by itself); the outage is handled (vnc_app/relay.py), so one
    line naming the error says all there is to say, and real crashes stay visible."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and record.exc_info[1] is not None:
            exc = record.exc_info[1]
            record.msg = f"{record.getMessage()}: {exc.__class__.__name__}: {exc}"
            record.args = ()
            record.exc_info = None
            record.exc_text = None
        return True
