"""A tiny asyncio TCP server for tunnel tests.

* echo mode (default): writes back every byte it receives;
* sink mode: counts the bytes of each connection and their sha256 (``SinkStats``), and
  writes back nothing. Run standalone it prints ``sink <bytes> <sha256>`` per closed
  connection on stdout.

``python -m tests.support.echo_server PORT [--sink] [--host 127.0.0.1]``
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


async def start_echo_server(host: str = "127.0.0.1", port: int = 0) -> asyncio.Server:
    """An echo server; ``port=0`` picks a free port (``server.sockets[0].getsockname()``)."""
    return await asyncio.start_server(_echo, host, port)


@dataclass
class SinkConnection:
    bytes: int = 0
    sha: hashlib._Hash = field(default_factory=hashlib.sha256)
    closed: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def sha256(self) -> str:
        return self.sha.hexdigest()


@dataclass
class SinkStats:
    connections: list[SinkConnection] = field(default_factory=list)
    changed: asyncio.Event = field(default_factory=asyncio.Event)


async def start_sink_server(
    host: str = "127.0.0.1", port: int = 0, on_close: Callable[[SinkConnection], None] | None = None
) -> tuple[asyncio.Server, SinkStats]:
    """A server that swallows bytes and records their count and sha256 per connection."""
    stats = SinkStats()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = SinkConnection()
        stats.connections.append(conn)
        stats.changed.set()
        try:
            while data := await reader.read(65536):
                conn.bytes += len(data)
                conn.sha.update(data)
                stats.changed.set()
        except (ConnectionError, OSError):
            pass
        finally:
            conn.closed.set()
            stats.changed.set()
            if on_close:
                on_close(conn)
            writer.close()

    return await asyncio.start_server(handle, host, port), stats


async def _main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("port", type=int)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--sink", action="store_true")
    args = parser.parse_args(argv)
    if args.sink:
        server, _ = await start_sink_server(
            args.host, args.port, on_close=lambda c: print(f"sink {c.bytes} {c.sha256}", flush=True)
        )
    else:
        server = await start_echo_server(args.host, args.port)
    print(f"listening on {args.host}:{server.sockets[0].getsockname()[1]}", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_main())
