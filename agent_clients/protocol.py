"""The StreamSpace agent protocol: the one definition, imported by both sides.

Pure Python, no Django import. Text frames are JSON envelopes
``{"type", "id", "ts", "payload"}``; binary frames carry tunnel bytes behind a fixed
header. Every decode validates the envelope and the payload fields its type needs,
and raises :class:`ProtocolError` with a reason a human can read.

A decoded frame is safe to store: it is at most MAX_TEXT_FRAME long and MAX_DEPTH deep
(checked before parsing, without recursion), no string in it holds NUL or a lone
surrogate (PostgreSQL stores neither), it holds no NaN or Infinity (not JSON), ids are
short strings without control characters, and the VNC endpoints agents report fit their
columns. The control plane also requires the session ids agents report to be UUIDs, the
only ids it makes (``decode_agent_message(text, uuid_session_ids=True)``); agents accept
any id a control plane gives them (their backends check its shape).
"""

from __future__ import annotations

import itertools
import json
import logging
import re
import struct
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

PROTOCOL_VERSION = 1

# Size limits. A text frame carries control messages only; VNC bytes travel in binary
# frames, which the agent batches up to MAX_BINARY_PAYLOAD.
MAX_TEXT_FRAME = 256 * 1024
MAX_BINARY_PAYLOAD = 256 * 1024
# Arrays and objects nest at most this deep in a text frame, the envelope included (the
# deepest legitimate frame, a command carrying a template's settings, is about 5 deep).
MAX_DEPTH = 32

# Flow control: each side of a tunnel may have at most TUNNEL_WINDOW bytes in flight
# that the other side has not yet granted back with a ``tunnel_credit`` message.
TUNNEL_WINDOW = 4 * 1024 * 1024

# The garbage collector asks about at most this many session ids per ``sessions_query``
# (ids are at most 255 characters: 500 of them stay well under MAX_TEXT_FRAME); an agent
# holding more sends several queries.
MAX_SESSIONS_QUERY = 500

# The desktop image's sound stream port inside the container (images/desktop: SOUND_PORT),
# so a template's vnc_port must differ from it (sessions_app.models.Template.clean).
SOUND_PORT = 5711

# WebSocket close codes (4000-4999 are for applications).
CLOSE_UNAUTHORIZED = 4401
CLOSE_FORBIDDEN = 4403
CLOSE_NOT_FOUND = 4404
CLOSE_PROTOCOL_ERROR = 4400
CLOSE_TOO_LARGE = 4413
CLOSE_REPLACED = 4409
CLOSE_UNAVAILABLE = 4503
CLOSE_GOING_AWAY = 4001
CLOSE_INTERNAL_ERROR = 4500  # the peer failed handling a frame: reconnect (and say hello)

COMMAND_TYPES = frozenset(
    {
        "create_session",
        "terminate_session",
        "hibernate_session",
        "wake_session",
        "list_sessions",
        "get_session",
    }
)

# States an agent may report for a session it holds.
REPORTED_STATES = frozenset({"running", "starting", "hibernated", "stopped", "failed", "missing"})

PLATFORMS = frozenset({"kubernetes", "docker", "vm", "cloud"})

# What a tunnel carries (``tunnel_open``'s ``stream``; absent means "vnc").
STREAMS = ("vnc", "audio")

log = logging.getLogger(__name__)


class _Invalid(ValueError):
    """A field check's precise complaint (decode prefixes the message type and field)."""


CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")  # C0, DEL and C1: never in an id


def valid_id(v: Any) -> bool:
    """An id (agent, command, session, message): 1-255 characters, no control character."""
    return isinstance(v, str) and 0 < len(v) <= 255 and not CONTROL.search(v)


_str = valid_id


def _opt_bool(v: Any) -> bool:
    return v is None or isinstance(v, bool)


def _opt_str(v: Any) -> bool:
    return v is None or (isinstance(v, str) and len(v) <= 4096)


def _int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0


def _bool(v: Any) -> bool:
    return isinstance(v, bool)


