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

Packing runs on the connection's thread, not the engine loop, so an idle prefill engine still answers.
"""

from __future__ import annotations

import itertools
import queue
import select
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import torch
from vllm.logger import init_logger

from hybrid_kv.layout import RankLayout
from hybrid_kv.staging.copier import Copier
from hybrid_kv.staging.handshake import check_fingerprints as check
from hybrid_kv.staging.pool import LeasedPool
from hybrid_kv.staging.template import PlanCache
from hybrid_kv.transport.wire import PeerClosed, ProtocolError, expect, recv_msg, send_msg
from hybrid_kv.vllm.state import StateGeometry, state_chunk

# under vLLM's "vllm" logger, so that its handler prints these lines with the engine's own
log = init_logger("vllm.hybrid_kv")

IDLE_TIMEOUT_S = 3600.0  # a decode rank's connection may stay quiet between requests


def check_fingerprints(prefill: dict, decode: dict) -> None:
    """Refuse a pair whose state pages cannot correspond; the message names the differing field."""
    check(prefill, decode, extra=("state_layers",))


class PrefillServer:
    """Serves hello/pack/done for one prefill rank; owns its staging pool's slots."""

    def __init__(
        self,
        *,
        host: str,
        port: int,
        geometry: StateGeometry,
        plans: PlanCache,
        staging: torch.Tensor,
        staging_desc: tuple[int, int, int],
        agent_name: str,
        not_held: Callable[[str], str | None],
        lease_s: float,
        timeout_s: float,
        backend: str | None,
    ) -> None:
        self.geom, self.plans, self.staging = geometry, plans, staging
        self.staging_desc, self.agent_name = staging_desc, agent_name
        self.not_held, self.lease_s, self.timeout_s, self.backend = not_held, lease_s, timeout_s, backend
        self.pool = LeasedPool(staging.numel())
        self._cv = threading.Condition()
        self._ids = itertools.count()
        self._stop = threading.Event()
        self.copier = Copier(geometry.storage, geometry.pages, staging, "prefill", backend)
        self._layouts: dict[tuple, RankLayout] = {}  # decode (tp_size, tp_rank) -> its layout
        # connections that said hello: cid -> (socket, send lock, decode layout); pushes go to them
        self._peers: dict[int, tuple[socket.socket, threading.Lock, RankLayout]] = {}
        self._staged: dict[tuple, tuple] = {}  # (cid, request, decode rank) -> (blocks, offsets, sizes)
        self._prepacker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hybrid-kv-prepack")
        self.received: dict[str, int] = {}  # messages received, by type (tests count round trips)
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

    @property
    def live_slots(self) -> int:
        with self._cv:
            return self.pool.live

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            self._reap()
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            t = threading.Thread(target=self._serve, args=(conn, next(self._ids)), daemon=True)
            self._threads = [x for x in self._threads if x.is_alive()] + [t]
            t.start()

    def _reap(self) -> None:
        with self._cv:
            expired = self.pool.expire(time.monotonic())
            if expired:
                self._staged = {k: v for k, v in self._staged.items() if self.pool.held((*k, 0))}
                self._cv.notify_all()
        if expired:
            log.warning("hybrid-kv: %d staging slot(s) freed on lease expiry", expired)

    def _free_where(self, pred) -> int:
        """Free every leased slot whose key satisfies `pred` (and wake waiters); returns how many."""
        with self._cv:
            n = self.pool.free_where(pred)
            if n:
                self._staged = {k: v for k, v in self._staged.items() if self.pool.held((*k, 0))}
                self._cv.notify_all()
            return n

    # ---- one decode rank's connection -----------------------------------------------------------------

    def _serve(self, conn: socket.socket, cid: int) -> None:
        with conn:
            while not self._stop.is_set():
                try:
                    head, _ = recv_msg(conn, IDLE_TIMEOUT_S)
                except (PeerClosed, TimeoutError, OSError):
                    break
                except ProtocolError as e:
                    log.warning("hybrid-kv: malformed message from a decode rank: %s", e)
                    self._reply(conn, {"type": "error", "message": str(e)})
                    break
                kind = str(head["type"])[:32]
                self.received[kind] = self.received.get(kind, 0) + 1
                try:
                    reply = self._handle(head, cid, conn)
                except Exception as e:  # refused: tell the decode rank why, keep serving
                    reply = {"type": "error", "message": f"{type(e).__name__}: {e}"}
                if not self._reply(conn, reply, cid):
                    break
        self._peers.pop(cid, None)
        self._free_where(lambda k: k[0] == cid)  # the decode rank is gone: nothing will read its slots

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

    def _handle(self, head: dict, cid: int, conn: socket.socket) -> dict:
        kind = head["type"]
        if kind == "hello":
            reply = self._hello(head)
            self._peers[cid] = (conn, threading.Lock(), self._decode_layout(head))
            return reply
        if kind == "pack":
            return self._pack(head, cid)
        if kind == "done":
            req, d = str(head["request_id"]), int(head["dst_rank"])
            self._free_where(lambda k: k[0] == cid and k[1] == req and k[2] == d)
            return {"type": "ok"}
        raise ProtocolError(f"unexpected message {kind!r} (expected hello, pack or done)")

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
            "type": "hello",
            "fingerprint": self.geom.fingerprint(),
            "tp_size": lay.tp_size,
            "tp_rank": lay.tp_rank,
            "staging": list(self.staging_desc),
            "agent": self.agent_name,
        }

    def _pack(self, head: dict, cid: int) -> dict:
        dec = self._decode_layout(head)
        req = str(head["request_id"])
        why = self.not_held(req)
        if why is not None:
            raise ValueError(f"request {req} is not held by this prefill rank: {why}")
        blocks = {int(g): [int(b) for b in ids] for g, ids in head["blocks"]}
        self.geom.check_blocks(blocks, "prefill")
        lay = self.geom.layout
        pair = self.plans.pair(lay.tp_size, dec.tp_size, lay.tp_rank, dec.tp_rank)
        chunk = state_chunk(pair, self.geom, blocks, "prefill", self.plans.shapes)
        sizes = chunk.unit_bytes
        keys = [(cid, req, dec.tp_rank, u) for u in range(len(sizes))]
        with self._cv:
            hit = self._staged.get((cid, req, dec.tp_rank))
        if hit is not None and hit[0] == blocks and hit[2] == sizes:  # packed when the prefill finished
            return {"type": "ready", "units": [[off, n] for off, n in zip(hit[1], sizes)]}
        self._free_where(lambda k: k[:3] == (cid, req, dec.tp_rank))  # staged for other block ids
        offsets = self._alloc(keys, sizes, req)
        try:
            self.copier.run([(chunk, offsets)]).wait()  # on this connection's thread: the READ must see it
        except BaseException:
            self._free_where(lambda k: k in keys)
            raise
        return {"type": "ready", "units": [[off, n] for off, n in zip(offsets, sizes)]}

    # ---- packing when the prefill finishes (before any decode rank asks) --------------------------------

    def prepack(self, requests: dict[str, dict[int, list[int]]]) -> None:
        """Queue packing `requests` (id -> block ids per Mamba group; their prefills finished in one step)
        for every decode rank connected now: one launch for all, then a `staged` push per (request, decode
        rank), so their READs wait on no reply. Best effort: a decode rank that finds nothing staged asks."""
        self._prepacker.submit(self._prepack, dict(requests))

    def _prepack(self, requests: dict[str, dict[int, list[int]]]) -> None:
        lay = self.geom.layout
        jobs, pushes = [], []
        for cid, (conn, lock, dec) in list(self._peers.items()):
            pair = self.plans.pair(lay.tp_size, dec.tp_size, lay.tp_rank, dec.tp_rank)
            if pair.state is None:
                continue
            for req, blocks in requests.items():
                try:
                    self.geom.check_blocks(blocks, "prefill")
                    chunk = state_chunk(pair, self.geom, blocks, "prefill", self.plans.shapes)
                except ValueError as e:
                    log.warning("hybrid-kv: request %s not packed at finish: %s", req, e)
                    continue
                sizes = chunk.unit_bytes
                keys = [(cid, req, dec.tp_rank, u) for u in range(len(sizes))]
                with self._cv:
                    if (cid, req, dec.tp_rank) in self._staged or any(self.pool.held(k) for k in keys):
                        continue
                    got = self.pool.alloc_all(keys, sizes, time.monotonic() + self.lease_s)
                if got is None:
                    continue  # pool full now: the decode rank will ask, and wait for a slot then
                offsets = [s.offset for s in got]
                jobs.append((chunk, offsets))
                pushes.append((cid, conn, lock, dec.tp_rank, req, blocks, keys, offsets, sizes))
        if not jobs:
            return
        try:
            self.copier.run(jobs).wait()  # one launch for every request and decode rank of this step
        except Exception as e:  # never fatal: the decode ranks fall back to asking
            log.warning("hybrid-kv: packing %d request(s) at finish failed: %s", len(requests), e)
            for *_, keys, _, _ in pushes:
                self._free_where(lambda k, ks=set(keys): k in ks)
            return
        for cid, conn, lock, rank, req, blocks, keys, offsets, sizes in pushes:
            with self._cv:
                if not all(self.pool.held(k) for k in keys):
                    continue  # freed meanwhile (disconnect, forget)
                self._staged[(cid, req, rank)] = (blocks, offsets, sizes)
            msg = {
                "type": "staged",
                "request_id": req,
                "blocks": [[g, ids] for g, ids in blocks.items()],
                "units": [[off, n] for off, n in zip(offsets, sizes)],
            }
            try:
                with lock:
                    send_msg(conn, msg)
            except OSError as e:
                log.warning("hybrid-kv: push of %s to decode connection %d failed: %s", req, cid, e)

    def forget(self, req: str) -> None:
        """The request is done on this prefill rank (read, aborted or its lease expired): free its slots."""
        self._free_where(lambda k: k[1] == req)

    def _alloc(self, keys: list[tuple], sizes: list[int], req: str) -> list[int]:
        """All of a request's slots or none: wait (bounded) while the pool is full."""
        wait_s = self.timeout_s / 2  # answer before the decode rank's reply deadline
        deadline = time.monotonic() + wait_s
        with self._cv:
            while True:
                got = self.pool.alloc_all(keys, sizes, time.monotonic() + self.lease_s)
                if got is not None:
                    return [s.offset for s in got]
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(
                        f"staging pool full: request {req} needs {sum(sizes)} B in {len(sizes)} slot(s), "
                        f"{self.pool.in_use} of {self.pool.capacity} B held for {wait_s:.0f} s "
                        "(raise hybrid_kv_staging_bytes, or hybrid_kv_timeout_s to wait longer)"
                    )
                self._cv.wait(min(left, 0.5))


