"""The control plane's side of structured logs (agent_clients/runtime/logfmt.py has the format
and the ids): a request id per HTTP request, and Daphne's access log as log records when
``LOG_FORMAT=json``."""

from __future__ import annotations

import logging
import re
import uuid

from agent_clients.runtime.logfmt import log_context

HEADER = b"x-request-id"
# What an incoming X-Request-ID may be to be kept (a proxy's or a client's trace id);
# anything else (too long, spaces, quotes, control characters) is replaced by a new one.
_SANE_REQUEST_ID = re.compile(rb"[A-Za-z0-9._:-]{1,128}")

access_log = logging.getLogger("streamspace.access")


def request_id_of(scope) -> str:
    """The request's X-Request-ID if it is a sane token, else a new random one."""
    for name, value in scope.get("headers") or []:
        if name.lower() == HEADER and _SANE_REQUEST_ID.fullmatch(value):
            return value.decode("ascii")
    return uuid.uuid4().hex


class RequestId:
    """ASGI middleware (outermost on HTTP): every log line written while a request is
    handled carries its ``request_id``, and the response says it in ``X-Request-ID``."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = request_id_of(scope)

        async def send_with_id(message):
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers") or [] if k.lower() != HEADER]
                message = {**message, "headers": [*headers, (HEADER, request_id.encode("ascii"))]}
            await send(message)

        with log_context(request_id=request_id):
            await self.app(scope, receive, send_with_id)


def daphne_access_log_as_records() -> None:
    """With ``LOG_FORMAT=json`` every line must be JSON, and Daphne writes its access log
    straight to stdout: send each entry through ``logging`` instead (logger
    ``streamspace.access``, INFO), where the handlers' filter redacts ``?token=`` values
    (streamspace/log_redaction.py) and the formatter makes it JSON."""
    try:
        from daphne.access import AccessLogGenerator
    except ImportError:
        return

    def write_entry(self, host, date, request, status=None, length=None, ident=None, user=None):
        access_log.info('%s "%s" %s %s', host, request, status or "-", length or "-")

    AccessLogGenerator.write_entry = write_entry
