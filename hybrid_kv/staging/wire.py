"""Side-channel framing: `MAGIC | u32 header length | u64 payload length | JSON header | payload`.

Every read is bounded by a deadline; a short read, a bad magic, oversized lengths or a header that is
not a JSON object raise `ProtocolError` naming what was wrong, and nothing of that message is used.
"""

from __future__ import annotations

import json
import select
import socket
import struct
import time

MAGIC = b"HKV1"
_HEAD = struct.Struct("!4sIQ")
MAX_HEADER = 1 << 20
MAX_PAYLOAD = 64 << 20


class ProtocolError(RuntimeError):
    """A malformed, truncated or unexpected side-channel message."""


class PeerClosed(ProtocolError):
    """The peer closed the connection (or died) before a whole message arrived."""


def wait_readable(sock, timeout: float | None) -> bool:
    """Whether `sock` is readable (data, EOF or an error) within `timeout` s (None: no limit). poll, not
    select: a serving process holds thousands of descriptors (UCX, NIXL agents), and select() refuses any
    descriptor numbered 1024 or more."""
    poller = select.poll()
    poller.register(sock, select.POLLIN | select.POLLPRI | select.POLLERR | select.POLLHUP)
    return bool(poller.poll(None if timeout is None else max(0, int(timeout * 1000))))


def send_msg(sock: socket.socket, header: dict, payload: bytes = b"") -> None:
    h = json.dumps(header, separators=(",", ":")).encode()
    if len(h) > MAX_HEADER or len(payload) > MAX_PAYLOAD:
        raise ProtocolError(f"message too large (header {len(h)} B, payload {len(payload)} B)")
    sock.sendall(_HEAD.pack(MAGIC, len(h), len(payload)) + h + payload)


def _recv_exact(sock: socket.socket, n: int, deadline: float, what: str) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"timed out reading {what} ({len(buf)} of {n} bytes)")
        sock.settimeout(left)
        try:
            chunk = sock.recv(n - len(buf))
        except TimeoutError as e:
            raise TimeoutError(f"timed out reading {what} ({len(buf)} of {n} bytes)") from e
        except (ConnectionResetError, BrokenPipeError) as e:
            raise PeerClosed(f"connection reset while reading {what}") from e
        if not chunk:
            if buf or what != "message head":
                raise PeerClosed(f"truncated message: {what} ended after {len(buf)} of {n} bytes")
            raise PeerClosed("peer closed the connection")
        buf += chunk
    return bytes(buf)


def recv_msg(sock: socket.socket, timeout: float) -> tuple[dict, bytes]:
    deadline = time.monotonic() + timeout
    magic, hlen, plen = _HEAD.unpack(_recv_exact(sock, _HEAD.size, deadline, "message head"))
    if magic != MAGIC:
        raise ProtocolError(f"bad magic {magic!r} (expected {MAGIC!r}): not a hybrid-kv peer")
    if hlen > MAX_HEADER or plen > MAX_PAYLOAD:
        raise ProtocolError(f"declared lengths too large (header {hlen} B, payload {plen} B)")
    raw = _recv_exact(sock, hlen, deadline, "header")
    payload = _recv_exact(sock, plen, deadline, "payload") if plen else b""
    return _parse_header(raw), payload


def _parse_header(raw: bytes) -> dict:
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise ProtocolError(f"header is not valid JSON: {e}") from e
    if not isinstance(header, dict) or not isinstance(header.get("type"), str):
        raise ProtocolError("header must be a JSON object with a string 'type'")
    return header


def expect(header: dict, *types: str) -> dict:
    if header.get("type") == "error":
        raise RuntimeError(f"peer refused: {header.get('message')}")
    if header.get("type") not in types:
        raise ProtocolError(f"unexpected message {header.get('type')!r} (expected {' or '.join(types)})")
    return header


class FrameReader:
    """Incremental framing for an event loop: `read()` takes whatever bytes have arrived (never
    blocking) and returns the messages now complete. A message that started more than `deadline_s` ago
    and is still partial is `stale`: the loop drops that peer, and no other peer waits for it."""

    CHUNK = 1 << 16

    def __init__(self, sock: socket.socket, deadline_s: float) -> None:
        self.sock, self.deadline_s = sock, deadline_s
        self._buf = bytearray()
        self._since: float | None = None  # when the first byte of the partial message arrived

    def read(self) -> list[tuple[dict, bytes]]:
        while True:
            try:
                chunk = self.sock.recv(self.CHUNK, socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                break
            except (ConnectionResetError, BrokenPipeError) as e:
                raise PeerClosed("connection reset") from e
            if not chunk:
                raise PeerClosed("truncated message" if self._buf else "peer closed the connection")
            self._buf += chunk
            if len(chunk) < self.CHUNK:
                break
        out = []
        while len(self._buf) >= _HEAD.size:
            magic, hlen, plen = _HEAD.unpack_from(self._buf)
            if magic != MAGIC:
                raise ProtocolError(f"bad magic {bytes(magic)!r} (expected {MAGIC!r}): not a hybrid-kv peer")
            if hlen > MAX_HEADER or plen > MAX_PAYLOAD:
                raise ProtocolError(f"declared lengths too large (header {hlen} B, payload {plen} B)")
            end = _HEAD.size + hlen + plen
            if len(self._buf) < end:
                break
            raw, payload = bytes(self._buf[_HEAD.size : _HEAD.size + hlen]), bytes(self._buf[_HEAD.size + hlen : end])
            del self._buf[:end]
            out.append((_parse_header(raw), payload))
        self._since = (self._since or time.monotonic()) if self._buf else None
        return out

    def wait(self, deadline: float, what: str) -> list[tuple[dict, bytes]]:
        """The next messages (at least one), waiting until `deadline` (monotonic; TimeoutError after)."""
        while True:
            msgs = self.read()
            if msgs:
                return msgs
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{what}: no answer in time")
            wait_readable(self.sock, left)

    def stale(self, now: float) -> bool:
        return self._since is not None and now - self._since > self.deadline_s
