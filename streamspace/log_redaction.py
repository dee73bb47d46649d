"""No credential from a URL's query string in any log we write.

API clients may open the viewer socket with ``?token=<JWT>`` (the viewer page itself uses
the login cookie), and a URL may carry other tokens by mistake. Daphne's access log
prints each request's full URL, and so may any log line quoting one: both go through
:func:`redact`, which keeps the parameter's name and replaces its value."""

from __future__ import annotations

import logging
import re

REDACTED = "[redacted]"
# A query parameter whose name says it is a credential (token, access_token, ticket, ...),
# also percent-encoded inside another parameter (the login redirect's ?next=...%3Ftoken%3D...).
_SECRET_PARAM = re.compile(
    r"(?i)((?:[?&;]|%3F|%26|%3B)[^=&;\s\"'?%]*(?:token|ticket|password|secret)[^=&;\s\"'?%]*(?:=|%3D))"
    r"(?:(?!%26|%3B)[^&;\s\"'])*"
)


def redact(text: str) -> str:
    return _SECRET_PARAM.sub(rf"\g<1>{REDACTED}", text)


class RedactQueryTokens(logging.Filter):
    """A log record's text with credentials in query strings replaced (settings.LOGGING)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        cleaned = redact(message)
        if cleaned != message:
            record.msg, record.args = cleaned, ()
        return True


def apply_to_daphne_access_log() -> None:
    """Daphne writes its access log straight to a stream, not through ``logging``: redact
    each entry's request line. Applied once at ASGI start-up; harmless under another server."""
    try:
        from daphne.access import AccessLogGenerator
    except ImportError:
        return
    if getattr(AccessLogGenerator, "_streamspace_redacted", False):
        return
    original = AccessLogGenerator.write_entry

    def write_entry(self, host, date, request, *args, **kwargs):
        return original(self, host, date, redact(request), *args, **kwargs)

    AccessLogGenerator.write_entry = write_entry
    AccessLogGenerator._streamspace_redacted = True
