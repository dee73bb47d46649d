"""Structured logs: one JSON object per line (``LOG_FORMAT=json``), with the ids of what
each line concerns.

Standard library only, so the agents (no Django) and the control plane (settings.LOGGING)
share this one implementation and write the same shape::

    {"ts": "2026-12-01T20:31:05.123Z", "level": "INFO", "logger": "agents_app.consumers",
     "message": "agent agent-1 connected", "agent_id": "agent-1", "request_id": "..."}

``exc`` (the traceback text) is there when the line has one; each id only when it applies.
The ids come from :func:`log_context`, entered where a request, socket, command or
session is handled, and follow the code into ``asyncio`` tasks and ``asyncio.to_thread``
/ ``sync_to_async`` threads (context variables). Only these fields are written: a record's
other attributes (``extra=``; Django's carry the request object, SQL and its parameters)
never are, so nothing reaches the output that the message itself does not say.

Why not python-json-logger: it writes every ``extra`` attribute of a record by default
(the leak above), and what is needed here is a dozen lines of ``json.dumps``.
"""

from __future__ import annotations

import contextlib
import contextvars
import datetime
import json
import logging
import sys
from collections.abc import Iterator, Mapping
from types import MappingProxyType
from typing import TextIO

FORMATS = ("text", "json")
IDS = ("request_id", "agent_id", "command_id", "session_id")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# Libraries whose DEBUG lines print what goes over the wire: websockets prints the
# handshake's headers (the agent's ``Authorization: Bearer <token>``) and every frame (a
# create carries the session's VNC password). They stay at INFO whatever LOG_LEVEL says.
WIRE_LOGGERS = ("websockets",)

_ids: contextvars.ContextVar[Mapping[str, str]] = contextvars.ContextVar(
    "streamspace_log_ids", default=MappingProxyType({})
)


@contextlib.contextmanager
def log_context(**ids: object) -> Iterator[None]:
    """Within the block, every log line carries these ids (``request_id``, ``agent_id``,
    ``command_id``, ``session_id``) besides the ones already set; None or "" leaves an id
    as it was."""
    unknown = set(ids) - set(IDS)
    if unknown:
        raise TypeError(f"not a log id: {', '.join(sorted(unknown))}")
    given = {name: str(value) for name, value in ids.items() if value is not None and value != ""}
    token = _ids.set(MappingProxyType({**_ids.get(), **given}))
    try:
        yield
    finally:
        _ids.reset(token)


def current_ids() -> dict[str, str]:
    return dict(_ids.get())


class JsonFormatter(logging.Formatter):
    """A record as one line of JSON: ts (ISO 8601, UTC), level, logger, message, the ids
    that apply, exc. ``fixed`` ids hold for the whole process (an agent's own id)."""

    def __init__(self, *args, fixed: dict[str, str] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.fixed = {name: value for name, value in (fixed or {}).items() if name in IDS and value}

    def format(self, record: logging.LogRecord) -> str:
        line = {
            "ts": datetime.datetime.fromtimestamp(record.created, datetime.UTC)
            .isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            **self.fixed,
            **_ids.get(),
        }
        if record.exc_info:
            record.exc_text = record.exc_text or self.formatException(record.exc_info)
        if record.exc_text:
            line["exc"] = record.exc_text
        if record.stack_info:
            line["stack"] = self.formatStack(record.stack_info)
        return json.dumps(line, default=str)  # ASCII: a newline in any text stays \n, one line per record


def parse_format(value: str | None) -> str:
    """``text`` (the default) or ``json``; ValueError for anything else."""
    fmt = (value or "text").strip().lower()
    if fmt not in FORMATS:
        raise ValueError(f"LOG_FORMAT must be text or json, got {value!r}")
    return fmt


def configure(fmt: str, level: str, *, agent_id: str = "", stream: TextIO | None = None) -> None:
    """An agent's logging: one handler on the root logger writing text or JSON to stderr."""
    handler = logging.StreamHandler(stream or sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter(fixed={"agent_id": agent_id}))
    else:
        handler.setFormatter(logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in root.handlers[:]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    for name in WIRE_LOGGERS:
        logging.getLogger(name).setLevel(max(logging.INFO, root.level))
