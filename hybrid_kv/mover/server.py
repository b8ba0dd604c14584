"""The request/ready exchange that lets a prefill rank pack for a decode rank it has never seen.

vLLM's pull flow never tells P the decode side's TP (reference §3.5). Each prefill worker therefore
serves a small TCP side channel (hybrid-kv's framed wire format, every read bounded):

- ``hello``  D -> P: D's TP size, rank and page fingerprint. P recomputes D's pages from its own spec and
  refuses any difference, naming the field; otherwise it answers with its own fingerprint and the
  address of its registered staging pool. D checks P's answer the same way.
- ``pack``   D -> P: a request id, D's TP/rank and P's block ids per Mamba group. P gathers the request's
  state slices for that decode rank into staging slots and answers with (offset, bytes) per transfer
  unit; D then READs one descriptor per unit.
- ``done``   D -> P: the READs finished (or were abandoned): P frees the slots. A closed connection
  and the slot lease free them too.
- ``mode``   D -> P (auto only): ``part`` null: D reads this engine's state with vLLM's stock descriptors,
  so P stops staging for it (``"all"``: packed again); answered ``mode-ok``.
- ``grant``  D -> P (push mode): receive slots for a request's units, which P WRITEs (`grants.GrantDesk`).

Packing runs on the connection's thread, not the engine loop, so an idle prefill engine still answers;
packing at finish (`prepack`) on a thread of its own. What is staged, and how, is the `Sender`'s.
"""

from __future__ import annotations

import itertools
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from hybrid_kv.layout import RankLayout
from hybrid_kv.mover import log
from hybrid_kv.mover.grants import GrantDesk
from hybrid_kv.mover.sender import Sender
from hybrid_kv.staging import messages as M
from hybrid_kv.staging.auth import SECRET_ENV, AuthError, ServerAuth, check_bind
from hybrid_kv.staging.chunk import Blocks, only_moved, pair_groups
from hybrid_kv.staging.handshake import check_fingerprints
from hybrid_kv.staging.template import ALL
from hybrid_kv.staging.wire import PeerClosed, ProtocolError, recv_msg, send_msg, wait_readable

IDLE_TIMEOUT_S = 3600.0  # a decode rank's connection may stay quiet between requests
MSG_TIMEOUT_S = 10.0  # a message whose first byte arrived must be complete within this
MAX_CONNECTIONS = 256  # decode-rank connections served at once (one thread each); more are refused


