"""The one rule for file transfer paths (``protocol.file_path_problem``), applied by the
control plane before anything moves and again by the agent before it touches the desktop."""

from __future__ import annotations

import pytest

from agent_clients import protocol


@pytest.mark.parametrize(
    "path",
    ["Uploads/report.pdf", "a", "Uploads/with space.txt", "Ünïcode/файл.txt", "dir/sub/deep/file", "x" * 255],
)
def test_paths_relative_to_the_home_pass(path):
    assert protocol.file_path_problem(path) is None


@pytest.mark.parametrize(
    "path, why",
    [
        ("../etc/passwd", "'..'"),
        ("Uploads/../../etc", "'..'"),
        ("Uploads/./x", "'.'"),
        ("/etc/passwd", "absolute"),
        ("Uploads//x", "empty"),
        ("Uploads/", "empty"),
        ("Uploads/a\x00b", "NUL"),
        ("Uploads/a\nb", "control"),
        ("Uploads/a\ud800", "Unicode"),
        ("", "empty"),
        ("x" * 256, "255 bytes"),
        ("é" * 128, "255 bytes"),  # 256 bytes in UTF-8
        ("a/" * 2100 + "a", "4096"),
    ],
)
def test_paths_that_could_leave_the_home_or_not_be_stored_are_refused(path, why):
    problem = protocol.file_path_problem(path)
    assert problem is not None and why in problem


def test_the_home_itself_may_be_listed_but_not_written():
    assert protocol.file_path_problem("", allow_empty=True) is None
    assert protocol.file_path_problem("") is not None


def test_the_agent_refuses_a_tunnel_open_whose_file_request_breaks_the_rule():
    ok = protocol.encode("tunnel_open", {"tunnel_id": 1, "session_id": "s", "file": {"op": "get", "path": "a/b"}})
    assert protocol.decode_control_message(ok).payload["file"]["path"] == "a/b"
    for file in [
        {"op": "get", "path": "../x"},
        {"op": "delete", "path": "x"},
        {"op": "put", "path": "x"},  # no size
        {"op": "put", "path": "x", "size": -1},
    ]:
        frame = protocol.encode("tunnel_open", {"tunnel_id": 1, "session_id": "s", "file": file})
        with pytest.raises(protocol.ProtocolError):
            protocol.decode_control_message(frame)
    plain = protocol.encode("tunnel_open", {"tunnel_id": 1, "session_id": "s"})  # VNC, as before
    assert "file" not in protocol.decode_control_message(plain).payload
