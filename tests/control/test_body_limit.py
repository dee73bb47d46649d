"""Request bodies are bounded before they are buffered: an anonymous 100 MB POST is
refused with a JSON 413 and the Daphne process that served it does not grow. Each test
runs its own Daphne process, so the memory measured is that request's alone."""

from __future__ import annotations

import asyncio
import itertools
import json
import socket

import psutil
import pytest

from streamspace.body_limit import BodyLimit, detail
from tests.live import ControlPlane

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]

MiB = 1024 * 1024
HUNDRED_MB = 100 * 1000 * 1000
BLOCK = b"x" * (64 * 1024)


@pytest.fixture
def daphne():
    cp = ControlPlane("daphne-body-limit").start()
    yield cp
    cp.stop()


def rss(cp: ControlPlane) -> int:
    return psutil.Process(cp.proc.pid).memory_info().rss


def blocks(total: int):
    """``total`` bytes in 64 KiB blocks, never all in memory."""
    full, rest = divmod(total, len(BLOCK))
    yield from itertools.repeat(BLOCK, full)
    if rest:
        yield BLOCK[:rest]


def chunked(total: int):
    for block in blocks(total):
        yield b"%x\r\n" % len(block) + block + b"\r\n"
    yield b"0\r\n\r\n"


def post(cp: ControlPlane, path: str, headers: dict[str, str], body) -> tuple[int, dict]:
    """POST ``body`` (an iterable of byte blocks) over a raw socket, streaming it; the server
    may answer and close before the body is all sent. Returns (status, JSON body)."""
    head = f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
    head += "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
    with socket.create_connection(("127.0.0.1", cp.port), timeout=60) as s:
        try:
            s.sendall(head.encode())
            for block in body:
                s.sendall(block)
        except (BrokenPipeError, ConnectionResetError):
            pass  # refused mid-body: the answer is already waiting
        raw = b""
        try:
            while chunk := s.recv(65536):
                raw += chunk
                if b"\r\n\r\n" in raw and _complete(raw):
                    break
        except ConnectionResetError:
            pass
    head_bytes, _, payload = raw.partition(b"\r\n\r\n")
    status = int(head_bytes.split(b" ", 2)[1])
    return status, json.loads(payload) if payload else {}


def _complete(raw: bytes) -> bool:
    head, _, payload = raw.partition(b"\r\n\r\n")
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return len(payload) >= int(value)
    return False


def warm_up(cp: ControlPlane) -> None:
    """Load what the first requests load (Django's URL resolver, DRF, the JSON parser), so
    the figures compare a served process with a served process."""
    for _ in range(3):
        cp.request("POST", "/api/v1/auth/token", body={"username": "nobody", "password": "x" * 1000})
        post(cp, "/api/v1/auth/token", {"Content-Length": str(3 * MiB)}, blocks(3 * MiB))


def test_an_anonymous_100_mb_post_is_refused_by_its_length_and_daphne_does_not_grow(daphne):
    warm_up(daphne)
    before = rss(daphne)
    status, body = post(daphne, "/api/v1/auth/token", {"Content-Length": str(HUNDRED_MB)}, blocks(HUNDRED_MB))
    assert status == 413
    assert body["error"] == "too_large" and "bytes" in body["detail"]
    assert daphne.request("GET", "/healthz")[0] == 200  # the process is up and the request over
    growth = rss(daphne) - before
    print(f"RSS growth after a 100 MB anonymous POST: {growth / MiB:.2f} MiB")
    assert growth < 8 * MiB


def test_a_chunked_body_is_refused_once_it_passes_the_limit(daphne):
    warm_up(daphne)
    before = rss(daphne)
    status, body = post(daphne, "/api/v1/auth/token", {"Transfer-Encoding": "chunked"}, chunked(HUNDRED_MB))
    assert status == 413 and body["error"] == "too_large"
    assert daphne.request("GET", "/healthz")[0] == 200
    growth = rss(daphne) - before
    print(f"RSS growth after a 100 MB chunked POST: {growth / MiB:.2f} MiB")
    assert growth < 8 * MiB


def test_a_body_within_the_limit_reaches_the_api(daphne):
    """A 1 MiB JSON body (half the default limit), chunked or not, is the API's to answer."""
    payload = json.dumps({"username": "nobody", "password": "x" * MiB}).encode()
    status, body = post(daphne, "/api/v1/auth/token", {"Content-Length": str(len(payload))}, [payload])
    assert status in (400, 401) and body["error"] != "too_large"
    status, body = post(daphne, "/api/v1/auth/token", {"Transfer-Encoding": "chunked"},
                        [b"%x\r\n" % len(payload) + payload + b"\r\n0\r\n\r\n"])  # fmt: skip
    assert status in (400, 401) and body["error"] != "too_large"


def test_the_limit_is_settable():
    cp = ControlPlane("daphne-small-limit", MAX_REQUEST_BODY="4096").start()
    try:
        payload = json.dumps({"username": "nobody", "password": "x" * 5000}).encode()
        status, body = post(cp, "/api/v1/auth/token", {"Content-Length": str(len(payload))}, [payload])
        assert status == 413 and "4096" in body["detail"]
    finally:
        cp.stop()


def run_asgi(app, headers: list[tuple[bytes, bytes]], chunks) -> tuple[list[dict], int]:
    """Speak ASGI to ``app`` as a server would, the body pulled from ``chunks`` only as the
    application asks: (the messages it sent, how many body chunks it pulled)."""
    chunks = iter(chunks)
    pulled, sent = 0, []

    async def receive():
        nonlocal pulled
        chunk = next(chunks, None)
        if chunk is None:
            return {"type": "http.disconnect"}
        pulled += 1
        return {"type": "http.request", "body": chunk[0], "more_body": chunk[1]}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/api/v1/auth/token", "headers": headers}
    asyncio.run(app(scope, receive, send))
    return sent, pulled


async def echo(scope, receive, send):
    """An application that reads the whole body and answers its length."""
    size, more = 0, True
    while more:
        message = await receive()
        size, more = size + len(message.get("body", b"")), message.get("more_body", False)
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": str(size).encode()})


def streamed(total: int):
    sizes = [len(b) for b in blocks(total)]
    return ((BLOCK[:n], i < len(sizes) - 1) for i, n in enumerate(sizes))


def test_the_asgi_middleware_refuses_by_content_length_without_reading_the_body():
    """For servers that stream bodies to the application (uvicorn, hypercorn)."""
    sent, pulled = run_asgi(BodyLimit(echo, limit=MiB), [(b"content-length", b"%d" % HUNDRED_MB)], streamed(HUNDRED_MB))
    assert pulled == 0
    assert sent[0]["status"] == 413
    assert json.loads(sent[1]["body"]) == {"error": "too_large", "detail": detail(MiB)}


def test_the_asgi_middleware_stops_a_chunked_body_once_past_the_limit():
    sent, pulled = run_asgi(BodyLimit(echo, limit=MiB), [(b"transfer-encoding", b"chunked")], streamed(HUNDRED_MB))
    assert pulled == MiB // len(BLOCK) + 1
    assert sent[0]["status"] == 413 and json.loads(sent[1]["body"])["error"] == "too_large"


def test_the_asgi_middleware_passes_bodies_within_the_limit_whole():
    for headers in ([(b"content-length", b"%d" % MiB)], [(b"transfer-encoding", b"chunked")]):
        sent, _ = run_asgi(BodyLimit(echo, limit=MiB), headers, streamed(MiB))
        assert sent[0]["status"] == 200 and sent[1]["body"] == b"%d" % MiB