class PrefillServer:
    """Serves hello/pack/release/grant for one prefill rank; stages through its `Sender`."""

    def __init__(
        self,
        *,
        host: str,
        port: int,
        sender: Sender,
        staging_desc: tuple[int, int, int],
        agent_name: str,
        not_held: Callable[[str], str | None],
        secret: bytes | None = None,
    ) -> None:
        geometry = sender.geom
        check_bind(host, secret, f"hybrid-kv side channel of prefill rank {geometry.layout.tp_rank}")
        self.secret = secret
        self._auth: dict[int, tuple[ServerAuth, dict]] = {}  # connection -> its challenged hello
        self.sender, self.geom = sender, geometry
        self.staging_desc, self.agent_name, self.not_held = staging_desc, agent_name, not_held
        self._ids = itertools.count()
        self._stop = threading.Event()
        self._layouts: dict[tuple, RankLayout] = {}  # decode (tp_size, tp_rank) -> its layout
        # connections that said hello: cid -> (socket, send lock, decode layout); pushes go to them
        self._peers: dict[int, tuple[socket.socket, threading.Lock, RankLayout]] = {}
        self._no_push: set[int] = set()  # connections whose decode rank reads the state the stock way
        self._prepacker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hybrid-kv-prepack")
        self.received: dict[str, int] = {}  # messages received, by type (tests count round trips)
        self.grants = GrantDesk(sender, self.send)
        self._sock = socket.create_server((host, port), reuse_port=False)
        self._sock.settimeout(0.2)
        self.address = self._sock.getsockname()[:2]
        self._threads: list[threading.Thread] = []
        self._accept = threading.Thread(target=self._accept_loop, name="hybrid-kv-prefill-server", daemon=True)
        self._accept.start()

    # ---- life cycle -----------------------------------------------------------------------------------

    def close(self) -> None:
        self._prepacker.shutdown(wait=True, cancel_futures=True)
        self._stop.set()
        self._accept.join(timeout=5)
        for t in self._threads:
            t.join(timeout=5)
        self._sock.close()

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            self._reap()
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self._threads = [x for x in self._threads if x.is_alive()]
            if len(self._threads) >= MAX_CONNECTIONS:
                log.warning("hybrid-kv: side channel at %d connections; refusing another", MAX_CONNECTIONS)
                with conn:
                    self._reply(conn, {"type": M.ERROR, "message": f"over {MAX_CONNECTIONS} connections"})
                continue
            t = threading.Thread(target=self._serve, args=(conn, next(self._ids)), daemon=True)
            self._threads.append(t)
            t.start()

    def _reap(self) -> None:
        expired = self.sender.reap()
        if expired:
            log.warning("hybrid-kv: %d staging slot(s) freed on lease expiry", expired)

    # ---- one decode rank's connection -----------------------------------------------------------------

    def _serve(self, conn: socket.socket, cid: int) -> None:
        with conn:
            quiet = time.monotonic()
            while not self._stop.is_set():
                try:
                    if not wait_readable(conn, 0.5):  # idle: check stop, bound the silence
                        if time.monotonic() - quiet > IDLE_TIMEOUT_S:
                            break
                        continue
                    head, _ = recv_msg(conn, MSG_TIMEOUT_S)
                    quiet = time.monotonic()
                except (PeerClosed, TimeoutError, OSError, ValueError):
                    break
                except ProtocolError as e:
                    log.warning("hybrid-kv: malformed message from a decode rank: %s", e)
                    self._reply(conn, {"type": M.ERROR, "message": str(e)})
                    break
                kind = str(head["type"])[:32]
                self.received[kind] = self.received.get(kind, 0) + 1
                try:
                    reply = self._handle(head, cid, conn)
                except (ProtocolError, AuthError) as e:  # out of protocol or not authenticated: refuse, close
                    self._reply(conn, {"type": M.ERROR, "message": str(e)}, cid)
                    break
                except Exception as e:  # refused: tell the decode rank why, keep serving
                    reply = {"type": M.ERROR, "message": f"{type(e).__name__}: {e}"}
                    if head["type"] in (M.RELEASE, M.GRANT):  # no reply expected: say it in the log only
                        log.warning("hybrid-kv: bad %s from decode connection %d: %s", head["type"], cid, e)
                        reply = None
                if reply is not None and not self._reply(conn, reply, cid):
                    break
        self._peers.pop(cid, None)
        self._auth.pop(cid, None)
        self._no_push.discard(cid)
        self.grants.forget_peer(cid)
        self.sender.free_where(lambda k: k[0] == cid)  # the decode rank is gone: nothing will read its slots

    def _reply(self, conn: socket.socket, msg: dict, cid: int | None = None) -> bool:
        peer = self._peers.get(cid) if cid is not None else None
        try:
            if peer is None:
                send_msg(conn, msg)
            else:
                with peer[1]:  # the prepacker pushes on the same socket
                    send_msg(conn, msg)
            return True
        except OSError:
            return False

    def _handle(self, head: dict, cid: int, conn: socket.socket) -> dict | None:
        kind = head["type"]
        if kind == M.HELLO:
            if cid in self._peers or cid in self._auth:
                raise ProtocolError("second hello on one connection")
            if self.secret is not None:  # nothing is revealed before the decode rank proves the secret
                auth = ServerAuth(self.secret)
                challenge = auth.challenge(head)
                self._auth[cid] = (auth, head)
                return challenge
            if head.get("auth"):
                raise AuthError(
                    f"this prefill rank has no shared secret ({SECRET_ENV} / hybrid_kv_secret) but the decode "
                    "rank authenticates: set the same secret on both"
                )
            return self._welcome(head, cid, conn)
        if kind == M.AUTH and cid in self._auth:
            auth, hello = self._auth.pop(cid)
            auth.check(head)
            return self._welcome(hello, cid, conn)
        if cid not in self._peers:
            raise ProtocolError(f"{kind!r:.40} before a successful hello")
        if kind == M.PACK:
            self._pack(head, cid)
            return {"type": M.OK}
        if kind == M.MODE:  # auto: this decode rank reads the stock way (part null) or packed again
            part = M.part(head.get("part"))
            if part not in (None, ALL):
                raise ValueError(f"mode part={list(part)!r} (this side channel packs all or nothing)")
            if part is None:
                self._no_push.add(cid)
            else:
                self._no_push.discard(cid)
            self.sender.free_where(lambda k: k[0] == cid)
            return {"type": M.MODE_OK}
        if kind == M.PING:  # the decode rank's view of this rank's clock, for the lease fence
            return {"type": M.PONG, "now": time.monotonic()}
        if kind == M.RELEASE:  # no reply: the READs are done (or abandoned; push: the grant is withdrawn)
            req = M.request_id(head.get("req"))
            self.sender.free_where(lambda k: k[0] == cid and k[1] == req)
            self.grants.withdraw(cid, req)
            return None
        if kind == M.GRANT:  # no reply (a refused grant is answered with push-end)
            self.grants.grant(head, cid)
            return None
        raise ProtocolError(f"unexpected message {kind!r:.40} (expected hello, mode, pack, release or grant)")

    def _welcome(self, hello: dict, cid: int, conn: socket.socket) -> dict:
        reply = self._hello(hello)
        self.grants.hello(hello, cid)
        self._peers[cid] = (conn, threading.Lock(), self._decode_layout(hello))
        return reply

    def _decode_layout(self, head: dict) -> RankLayout:
        key = (head.get("tp_size"), head.get("tp_rank"))
        hit = self._layouts.get(key)  # (a hit only for a pair that was valid before)
        if hit is not None:
            return hit
        lay = self.geom.layout
        try:
            out = RankLayout(lay.spec, int(head["tp_size"]), int(head["tp_rank"]), lay.conv_layout, lay.kv_layout)
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"decode tp_size={head.get('tp_size')!r} / tp_rank={head.get('tp_rank')!r}: {e}") from e
        if len(self._layouts) < 1024 and all(type(k) is int for k in key):
            self._layouts[key] = out
        return out

    def _hello(self, head: dict) -> dict:
        fp = head.get("fingerprint")
        if not isinstance(fp, dict):
            raise ProtocolError("hello lacks a fingerprint object")
        check_fingerprints(self.geom.fingerprint(), fp)
        self._decode_layout(head)
        lay = self.geom.layout
        return {
            "type": M.WELCOME,
            "fingerprint": self.geom.fingerprint(),
            "tp_size": lay.tp_size,
            "tp_rank": lay.tp_rank,
            "staging": list(self.staging_desc),
            "agent": self.agent_name,
            "lease_s": self.sender.lease_s,  # the decode rank's fence (messages.LeaseClock.read_by)
        }

    def send(self, cid: int, msg: dict) -> bool:
        """Send `msg` to the decode rank on connection `cid` (False: it is gone)."""
        peer = self._peers.get(cid)
        if peer is None:
            return False
        conn, lock, _ = peer
        try:
            with lock:
                send_msg(conn, msg)
            return True
        except OSError:
            return False

    def _pack(self, head: dict, cid: int) -> None:
        """Stage the request for this connection's decode rank (unless it is staged already) and push
        its `ready`; the caller's `ok` follows it on the same socket."""
        dec = self._peers[cid][2]
        req = M.request_id(head.get("req"))
        why = self.not_held(req)
        if why is not None:
            raise ValueError(f"request {req} is not held by this prefill rank: {why}")
        blocks = M.blocks_of(head.get("blocks"))
        chunk = self.sender.chunk(dec.tp_size, dec.tp_rank, blocks)
        prefix, sizes = (cid, req, dec.tp_rank), chunk.unit_bytes
        offsets = self.sender.staged(prefix, blocks, sizes)  # packed when the prefill finished
        if offsets is None:
            self.sender.free_where(lambda k: k[:3] == prefix)  # staged for other block ids
            # on this connection's thread, behind the step that wrote the state
            offsets = self.sender.stage([(prefix, chunk)], [req])[0]
        ready = self.sender.announce(prefix, blocks, offsets, sizes)  # a fresh lease from now
        if ready is None:
            raise RuntimeError(f"staging of request {req} was freed while it was packed")
        if not self.send(cid, ready):
            raise ConnectionError(f"decode connection {cid} lost before the ready of {req}")

    # ---- packing when a prefill finishes, before any decode rank asks ---------------------------------

    def prepack(self, requests: dict[str, Blocks]) -> None:
        """Queue packing `requests` (id -> block ids per group; their prefills finished in one step) for
        every decode rank connected now: one launch for all, then a `ready` per (request, decode rank), so
        their READs wait on no reply. Best effort: what finds no slot, or fails, is packed when asked."""
        self._prepacker.submit(self._prepack, dict(requests))

    def _prepack(self, requests: dict[str, Blocks]) -> None:
        items, blocks_of = [], []
        for cid, (_, _, dec) in list(self._peers.items()):
            if cid in self._no_push:
                continue
            lay = self.geom.layout
            try:
                pair = self.sender.plans.pair(lay.tp_size, dec.tp_size, lay.tp_rank, dec.tp_rank)
            except ValueError:  # (a pair this rank refuses: refused again, with the reason, when asked)
                continue
            if not pair_groups(pair, self.geom):
                continue
            for req, every in requests.items():
                blocks = only_moved(pair, self.geom, every)  # (attention groups only where the pair moves KV)
                try:
                    chunk = self.sender.chunk(dec.tp_size, dec.tp_rank, blocks, pair)
                except ValueError as e:
                    log.warning("hybrid-kv: request %s not packed at finish: %s", req, e)
                    continue
                items.append(((cid, req, dec.tp_rank), chunk))  # (skipped if staged meanwhile: `fit="each"`)
                blocks_of.append(blocks)
        if not items:
            return
        try:  # one launch for every request and decode rank of this step; no room: asked for later
            offsets = self.sender.stage(items, list(requests), fit="each")
        except Exception as e:  # never fatal: the decode ranks fall back to asking
            log.warning("hybrid-kv: packing %d request(s) at finish failed: %s", len(requests), e)
            return
        for ((cid, req, rank), chunk), blocks, offs in zip(items, blocks_of, offsets):
            ready = None if offs is None else self.sender.announce((cid, req, rank), blocks, offs, chunk.unit_bytes)
            if ready is not None and not self.send(cid, ready):
                log.warning("hybrid-kv: push of %s to decode connection %d failed", req, cid)
