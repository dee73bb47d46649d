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