def _dict(v: Any) -> bool:
    return isinstance(v, dict)


def _list(v: Any) -> bool:
    return isinstance(v, list)


def _execution(v: Any) -> bool:
    """A command's execution number (1 for the first; absent means 1)."""
    return v is None or (_int(v) and v >= 1)


def _str_list(v: Any) -> bool:
    return isinstance(v, list) and all(_str(x) for x in v)


def _session_ids(v: Any) -> bool:
    """A garbage-collector list of session ids: at most MAX_SESSIONS_QUERY of them."""
    return _str_list(v) and len(v) <= MAX_SESSIONS_QUERY


def _tunnel(v: Any) -> bool:
    return _int(v) and v <= 0xFFFFFFFF


def _uuid(v: Any) -> bool:
    """A session id as the control plane makes them: a UUID in canonical lower-case form."""
    if not isinstance(v, str) or len(v) != 36:
        return False
    try:
        return str(uuid.UUID(v)) == v
    except ValueError:
        return False


def _check_endpoint(entry: dict) -> None:
    """The VNC endpoint an agent reports (in a result or a session report) fits its columns."""
    host, port = entry.get("vnc_host"), entry.get("vnc_port")
    if host is not None and not (isinstance(host, str) and len(host) <= 255 and not CONTROL.search(host)):
        raise _Invalid("vnc_host must be a host name of at most 255 characters")
    if port is not None and not (_int(port) and port <= 65535):
        raise _Invalid("vnc_port must be a port number (0-65535)")


def _result(v: Any) -> bool:
    if not _dict(v):
        return False
    _check_endpoint(v)
    return True


# --- file transfers (a tunnel_open with a ``file`` request) ---------------------------------
# list a folder, get (download) a file, put (upload) a file; paths are relative to the
# session's home. The agent answers with JSON header lines inside the tunnel's bytes
# (agent_clients/runtime/files.py).
FILE_OPS = frozenset({"list", "get", "put"})
MAX_FILE_PATH = 4096
MAX_FILE_NAME = 255  # bytes of one path component (UTF-8), as Linux allows


def file_path_problem(path: Any, *, allow_empty: bool = False) -> str | None:
    """Why ``path`` (relative to the home, ``/`` between components) may not name a file;
    None when it may. The one rule, applied by the control plane and again by the agent:
    no absolute path, no ``.`` or ``..`` component, no empty component, no NUL or control
    character, components of at most 255 bytes and at most 4096 characters in all."""
    if not isinstance(path, str):
        return "the path must be text"
    if path == "":
        return None if allow_empty else "the path is empty"
    if len(path) > MAX_FILE_PATH:
        return f"the path is longer than {MAX_FILE_PATH} characters"
    if CONTROL.search(path):
        return "the path holds a NUL or control character"
    if UNSTORABLE.search(path):
        return "the path is not Unicode text"
    if path.startswith("/"):
        return "absolute paths are not allowed: give a path relative to the home folder"
    for part in path.split("/"):
        if part in ("", ".", ".."):
            return "the path may not hold empty, '.' or '..' components"
        if len(part.encode("utf-8")) > MAX_FILE_NAME:
            return f"a path component is longer than {MAX_FILE_NAME} bytes"
    return None


def _file_request(v: Any) -> bool:
    if not _dict(v) or v.get("op") not in FILE_OPS:
        raise _Invalid("must be an object with op list, get or put")
    if problem := file_path_problem(v.get("path"), allow_empty=v.get("op") == "list"):
        raise _Invalid(problem)
    if v["op"] == "put" and not _int(v.get("size")):
        raise _Invalid("a put needs its size in bytes")
    return True


