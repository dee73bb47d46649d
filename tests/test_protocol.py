"""The agent protocol codec: what both sides accept and refuse."""

import json

import pytest

from agent_clients import protocol
from agents_app.models import Agent, AgentCommand


def test_an_envelope_round_trips():
    text = protocol.encode("ack", {"command_id": "c1"}, id="m1")
    message = protocol.decode_agent_message(text)
    assert (message.type, message.id, message.payload) == ("ack", "m1", {"command_id": "c1"})
    assert message.ts > 0


def test_a_command_round_trips_on_the_agent_side():
    text = protocol.encode(
        "command", {"command_id": "c1", "type": "create_session", "session_id": "s1", "payload": {"cpu": 1}}
    )
    assert protocol.decode_control_message(text).payload["payload"] == {"cpu": 1}


@pytest.mark.parametrize(
    "text,reason",
    [
        ("nope", "malformed JSON"),
        ("[1]", "must be a JSON object"),
        ('{"payload": {}}', "lacks a string 'type'"),
        ('{"type": "command", "payload": {}}', "unknown message type"),  # control message sent by an agent
        ('{"type": "ack"}', "'payload' must be an object"),
        ('{"type": "ack", "payload": {"command_id": ""}}', "command_id"),
        ('{"type": "ack", "payload": {"command_id": 5}}', "command_id"),
        ('{"type": "ack", "id": 7, "payload": {"command_id": "c"}}', "'id'"),
        ('{"type": "failed", "payload": {"command_id": "c", "error": "x", "retryable": "yes"}}', "retryable"),
        ('{"type": "hello", "payload": {"agent_id": "a", "platform": "mainframe"}}', "platform"),
        ('{"type": "tunnel_credit", "payload": {"tunnel_id": -1, "bytes": 5}}', "tunnel_id"),
        ('{"type": "session_event", "payload": {"session_id": "s", "state": "on fire"}}', "state"),
        ('{"type": "sessions_query", "payload": {}}', "session_ids"),
        ('{"type": "sessions_query", "payload": {"session_ids": [""]}}', "session_ids"),
        ('{"type": "live_sessions_request", "payload": {}}', "unknown message type"),  # the old question
    ],
)
def test_bad_agent_frames_are_refused_with_a_reason(text, reason):
    with pytest.raises(protocol.ProtocolError) as exc:
        protocol.decode_agent_message(text)
    assert reason in exc.value.reason


def test_the_garbage_collectors_query_and_verdict_round_trip_within_a_frame():
    """The largest query, and a verdict on every id in it, fit in one text frame."""
    ids = ["s" * 255] * protocol.MAX_SESSIONS_QUERY
    query = protocol.encode("sessions_query", {"session_ids": ids}, id="q1")
    assert protocol.decode_agent_message(query).payload["session_ids"] == ids
    verdict = {"request_id": "q1", "live": ids[:100], "remove": ids[100:300], "remove_keep_home": ids[300:]}
    assert protocol.decode_control_message(protocol.encode("sessions_verdict", verdict)).payload == verdict
    with pytest.raises(protocol.ProtocolError) as exc:
        protocol.decode_agent_message(protocol.encode("sessions_query", {"session_ids": [*ids, "one-more"]}))
    assert "session_ids" in exc.value.reason
    for missing in ("request_id", "live", "remove", "remove_keep_home"):
        with pytest.raises(protocol.ProtocolError) as exc:
            protocol.decode_control_message(
                protocol.encode("sessions_verdict", {k: v for k, v in verdict.items() if k != missing})
            )
        assert missing in exc.value.reason


def test_an_oversized_text_frame_is_refused_as_too_large():
    text = json.dumps({"type": "ack", "payload": {"command_id": "x" * protocol.MAX_TEXT_FRAME}})
    with pytest.raises(protocol.ProtocolError) as exc:
        protocol.decode_agent_message(text)
    assert exc.value.too_large


def test_binary_frames_carry_the_tunnel_id_and_raw_bytes():
    frame = protocol.pack_data(0xDEADBEEF, b"\x00RFB 003.008\n")
    assert len(frame) == protocol.BINARY_HEADER_SIZE + 13
    assert protocol.unpack_data(frame) == (0xDEADBEEF, b"\x00RFB 003.008\n")


@pytest.mark.parametrize(
    "frame,too_large",
    [(b"\x01\x00", False), (b"\x09\x00\x00\x00\x01data", False),
     (protocol.pack_data(1, b"x" * (protocol.MAX_BINARY_PAYLOAD + 1)), True)],
)  # fmt: skip
def test_bad_binary_frames_are_refused(frame, too_large):
    with pytest.raises(protocol.ProtocolError) as exc:
        protocol.unpack_data(frame)
    assert exc.value.too_large is too_large


def test_the_models_and_the_protocol_name_the_same_commands_and_platforms():
    assert set(AgentCommand.Type.values) == protocol.COMMAND_TYPES
    assert set(Agent.Platform.values) == protocol.PLATFORMS


def test_a_tunnel_names_its_stream_or_none():
    """Absent (what every agent understands) or one of the streams; nothing else."""
    for stream in (None, "vnc", "audio"):
        payload = {"tunnel_id": 1, "session_id": "s-1", **({"stream": stream} if stream else {})}
        assert protocol.decode_control_message(protocol.encode("tunnel_open", payload)).payload == payload
    bad = protocol.encode("tunnel_open", {"tunnel_id": 1, "session_id": "s-1", "stream": "video"})
    with pytest.raises(protocol.ProtocolError, match="'stream' is missing or invalid"):
        protocol.decode_control_message(bad)
