"""The decode rank's end of the hybrid-kv side channel (`server.PrefillServer` is the other end)."""

from __future__ import annotations

import queue
import socket
import threading
import time

from hybrid_kv.staging import messages as M
from hybrid_kv.staging.auth import ClientAuth
from hybrid_kv.staging.handshake import check_fingerprints
from hybrid_kv.staging.template import trim_oldest
from hybrid_kv.staging.wire import ProtocolError, expect, recv_msg, send_msg, wait_readable


class PrefillLink:
    """A decode rank's connection to one prefill rank's server: one call at a time; a reader thread takes
    every message, hands replies to the waiting call and keeps `ready` pushes (bounded, the last per
    request) for `take_staged`. A push nobody takes (a request the decode side never READs: a full local
    prefix hit, an abort) goes once its lease ended, when no READ of it could count anyway. In push mode
    the prefill rank's `push-end` messages (a grant it will not use) are kept for `take_ended`."""

    MAX_STAGED = 4096  # pushes kept for requests this rank has not reached yet
    PURGE_EVERY_S = 1.0

    def __init__(self, host: str, port: int, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self.address = f"{host}:{port}"
        self._lock = threading.Lock()
        try:
            self._sock = socket.create_connection((host, port), timeout=timeout_s)
        except OSError as e:
            raise ConnectionError(f"hybrid-kv side channel {host}:{port} unreachable: {e}") from e
        self._sock.settimeout(None)  # the reader blocks; calls wait on their own deadline
        self.peer: dict = {}
        self.clock: M.LeaseClock | None = None
        self._replies: queue.Queue = queue.Queue()
        self._staged: dict[str, dict] = {}
        self._ended: dict[str, str] = {}  # push mode: request -> why the prefill rank will not WRITE it
        self._staged_lock = threading.Lock()
        self._next_purge = 0.0
        self._reader = threading.Thread(target=self._read, name="hybrid-kv-link-reader", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while True:
            try:
                wait_readable(self._sock, None)  # idle for as long as it likes; woken by close
                head, _ = recv_msg(self._sock, self.timeout_s)  # a message that started must complete
            except (ProtocolError, TimeoutError, OSError, ValueError) as e:
                self._replies.put(e)  # wakes a waiting call; later calls fail at once
                return
            if head.get("type") == M.READY:
                now = time.monotonic()
                with self._staged_lock:
                    self._staged[str(head.get("req"))] = head
                    if now >= self._next_purge:
                        self._next_purge = now + self.PURGE_EVERY_S
                        self._drop_expired(now)
                    trim_oldest(self._staged, self.MAX_STAGED)
            elif head.get("type") == M.PUSH_END:
                with self._staged_lock:
                    self._ended[str(head.get("req"))[: M.MAX_REQUEST_ID]] = str(head.get("why"))[:2000]
                    trim_oldest(self._ended, self.MAX_STAGED)
            else:
                self._replies.put(head)

    def _drop_expired(self, now: float) -> None:
        """(under the lock) forget pushes whose lease has ended here (unreadable ones too: refused anyway)."""
        if self.clock is None:
            return
        for req, push in list(self._staged.items()):
            try:
                gone = self.clock.local(push.get("until")) <= now
            except ValueError:
                gone = True
            if gone:
                del self._staged[req]

    @property
    def staged(self) -> int:
        """Pushes held for requests this rank has not taken."""
        with self._staged_lock:
            return len(self._staged)

    def take_staged(self, request_id: str) -> dict | None:
        """The prefill rank's push for `request_id`, if it came (removed: used once)."""
        with self._staged_lock:
            return self._staged.pop(request_id, None)

    def take_ended(self, request_id: str) -> str | None:
        """Why the prefill rank will WRITE nothing (more) for `request_id`, if it said so (removed)."""
        with self._staged_lock:
            return self._ended.pop(request_id, None)

    @property
    def alive(self) -> bool:
        """False once the connection is lost (the reader ended)."""
        return self._reader.is_alive()

    def call(self, msg: dict, *expected: str) -> dict:
        with self._lock:
            send_msg(self._sock, msg)
            try:
                head = self._replies.get(timeout=self.timeout_s)
            except queue.Empty as e:
                raise TimeoutError(
                    f"no {msg['type']} reply from the prefill rank within hybrid_kv_timeout_s={self.timeout_s:g} s"
                ) from e
            if isinstance(head, BaseException):
                self._replies.put(head)
                raise ConnectionError(f"hybrid-kv side channel lost: {head}") from head
        return expect(head, *expected)

    def pack(self, req: str, blocks: dict[int, list[int]]) -> dict:
        """Ask the prefill rank to stage `req` (its block ids per group) for this rank; its `ready` (unchecked:
        `Receiver.check_ready` checks it) comes ahead of its `ok`."""
        self.call({"type": M.PACK, "req": req, "blocks": [[g, ids] for g, ids in blocks.items()]}, M.OK)
        ready = self.take_staged(req)
        if ready is None:
            raise RuntimeError(f"prefill side channel {self.address} answered pack of {req} without its units")
        return ready

    def send(self, msg: dict) -> None:
        """A message that takes no reply (`release`)."""
        with self._lock:
            send_msg(self._sock, msg)

    def hello(
        self, fingerprint: dict, tp_size: int, tp_rank: int, secret: bytes | None = None, push: dict | None = None
    ) -> dict:
        """hello (and, with a shared secret, the challenge and auth: `hybrid_kv.staging.auth`); the
        prefill rank's welcome is used only once it proved the secret (or neither side has one). `push`
        (push mode): this decode rank's engine id and registered receive staging, where grants point."""
        auth = ClientAuth(secret)
        msg = {"type": M.HELLO, "fingerprint": fingerprint, "tp_size": tp_size, "tp_rank": tp_rank, **(push or {})}
        msg.update(nonce=auth.nonce, auth=secret is not None)
        reply = self.call(msg, M.WELCOME, M.CHALLENGE)
        answer = auth.answer(reply, f"prefill side channel {self.address}")
        if answer is not None:
            reply = self.call(answer, M.WELCOME)
        if not isinstance(reply.get("fingerprint"), dict):
            raise ValueError(f"prefill side channel {self.address} welcome lacks a fingerprint object")
        check_fingerprints(reply["fingerprint"], fingerprint)
        reply["staging"] = M.region(reply.get("staging"), f"prefill side channel {self.address} welcome")
        reply["lease_s"] = M.lease_seconds(reply.get("lease_s"), f"prefill side channel {self.address} welcome")
        self.peer = reply
        self.clock = M.clock_by_ping(lambda: self.call({"type": M.PING}, M.PONG))  # for the lease fence
        return self.peer

    def close(self) -> None:
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        try:
            self._sock.close()
        except OSError:
            pass
        self._reader.join(timeout=5)


def connect(host: str, port: int, timeout_s: float, fingerprint: dict, tp: tuple[int, int], expect: tuple[int, int],
            secret: bytes | None = None, push: dict | None = None) -> PrefillLink:  # fmt: skip
    """A link to one prefill rank's side channel once the hello passed: both sides checked each other's pages,
    and it is prefill rank `expect` (size, rank). `tp`: this decode rank's (size, rank)."""
    link = PrefillLink(host, port, timeout_s)
    try:
        peer = link.hello(fingerprint, *tp, secret, push)
        if (peer["tp_size"], peer["tp_rank"]) != expect:
            raise ValueError(
                f"hybrid-kv side channel {host}:{port} is prefill rank {peer['tp_rank']}/{peer['tp_size']}, "
                f"expected {expect[1]}/{expect[0]}"
            )
    except BaseException:
        link.close()
        raise
    return link