def _session_reports(session_id):
    """The sessions an agent says it holds: objects with a session id (``session_id``
    checks it), a reported state, and optionally a VNC endpoint and a detail text."""

    def check(v: Any) -> bool:
        if not _list(v):
            return False
        if session_id is _uuid:
            # An id this control plane never makes (a container someone labelled by hand,
            # another install's) names no session here: it is left out of the report, not
            # allowed to refuse the whole hello or heartbeat (the agent would never come online).
            foreign = [e for e in v if _dict(e) and valid_id(e.get("session_id")) and not _uuid(e["session_id"])]
            if foreign:
                log.warning("ignoring %d reported session(s) with ids this control plane never made, e.g. %r",
                            len(foreign), str(foreign[0]["session_id"])[:64])  # fmt: skip
                v[:] = [e for e in v if not any(e is f for f in foreign)]
        for n, entry in enumerate(v):
            if not _dict(entry):
                raise _Invalid(f"entry {n} is not an object")
            if not session_id(entry.get("session_id")):
                raise _Invalid(f"entry {n}: {_SESSION_ID_RULE[session_id]} (got {str(entry.get('session_id'))[:64]!r})")
            if entry.get("state") not in REPORTED_STATES:
                raise _Invalid(f"entry {n}: state must be one of {', '.join(sorted(REPORTED_STATES))}")
            if not (entry.get("detail") is None or isinstance(entry["detail"], str)):
                raise _Invalid(f"entry {n}: detail must be a string")
            try:
                _check_endpoint(entry)
            except _Invalid as exc:
                raise _Invalid(f"entry {n}: {exc}") from None
        return True

    return check


def _session_ref(session_id):
    def check(v: Any) -> bool:
        if not session_id(v):
            raise _Invalid(f"{_SESSION_ID_RULE[session_id]} (got {str(v)[:64]!r})")
        return True

    return check


_SESSION_ID_RULE = {
    valid_id: "session_id must be an id of 1-255 characters without control characters",
    _uuid: "session_id must be a UUID in lower-case canonical form (this control plane names sessions so)",
}


def _agent_messages(session_id) -> dict[str, dict[str, Any]]:
    """Required payload fields per agent message type (name -> predicate); ``session_id``
    checks the session ids the agent reports (``valid_id``, or ``_uuid`` on the control plane)."""
    return {
        "hello": {
            "agent_id": _str,
            "platform": lambda v: v in PLATFORMS,
            "protocol": _int,
            "version": _str,
            "region": _opt_str,
            "capacity": _dict,
            "sessions": _session_reports(session_id),
        },
        "heartbeat": {
            "capacity": _dict,
            "sessions": _session_reports(session_id),
            "status": lambda v: v in ("online", "draining"),
        },
        "ack": {"command_id": _str, "execution": _execution},
        "complete": {"command_id": _str, "execution": _execution, "result": _result},
        "failed": {
            "command_id": _str,
            "execution": _execution,
            "error": lambda v: isinstance(v, str),
            "retryable": _bool,
        },
        "session_event": {
            "session_id": _session_ref(session_id),
            "state": lambda v: v in REPORTED_STATES,
            "reason": _opt_str,
        },
        "tunnel_ready": {"tunnel_id": _tunnel},
        # retryable: False when trying again cannot help (no sound on this platform); agents
        # older than the field leave it out, which counts as retryable.
        "tunnel_error": {"tunnel_id": _tunnel, "error": lambda v: isinstance(v, str), "retryable": _opt_bool},
        "tunnel_close": {"tunnel_id": _tunnel, "reason": _opt_str},
        "tunnel_credit": {"tunnel_id": _tunnel, "bytes": _int},
        # The garbage collector names the sessions it found objects of on the platform; the
        # control plane answers ``sessions_verdict`` with this message's envelope id as
        # ``request_id``. Any id: what it found may be another install's (no verdict then).
        "sessions_query": {"session_ids": _session_ids},
    }


AGENT_MESSAGES = _agent_messages(valid_id)
# The same, as the control plane reads them: every session id an agent reports is a UUID.
AGENT_MESSAGES_UUID_SESSIONS = _agent_messages(_uuid)