class PrefillLink:
    """A decode rank's connection to one prefill rank's server: one call at a time; a reader thread takes
    every message, hands replies to the waiting call and keeps `staged` pushes (bounded) for
    `take_staged`."""

    MAX_STAGED = 4096  # pushes kept for requests this rank has not reached yet

    def __init__(self, host: str, port: int, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self._lock = threading.Lock()
        try:
            self._sock = socket.create_connection((host, port), timeout=timeout_s)
        except OSError as e:
            raise ConnectionError(f"hybrid-kv side channel {host}:{port} unreachable: {e}") from e
        self._sock.settimeout(None)  # the reader blocks; calls wait on their own deadline
        self.peer: dict = {}
        self._replies: queue.Queue = queue.Queue()
        self._staged: dict[str, dict] = {}
        self._staged_lock = threading.Lock()
        self._reader = threading.Thread(target=self._read, name="hybrid-kv-link-reader", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while True:
            try:
                select.select([self._sock], [], [])  # idle for as long as it likes; woken by close
                head, _ = recv_msg(self._sock, self.timeout_s)  # a message that started must complete
            except (ProtocolError, TimeoutError, OSError, ValueError) as e:
                self._replies.put(e)  # wakes a waiting call; later calls fail at once
                return
            if head.get("type") == "staged":
                with self._staged_lock:
                    self._staged[str(head.get("request_id"))] = head
                    while len(self._staged) > self.MAX_STAGED:
                        self._staged.pop(next(iter(self._staged)))
            else:
                self._replies.put(head)

    def take_staged(self, request_id: str) -> dict | None:
        """The prefill rank's push for `request_id`, if it came (removed: used once)."""
        with self._staged_lock:
            return self._staged.pop(request_id, None)

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

    def hello(self, fingerprint: dict, tp_size: int, tp_rank: int) -> dict:
        self.peer = self.call(
            {"type": "hello", "fingerprint": fingerprint, "tp_size": tp_size, "tp_rank": tp_rank}, "hello"
        )
        check_fingerprints(self.peer["fingerprint"], fingerprint)
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
