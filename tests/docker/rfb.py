"""A minimal RFB (VNC) client for tests: version, VncAuth, ServerInit."""

from __future__ import annotations

import socket
import struct

from cryptography.hazmat.decrepit.ciphers.algorithms import TripleDES
from cryptography.hazmat.primitives.ciphers import Cipher, modes


class RFBError(Exception):
    pass


def _reverse_bits(byte: int) -> int:
    return int(f"{byte:08b}"[::-1], 2)


def vnc_auth_response(password: str, challenge: bytes) -> bytes:
    """VncAuth: DES-encrypt the 16-byte challenge with the password as the key, where
    the password is cut/padded to 8 bytes and every key byte has its bits reversed."""
    key = bytes(_reverse_bits(b) for b in password.encode("latin-1")[:8].ljust(8, b"\0"))
    # Single DES == triple DES with three equal keys (cryptography dropped 8-byte keys).
    encryptor = Cipher(TripleDES(key * 3), modes.ECB()).encryptor()  # noqa: S305 (RFB mandates DES-ECB)
    return encryptor.update(challenge) + encryptor.finalize()


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise RFBError(f"connection closed after {len(data)} of {n} bytes")
        data += chunk
    return data


def handshake(host: str, port: int, password: str, timeout: float = 5.0) -> tuple[int, int, str]:
    """Log in with VncAuth and read ServerInit; return (width, height, desktop name).
    Raises RFBError when the server refuses."""
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.settimeout(timeout)
        version = _recv_exactly(sock, 12)
        if not version.startswith(b"RFB 003."):
            raise RFBError(f"not an RFB server: {version!r}")
        sock.sendall(b"RFB 003.008\n")
        (count,) = struct.unpack("B", _recv_exactly(sock, 1))
        if count == 0:
            (length,) = struct.unpack(">I", _recv_exactly(sock, 4))
            raise RFBError(f"server refused: {_recv_exactly(sock, length).decode(errors='replace')}")
        types = _recv_exactly(sock, count)
        if 2 not in types:
            raise RFBError(f"server offers no VncAuth: {list(types)}")
        sock.sendall(b"\x02")
        challenge = _recv_exactly(sock, 16)
        sock.sendall(vnc_auth_response(password, challenge))
        (result,) = struct.unpack(">I", _recv_exactly(sock, 4))
        if result != 0:
            reason = ""
            try:
                (length,) = struct.unpack(">I", _recv_exactly(sock, 4))
                reason = _recv_exactly(sock, length).decode(errors="replace")
            except (RFBError, OSError):
                pass
            raise RFBError(f"authentication failed: {reason}")
        sock.sendall(b"\x01")  # ClientInit: shared
        width, height = struct.unpack(">HH", _recv_exactly(sock, 4))
        _recv_exactly(sock, 16)  # pixel format
        (name_length,) = struct.unpack(">I", _recv_exactly(sock, 4))
        name = _recv_exactly(sock, name_length).decode(errors="replace")
        return width, height, name


class Viewer:
    """A logged-in RFB connection that can read the framebuffer (raw encoding) and type."""

    def __init__(self, host: str, port: int, password: str, timeout: float = 10.0) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.settimeout(timeout)
        try:
            self._login(password)
        except BaseException:
            self.sock.close()
            raise

    def _login(self, password: str) -> None:
        s = self.sock
        _recv_exactly(s, 12)
        s.sendall(b"RFB 003.008\n")
        (count,) = struct.unpack("B", _recv_exactly(s, 1))
        if 2 not in _recv_exactly(s, count):
            raise RFBError("no VncAuth")
        s.sendall(b"\x02")
        s.sendall(vnc_auth_response(password, _recv_exactly(s, 16)))
        if struct.unpack(">I", _recv_exactly(s, 4))[0] != 0:
            raise RFBError("authentication failed")
        s.sendall(b"\x01")
        self.width, self.height = struct.unpack(">HH", _recv_exactly(s, 4))
        self.bpp = _recv_exactly(s, 16)[0] // 8
        (n,) = struct.unpack(">I", _recv_exactly(s, 4))
        _recv_exactly(s, n)
        s.sendall(struct.pack(">BxHi", 2, 1, 0))  # SetEncodings: raw only

    def frame(self) -> bytes:
        """One full (non-incremental) framebuffer, rectangles concatenated in order."""
        self.sock.sendall(struct.pack(">BBHHHH", 3, 0, 0, 0, self.width, self.height))
        while True:
            (kind,) = struct.unpack("B", _recv_exactly(self.sock, 1))
            if kind == 0:
                break
            if kind == 2:  # Bell
                continue
            if kind == 3:  # ServerCutText
                _recv_exactly(self.sock, 3)
                (n,) = struct.unpack(">I", _recv_exactly(self.sock, 4))
                _recv_exactly(self.sock, n)
                continue
            raise RFBError(f"unexpected server message {kind}")
        _recv_exactly(self.sock, 1)
        (rects,) = struct.unpack(">H", _recv_exactly(self.sock, 2))
        out = []
        for _ in range(rects):
            _x, _y, w, h, enc = struct.unpack(">HHHHi", _recv_exactly(self.sock, 12))
            if enc != 0:
                raise RFBError(f"unexpected encoding {enc}")
            out.append(_recv_exactly(self.sock, w * h * self.bpp))
        return b"".join(out)

    def type(self, text: str) -> None:
        for ch in text:
            keysym = 0xFF0D if ch == "\n" else ord(ch)
            self.sock.sendall(struct.pack(">BBxxI", 4, 1, keysym) + struct.pack(">BBxxI", 4, 0, keysym))

    def close(self) -> None:
        self.sock.close()
