"""The protocol's content checks on their own (the socket tests beside this file send the
same frames through Daphne): what they refuse, and what they must still let through."""

import pytest

from agent_clients import protocol

SID = "1b4e28ba-2fa1-41d2-883f-0016d3cca427"


def heartbeat(sessions) -> str:
    return protocol.encode("heartbeat", {"capacity": {}, "sessions": sessions, "status": "online"})


def test_brackets_inside_strings_do_not_count_as_nesting():
    text = protocol.encode("failed", {"command_id": "c1", "error": '[{"' * 5000 + "\\", "retryable": False})
    assert protocol.decode_agent_message(text).payload["error"].startswith('[{"[{')


def test_nesting_up_to_the_limit_is_accepted_and_one_more_level_refused():
    def complete(levels: int) -> str:  # envelope, payload and result are 3 levels
        inner = "[" * (levels - 3) + "]" * (levels - 3)
        return f'{{"type": "complete", "payload": {{"command_id": "c", "result": {{"x": {inner}}}}}}}'

    assert protocol.decode_agent_message(complete(protocol.MAX_DEPTH)).type == "complete"
    with pytest.raises(protocol.ProtocolError) as exc:
        protocol.decode_agent_message(complete(protocol.MAX_DEPTH + 1))
    assert f"at most {protocol.MAX_DEPTH}" in exc.value.reason


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity"])
def test_nan_and_infinity_are_not_json(constant):
    with pytest.raises(protocol.ProtocolError) as exc:
        protocol.decode_agent_message(
            f'{{"type": "complete", "payload": {{"command_id": "c", "result": {{"x": {constant}}}}}}}'
        )
    assert "not a JSON number" in exc.value.reason


def test_agents_accept_any_session_id_and_the_control_plane_only_uuids():
    """Agents take the ids a control plane gives them (their backends check the shape);
    this control plane makes UUIDs and leaves reports naming anything else out (they name no
    session of its own; refusing the frame kept the agent offline)."""
    text = heartbeat([{"session_id": "s-1", "state": "running"}, {"session_id": SID, "state": "running"}])
    assert protocol.decode_agent_message(text).payload["sessions"][0]["session_id"] == "s-1"
    kept = protocol.decode_agent_message(text, uuid_session_ids=True).payload["sessions"]
    assert [e["session_id"] for e in kept] == [SID]
    ok = heartbeat([{"session_id": SID, "state": "running", "vnc_host": "127.0.0.1", "vnc_port": 5901}])
    assert protocol.decode_agent_message(ok, uuid_session_ids=True).payload["sessions"][0]["vnc_port"] == 5901


def test_the_garbage_collector_may_ask_about_any_id():
    """What it found on the platform may be another install's: any id, no verdict then."""
    query = protocol.encode("sessions_query", {"session_ids": ["not-ours", SID]})
    assert protocol.decode_agent_message(query, uuid_session_ids=True).payload["session_ids"] == ["not-ours", SID]


def test_free_text_may_hold_newlines_and_escapes_but_ids_may_not():
    error = "pull failed:\n\t\x1b[31mdenied\x1b[0m"
    text = protocol.encode("failed", {"command_id": "c1", "error": error, "retryable": True})
    assert protocol.decode_agent_message(text).payload["error"] == error
    with pytest.raises(protocol.ProtocolError) as exc:
        protocol.decode_agent_message(protocol.encode("ack", {"command_id": "c1\n"}))
    assert "command_id" in exc.value.reason


def test_the_control_plane_messages_are_checked_the_same_way():
    with pytest.raises(protocol.ProtocolError) as exc:
        protocol.decode_control_message(protocol.encode("error", {"reason": "x\x00", "ref": None}))
    assert "NUL" in exc.value.reason
