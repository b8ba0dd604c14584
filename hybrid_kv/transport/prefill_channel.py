"""The prefill rank's side channel: accepting decode ranks, framing without blocking the loop, the hello
(and, with a shared secret, the challenge: `hybrid_kv.staging.auth`) and the dispatch of each message of
the vocabulary (`hybrid_kv.staging.messages`). A mixin of `PrefillEndpoint`, which owns the state."""

from __future__ import annotations

import selectors
import socket
import time
from collections import deque
from dataclasses import dataclass

from hybrid_kv.layout import RankLayout
from hybrid_kv.plan import TransferPlan
from hybrid_kv.staging import messages as M
from hybrid_kv.staging.auth import SECRET_ENV, AuthError, ServerAuth
from hybrid_kv.staging.wire import FrameReader, PeerClosed, ProtocolError, send_msg
from hybrid_kv.transport.common import check_peer, hello_fields

MSG_TIMEOUT_S = 10.0  # a message whose first byte arrived must be complete within this
SEND_TIMEOUT_S = 5.0  # replies are small: a peer whose receive buffer stays full is gone


@dataclass
class Peer:
    sock: socket.socket
    agent: str | None = None
    tp_size: int = 0
    tp_rank: int = 0
    layouts: list | None = None  # the decode side's layouts, as this rank computes them
    block_size: int = 16  # the decode side's cache block size
    part: tuple | None = None  # what this rank packs for the peer (None: nothing, it reads page to page)
    auth: ServerAuth | None = None
    reader: FrameReader | None = None
    hello: dict | None = None  # a challenged hello, served once its `auth` checks