CONTROL_MESSAGES: dict[str, dict[str, Any]] = {
    "command": {
        "command_id": _str,
        "type": lambda v: v in COMMAND_TYPES,
        "session_id": _opt_str,
        "payload": _dict,
        "execution": _execution,
    },
    # The control plane gave up on this execution of a command: do not start it.
    "void": {"command_id": _str, "execution": _execution, "reason": lambda v: isinstance(v, str)},
    # ``stream``: what the tunnel carries, the desktop's VNC server (absent or "vnc") or its
    # sound ("audio": an Ogg Opus stream, from templates with sound).
    # ``file`` (optional): the tunnel carries a file transfer, not VNC (see FILE_OPS).
    "tunnel_open": {
        "tunnel_id": _tunnel,
        "session_id": _str,
        "stream": lambda v: v in (None, *STREAMS),
        "file": lambda v: v is None or _file_request(v),
    },
    "tunnel_close": {"tunnel_id": _tunnel, "reason": _opt_str},
    "tunnel_credit": {"tunnel_id": _tunnel, "bytes": _int},
    "error": {"reason": lambda v: isinstance(v, str), "ref": _opt_str},
    # A verdict for each queried session the control plane knows as this agent's: keep all
    # (live), remove everything (remove), remove all but the home volume (remove_keep_home).
    # A queried id in none of the lists is unknown to this control plane: left alone.
    "sessions_verdict": {
        "request_id": _str,
        "live": _session_ids,
        "remove": _session_ids,
        "remove_keep_home": _session_ids,
    },
}


class ProtocolError(ValueError):
    """A frame that breaks the protocol. ``reason`` is safe to send back to the peer."""

    def __init__(self, reason: str, *, too_large: bool = False):
        super().__init__(reason)
        self.reason = reason
        self.too_large = too_large


@dataclass(frozen=True)
class Message:
    type: str
    payload: dict[str, Any]
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    ts: float = field(default_factory=time.time)


def encode(type_: str, payload: dict[str, Any], *, id: str | None = None) -> str:
    """Serialise one envelope. The payload is not validated here: the receiver does."""
    return json.dumps(
        {"type": type_, "id": id or uuid.uuid4().hex, "ts": time.time(), "payload": payload},
        separators=(",", ":"),
    )


_JSON_STRING = re.compile(r'"[^"\\]*+(?:\\.[^"\\]*+)*+"')
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")
_DEPTH_STEP = {"[": 1, "{": 1, "]": -1, "}": -1}


def _nesting(text: str) -> int:
    """How deep arrays and objects nest in ``text`` (0 when it holds too few brackets to pass
    MAX_DEPTH), without parsing it or recursing; brackets inside strings do not count."""
    if text.count("[") + text.count("{") <= MAX_DEPTH:
        return 0  # too few to nest too deep, however they sit (most frames)
    brackets = _NOT_BRACKET.sub("", _JSON_STRING.sub("", text))
    return max(itertools.accumulate(map(_DEPTH_STEP.__getitem__, brackets)), default=0)


def _not_json(constant: str):
    raise ValueError(f"{constant} is not a JSON number")


UNSTORABLE = re.compile("[\x00\ud800-\udfff]")  # PostgreSQL stores neither NUL nor a lone surrogate


def unstorable_in(value: Any, *, root: str = "", max_depth: int | None = None) -> tuple[str, str] | None:
    """(where, why) the first string (keys included) that the database cannot store sits in
    the decoded JSON ``value`` (``where`` like ``metadata.os[1]``, under ``root``), or where
    it nests deeper than ``max_depth``; None when all is well. Iterative, never recursive:
    the one walker for agent frames and API bodies alike."""
    stack: list[tuple[str, Any, int]] = [(root, value, 1)]
    while stack:
        where, item, depth = stack.pop()
        if isinstance(item, str):
            if bad := UNSTORABLE.search(item):
                nul = bad.group() == "\x00"
                return where, "holds a NUL character" if nul else "holds a lone surrogate (not Unicode text)"
        elif isinstance(item, dict | list):
            if max_depth is not None and depth > max_depth:
                return where, f"is nested deeper than {max_depth} levels"
            if isinstance(item, dict):
                for key, child in item.items():
                    name = f"{where}.{key}" if where else str(key)
                    stack += [(name, key, depth + 1), (name, child, depth + 1)]
            else:
                stack.extend((f"{where}[{n}]", child, depth + 1) for n, child in enumerate(item))
    return None


