"""A desktop stand-in for the VNC relay benchmark: framebuffer updates down, input events up.

Run: python benchmarks/_desktop_sim.py PORT RATE SECONDS   (listens on 127.0.0.1:PORT)

Every connection gets its own byte stream, framed as ``[1 byte type][4 byte length, big
endian][payload]``:

* ``D``: framebuffer data, RATE*TICK bytes (20 KB at 2 MB/s) every TICK (10 ms), paced on
  an absolute clock, exactly RATE*SECONDS payload bytes in all. The payload is
  deterministic pseudo-random data (slices of a seeded pool, at offsets derived from a
  per-connection seed), so streams differ from one another;
* ``P``: the answer to an input probe, carrying the probe back. The client sends fixed
  16-byte probes (8-byte float send time, 8-byte sequence number); each is answered as
  soon as it is read, written into the same outgoing stream as the data, so its round
  trip includes queueing behind framebuffer data (what a user feels between a key press
  and the screen reacting);
* ``E``: the end, once all data is sent: 8-byte total of data payload bytes and the
  32-byte sha256 of all of them, in order. The connection then stays open (probes are
  still answered) until the client closes it.

Data starts with the first probe (the viewer's first input), so a client can open all its
viewers first and start them together.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import random
import socket
import struct
import sys
import time

TICK = 0.010
PROBE = 16
POOL_SIZE = 1 << 23  # 8 MiB of seeded pseudo-random bytes, sliced per chunk
HEADER = struct.Struct(">cI")

_pool: bytes = b""
_seeds = itertools.count(1)


def frame(kind: bytes, payload: bytes | memoryview) -> list:
    return [HEADER.pack(kind, len(payload)), payload]


def chunk(seed: int, k: int, size: int) -> memoryview:
    """Chunk ``k`` of the stream with ``seed``: ``size`` bytes of the pool."""
    offset = (seed * 1_000_003 + k * 65_537) % (POOL_SIZE - size)
    return memoryview(_pool)[offset : offset + size]


async def serve_one(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, rate: int, seconds: float) -> None:
    seed = next(_seeds)
    sock = writer.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    first_probe = asyncio.Event()

    async def answer_probes() -> None:
        while True:
            try:
                probe = await reader.readexactly(PROBE)
            except (asyncio.IncompleteReadError, ConnectionError):
                return
            first_probe.set()
            writer.writelines(frame(b"P", probe))

    prober = asyncio.create_task(answer_probes())
    try:
        await first_probe.wait()
        total = int(rate * seconds)
        size = max(1, int(rate * TICK))
        digest = hashlib.sha256()
        sent, start = 0, time.perf_counter()
        for k in itertools.count():
            if sent >= total:
                break
            delay = start + k * TICK - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            payload = chunk(seed, k, min(size, total - sent))
            digest.update(payload)
            writer.writelines(frame(b"D", payload))
            sent += len(payload)
            await writer.drain()
        writer.writelines(frame(b"E", struct.pack(">Q", sent) + digest.digest()))
        await writer.drain()
        await prober  # until the client closes
    except ConnectionError:
        pass
    finally:
        prober.cancel()
        writer.close()


async def main(port: int, rate: int, seconds: float) -> None:
    global _pool
    _pool = random.Random(0x5EED).randbytes(POOL_SIZE)
    server = await asyncio.start_server(lambda r, w: serve_one(r, w, rate, seconds), "127.0.0.1", port, backlog=1024)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    if len(sys.argv) != 4:
        sys.exit("usage: _desktop_sim.py PORT RATE SECONDS")
    asyncio.run(main(int(sys.argv[1]), int(float(sys.argv[2])), float(sys.argv[3])))