class SideChannel:
    """Needs `PrefillEndpoint`'s server socket, selector, peers, agent, pool and `_forget_work`."""

    def _accept(self) -> None:
        try:
            sock, _ = self.server.accept()
        except BlockingIOError:
            return
        # reads never block (FrameReader); a send to a peer that stopped reading fails after SEND_TIMEOUT_S
        # and drops that peer
        sock.settimeout(SEND_TIMEOUT_S)
        peer = Peer(sock, auth=ServerAuth(self.secret), reader=FrameReader(sock, MSG_TIMEOUT_S))
        self.peers[sock.fileno()] = peer
        self.sel.register(sock, selectors.EVENT_READ, peer)

    def _drop(self, peer: Peer, why: str) -> None:
        """A decode rank went away: free everything it held, forget its agent."""
        self.stats["disconnects"] += 1
        self.last_disconnect = f"decode rank {peer.tp_rank} ({peer.agent or 'no handshake'}): {why}"
        self._forget_work(peer)
        if peer.agent:
            self.agent.remove_remote(peer.agent)
        if peer.sock.fileno() in self.peers:
            self.sel.unregister(peer.sock)
            self.peers.pop(peer.sock.fileno(), None)
        peer.sock.close()

    def _on_readable(self, peer: Peer) -> None:
        """Whatever this peer sent: never blocks (a partial message waits in its reader, bounded by
        `_drop_stale`), and an error on this connection drops this peer only."""
        try:
            msgs = peer.reader.read()
        except PeerClosed as e:
            self._drop(peer, str(e))
            return
        except ProtocolError as e:
            self._error(peer, f"malformed message: {e}")
            self._drop(peer, str(e))
            return
        for msg, payload in msgs:
            if peer.sock.fileno() not in self.peers:
                return  # dropped by an earlier message of this read
            try:
                self._dispatch(peer, msg, payload)
            except OSError as e:  # a reply could not be sent: that peer is gone, the rest are served
                self._drop(peer, f"send failed: {e}")

    def _drop_stale(self, now: float) -> None:
        for peer in [p for p in self.peers.values() if p.reader.stale(now)]:
            self._error(peer, f"message incomplete after {MSG_TIMEOUT_S:g} s")
            self._drop(peer, "message incomplete")

    def _dispatch(self, peer: Peer, msg: dict, payload: bytes) -> None:
        kind = str(msg["type"])[:32]
        self.messages[kind] = self.messages.get(kind, 0) + 1
        try:
            if msg["type"] == M.HELLO:
                if peer.agent is not None or peer.hello is not None:
                    raise ProtocolError("second hello on one connection")
                if peer.auth.required:  # nothing is revealed before the decode rank proves the secret
                    send_msg(peer.sock, peer.auth.challenge(msg))
                    peer.hello = msg
                elif msg.get("auth"):
                    raise AuthError(
                        f"this prefill rank has no shared secret ({SECRET_ENV}) but the decode rank authenticates: "
                        "set the same secret on both"
                    )
                else:
                    self._hello(peer, msg, payload)
            elif msg["type"] == M.AUTH and peer.hello is not None and peer.agent is None:
                peer.auth.check(msg)
                hello, peer.hello = peer.hello, None
                self._hello(peer, hello, payload)
            elif peer.agent is None:
                raise ProtocolError(f"{msg['type']!r} before a successful hello")
            elif msg["type"] == M.MODE:  # a new run: what is still held for the last one is stale
                peer.part = M.part(msg.get("part"))
                self._forget_work(peer)
                send_msg(peer.sock, {"type": M.MODE_OK})
            elif msg["type"] == M.PING:  # the decode rank's cost model measures the round trip
                send_msg(peer.sock, {"type": M.PONG, "now": time.monotonic()})  # also the decode's lease clock
            elif msg["type"] == M.RELEASE:  # a request the decode rank gave up: free what it staged
                req = M.request_id(msg.get("req"))
                self._free(lambda k, p=peer, r=req: k[0] == id(p) and k[1] == r)
                self.waiting = deque(w for w in self.waiting if not (w.peer is peer and w.req == req))
            elif msg["type"] == M.BYE:
                self._drop(peer, "bye")
            else:
                raise ProtocolError(f"unknown message type {msg['type']!r}")
        except AuthError as e:  # refused before anything of this rank was revealed
            self.stats["refused_auth"] += 1
            self._error(peer, str(e))
            self._drop(peer, str(e))
        except (ValueError, KeyError, TypeError, ProtocolError) as e:
            self._error(peer, str(e), req=msg.get("req"))
            if msg.get("type") in (M.HELLO, M.AUTH) or isinstance(e, ProtocolError):
                self.stats["refused_handshakes"] += msg.get("type") in (M.HELLO, M.AUTH)
                self._drop(peer, str(e))

    def _error(self, peer: Peer, message: str, **extra) -> None:
        try:
            send_msg(peer.sock, {"type": M.ERROR, "message": message, **extra})
        except OSError:
            pass

    def _hello(self, peer: Peer, msg: dict, payload: bytes) -> None:
        """Serve a (checked, or authenticated) hello: `_dispatch` refused a second one already."""
        dec = check_peer(self.layout, msg, "prefill", "decode")
        if not payload or not isinstance(msg.get("agent"), str):
            raise ValueError("decode hello lacks its NIXL agent name or metadata")
        peer.tp_size, peer.tp_rank, peer.block_size = dec.tp_size, dec.tp_rank, dec.cache_block_size
        peer.layouts = [
            RankLayout(dec.spec, dec.tp_size, r, dec.conv_layout, dec.kv_layout, dec.cache_block_size)
            for r in range(dec.tp_size)
        ]
        # Only decode ranks that read from this rank may connect.
        probe = TransferPlan(self.layouts, peer.layouts, 1, self.unit_bytes)
        if self.rank not in probe.sources_of(dec.tp_rank):
            raise ValueError(
                f"decode rank {dec.tp_rank} of TP {dec.tp_size} reads nothing from prefill rank "
                f"{self.rank} of TP {self.cfg.tp_size}"
            )
        try:
            peer.agent = self.agent.add_remote(payload)
        except Exception as e:  # NIXL's refusal (e.g. of an agent name it holds already) ends this hello only
            name = str(msg["agent"])[:200]
            raise ValueError(f"decode agent {name!r}: NIXL refused its metadata ({type(e).__name__})") from e
        send_msg(
            peer.sock,
            {
                "type": M.WELCOME,
                **hello_fields(self.layout, self.cfg),
                "agent": self.agent.name,
                "cache": self.cache_reg,
                "staging": self.staging_reg,
                "max_unit_bytes": self.unit_bytes,
                "lease_s": self.opts.lease_s,  # the decode rank READs each unit well within it
            },
            self.agent.metadata(),
        )