def _check_strings(type_: str, payload: dict) -> None:
    """No string in the payload (keys included) holds NUL or a lone surrogate."""
    if problem := unstorable_in(payload, root="payload"):
        where, why = problem
        raise ProtocolError(f"{type_}: {where[:120]} {why}")


def decode(text: str | bytes, schema: dict[str, dict[str, Any]]) -> Message:
    """Parse and validate one text frame against ``schema`` (AGENT_MESSAGES, its
    AGENT_MESSAGES_UUID_SESSIONS variant, or CONTROL_MESSAGES)."""
    if len(text) > MAX_TEXT_FRAME:
        raise ProtocolError(f"text frame of {len(text)} bytes exceeds {MAX_TEXT_FRAME}", too_large=True)
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError:
            raise ProtocolError("malformed JSON: not UTF-8") from None
    if (depth := _nesting(text)) > MAX_DEPTH:
        raise ProtocolError(f"JSON nested {depth} deep; at most {MAX_DEPTH} levels are allowed")
    try:
        data = json.loads(text, parse_constant=_not_json)
    except ValueError as exc:  # JSONDecodeError, and integers of more than 4300 digits
        raise ProtocolError(f"malformed JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ProtocolError("envelope must be a JSON object")
    type_ = data.get("type")
    if not isinstance(type_, str):
        raise ProtocolError("envelope lacks a string 'type'")
    if type_ not in schema:
        raise ProtocolError(f"unknown message type {type_[:64]!r}")
    payload = data.get("payload")
    if not isinstance(payload, dict):
        raise ProtocolError(f"{type_}: 'payload' must be an object")
    msg_id = data.get("id")
    if msg_id is not None and not _str(msg_id):
        raise ProtocolError(f"{type_}: 'id' must be a short string")
    ts = data.get("ts")
    if ts is not None and not _num(ts):
        raise ProtocolError(f"{type_}: 'ts' must be a number")
    _check_strings(type_, payload)
    for name, check in schema[type_].items():
        try:
            valid = check(payload.get(name))
        except _Invalid as exc:
            raise ProtocolError(f"{type_}: field {name!r}: {exc}") from None
        if not valid:
            raise ProtocolError(f"{type_}: field {name!r} is missing or invalid")
    return Message(type=type_, payload=payload, id=msg_id or uuid.uuid4().hex, ts=ts or time.time())


def decode_agent_message(text: str | bytes, *, uuid_session_ids: bool = False) -> Message:
    """An agent's frame; ``uuid_session_ids`` (the control plane) also requires every session
    id it reports as held or changed to be a UUID."""
    return decode(text, AGENT_MESSAGES_UUID_SESSIONS if uuid_session_ids else AGENT_MESSAGES)


def decode_control_message(text: str | bytes) -> Message:
    return decode(text, CONTROL_MESSAGES)


# Binary frames: version byte, 4-byte big-endian tunnel id, then raw bytes.
_HEADER = struct.Struct(">BI")
BINARY_HEADER_SIZE = _HEADER.size
BINARY_VERSION = 1


def pack_data(tunnel_id: int, data: bytes) -> bytes:
    return _HEADER.pack(BINARY_VERSION, tunnel_id) + data


def unpack_data(frame: bytes) -> tuple[int, bytes]:
    if len(frame) < BINARY_HEADER_SIZE:
        raise ProtocolError("binary frame shorter than its header")
    if len(frame) - BINARY_HEADER_SIZE > MAX_BINARY_PAYLOAD:
        raise ProtocolError(f"binary frame of {len(frame)} bytes exceeds {MAX_BINARY_PAYLOAD}", too_large=True)
    version, tunnel_id = _HEADER.unpack_from(frame)
    if version != BINARY_VERSION:
        raise ProtocolError(f"unknown binary frame version {version}")
    return tunnel_id, frame[BINARY_HEADER_SIZE:]
