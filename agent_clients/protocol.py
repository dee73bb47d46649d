"""The StreamSpace agent protocol: the one definition, imported by both sides.

Pure Python, no Django import. Text frames are JSON envelopes
``{"type", "id", "ts", "payload"}``; binary frames carry tunnel bytes behind a fixed
header. Every decode validates the envelope and the payload fields its type needs,
and raises :class:`ProtocolError` with a reason a human can read.
"""

from __future__ import annotations

import json
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

# Flow control: each side of a tunnel may have at most TUNNEL_WINDOW bytes in flight
# that the other side has not yet granted back with a ``tunnel_credit`` message.
TUNNEL_WINDOW = 4 * 1024 * 1024

# The garbage collector asks about at most this many session ids per ``sessions_query``
# (ids are at most 255 characters: 500 of them stay well under MAX_TEXT_FRAME); an agent
# holding more sends several queries.
MAX_SESSIONS_QUERY = 500

# WebSocket close codes (4000-4999 are for applications).
CLOSE_UNAUTHORIZED = 4401
CLOSE_FORBIDDEN = 4403
CLOSE_NOT_FOUND = 4404
CLOSE_PROTOCOL_ERROR = 4400
CLOSE_TOO_LARGE = 4413
CLOSE_REPLACED = 4409
CLOSE_UNAVAILABLE = 4503
CLOSE_GOING_AWAY = 4001

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


def _str(v: Any) -> bool:
    return isinstance(v, str) and 0 < len(v) <= 255


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


# Required payload fields per message type: name -> predicate.
AGENT_MESSAGES: dict[str, dict[str, Any]] = {
    "hello": {
        "agent_id": _str,
        "platform": lambda v: v in PLATFORMS,
        "protocol": _int,
        "version": _str,
        "region": _opt_str,
        "capacity": _dict,
        "sessions": _list,
    },
    "heartbeat": {"capacity": _dict, "sessions": _list, "status": lambda v: v in ("online", "draining")},
    "ack": {"command_id": _str, "execution": _execution},
    "complete": {"command_id": _str, "execution": _execution, "result": _dict},
    "failed": {
        "command_id": _str,
        "execution": _execution,
        "error": lambda v: isinstance(v, str),
        "retryable": _bool,
    },
    "session_event": {"session_id": _str, "state": lambda v: v in REPORTED_STATES, "reason": _opt_str},
    "tunnel_ready": {"tunnel_id": _tunnel},
    "tunnel_error": {"tunnel_id": _tunnel, "error": lambda v: isinstance(v, str)},
    "tunnel_close": {"tunnel_id": _tunnel, "reason": _opt_str},
    "tunnel_credit": {"tunnel_id": _tunnel, "bytes": _int},
    # The garbage collector names the sessions it found objects of on the platform; the
    # control plane answers ``sessions_verdict`` with this message's envelope id as
    # ``request_id``.
    "sessions_query": {"session_ids": _session_ids},
}

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
    "tunnel_open": {"tunnel_id": _tunnel, "session_id": _str},
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


def decode(text: str | bytes, schema: dict[str, dict[str, Any]]) -> Message:
    """Parse and validate one text frame against ``schema`` (AGENT_MESSAGES or CONTROL_MESSAGES)."""
    if len(text) > MAX_TEXT_FRAME:
        raise ProtocolError(f"text frame of {len(text)} bytes exceeds {MAX_TEXT_FRAME}", too_large=True)
    try:
        data = json.loads(text)
    except (ValueError, UnicodeDecodeError) as exc:
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
    for name, check in schema[type_].items():
        if not check(payload.get(name)):
            raise ProtocolError(f"{type_}: field {name!r} is missing or invalid")
    return Message(type=type_, payload=payload, id=msg_id or uuid.uuid4().hex, ts=ts or time.time())


def decode_agent_message(text: str | bytes) -> Message:
    return decode(text, AGENT_MESSAGES)


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
