"""The prefill rank's side channel: accepting decode ranks, framing without blocking the loop, the hello
(and, with a shared secret, the challenge: `hybrid_kv.staging.auth`) and the dispatch of each message of
the vocabulary (`hybrid_kv.staging.messages`). The endpoint (`PrefillEndpoint.channel`) owns what is staged
and queued; the channel owns the connections."""

from __future__ import annotations

import selectors
import socket
import time
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


class PrefillChannel:
    """The listening socket, its selector and the decode ranks connected to it (`peers`, by socket number);
    `ep`: the endpoint (its agent, layouts, registrations, what it holds per peer: `forget_work`, `release`)."""

    def __init__(self, ep, host: str, port: int) -> None:
        self.ep = ep
        self.sel = selectors.DefaultSelector()
        self.server = socket.create_server((host, port))
        self.server.setblocking(False)
        self.sel.register(self.server, selectors.EVENT_READ, None)
        self.port = self.server.getsockname()[1]
        self.peers: dict[int, Peer] = {}
        self.messages: dict[str, int] = {}  # side-channel messages received, by type (in counts())
        self.last_disconnect = ""  # why the last decode peer went away (in counts(), for operators)

    def poll(self, timeout: float) -> None:
        """Whatever the decode ranks sent within `timeout` (new connections too); drop those whose message
        stalled."""
        for key, _ in self.sel.select(timeout):
            if key.data is None:
                self._accept()
            else:
                self._on_readable(key.data)
        self._drop_stale(time.monotonic())

    def close(self) -> None:
        for peer in list(self.peers.values()):
            self.drop(peer, "shutdown")
        self.sel.close()
        self.server.close()

    def _accept(self) -> None:
        try:
            sock, _ = self.server.accept()
        except BlockingIOError:
            return
        # reads never block (FrameReader); a send to a peer that stopped reading fails after SEND_TIMEOUT_S
        # and drops that peer
        sock.settimeout(SEND_TIMEOUT_S)
        peer = Peer(sock, auth=ServerAuth(self.ep.secret), reader=FrameReader(sock, MSG_TIMEOUT_S))
        self.peers[sock.fileno()] = peer
        self.sel.register(sock, selectors.EVENT_READ, peer)

    def drop(self, peer: Peer, why: str) -> None:
        """A decode rank went away: free everything it held, forget its agent."""
        self.ep.stats["disconnects"] += 1
        self.last_disconnect = f"decode rank {peer.tp_rank} ({peer.agent or 'no handshake'}): {why}"
        self.ep.forget_work(peer)
        if peer.agent:
            self.ep.agent.remove_remote(peer.agent)
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
            self.drop(peer, str(e))
            return
        except ProtocolError as e:
            self.error(peer, f"malformed message: {e}")
            self.drop(peer, str(e))
            return
        for msg, payload in msgs:
            if peer.sock.fileno() not in self.peers:
                return  # dropped by an earlier message of this read
            try:
                self._dispatch(peer, msg, payload)
            except OSError as e:  # a reply could not be sent: that peer is gone, the rest are served
                self.drop(peer, f"send failed: {e}")

    def _drop_stale(self, now: float) -> None:
        for peer in [p for p in self.peers.values() if p.reader.stale(now)]:
            self.error(peer, f"message incomplete after {MSG_TIMEOUT_S:g} s")
            self.drop(peer, "message incomplete")

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
                self.ep.forget_work(peer)
                send_msg(peer.sock, {"type": M.MODE_OK})
            elif msg["type"] == M.PING:  # the decode rank's cost model measures the round trip
                send_msg(peer.sock, {"type": M.PONG, "now": time.monotonic()})  # also the decode's lease clock
            elif msg["type"] == M.RELEASE:  # a request the decode rank gave up: free what it staged
                self.ep.release(peer, M.request_id(msg.get("req")))
            elif msg["type"] == M.BYE:
                self.drop(peer, "bye")
            else:
                raise ProtocolError(f"unknown message type {msg['type']!r}")
        except AuthError as e:  # refused before anything of this rank was revealed
            self.ep.stats["refused_auth"] += 1
            self.error(peer, str(e))
            self.drop(peer, str(e))
        except (ValueError, KeyError, TypeError, ProtocolError) as e:
            self.error(peer, str(e), req=msg.get("req"))
            if msg.get("type") in (M.HELLO, M.AUTH) or isinstance(e, ProtocolError):
                self.ep.stats["refused_handshakes"] += msg.get("type") in (M.HELLO, M.AUTH)
                self.drop(peer, str(e))

    def error(self, peer: Peer, message: str, **extra) -> None:
        try:
            send_msg(peer.sock, {"type": M.ERROR, "message": message, **extra})
        except OSError:
            pass

    def _hello(self, peer: Peer, msg: dict, payload: bytes) -> None:
        """Serve a (checked, or authenticated) hello: `_dispatch` refused a second one already."""
        dec = check_peer(self.ep.layout, msg, "prefill", "decode")
        if not payload or not isinstance(msg.get("agent"), str):
            raise ValueError("decode hello lacks its NIXL agent name or metadata")
        peer.tp_size, peer.tp_rank, peer.block_size = dec.tp_size, dec.tp_rank, dec.cache_block_size
        peer.layouts = [
            RankLayout(dec.spec, dec.tp_size, r, dec.conv_layout, dec.kv_layout, dec.cache_block_size)
            for r in range(dec.tp_size)
        ]
        # Only decode ranks that read from this rank may connect.
        probe = TransferPlan(self.ep.layouts, peer.layouts, 1, self.ep.unit_bytes)
        if self.ep.rank not in probe.sources_of(dec.tp_rank):
            raise ValueError(
                f"decode rank {dec.tp_rank} of TP {dec.tp_size} reads nothing from prefill rank "
                f"{self.ep.rank} of TP {self.ep.cfg.tp_size}"
            )
        try:
            peer.agent = self.ep.agent.add_remote(payload)
        except Exception as e:  # NIXL's refusal (e.g. of an agent name it holds already) ends this hello only
            name = str(msg["agent"])[:200]
            raise ValueError(f"decode agent {name!r}: NIXL refused its metadata ({type(e).__name__})") from e
        send_msg(
            peer.sock,
            {
                "type": M.WELCOME,
                **hello_fields(self.ep.layout, self.ep.cfg),
                "agent": self.ep.agent.name,
                "cache": self.ep.cache_reg,
                "staging": self.ep.staging_reg,
                "max_unit_bytes": self.ep.unit_bytes,
                "lease_s": self.ep.opts.lease_s,  # the decode rank READs each unit well within it
            },
            self.ep.agent.metadata(),
        )
