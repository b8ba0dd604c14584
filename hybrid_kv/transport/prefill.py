"""Prefill rank endpoint: owns its cache and staging pool, serves decode ranks over the side channel.

Protocol (decode -> prefill, side channel; data moves by NIXL READs the decode rank posts):

* ``hello`` {rank fields, agent} + NIXL metadata -> ``welcome`` {rank fields, cache/staging addresses,
  unit budget} + NIXL metadata, or ``error`` naming the mismatching field (nothing is registered for a
  refused peer).
* ``pack`` {req, unit, tokens, blocks} -> the unit is packed into a staging slot -> ``ready`` {req,
  unit, addr, nbytes}. When no slot is free the unit waits (bounded by ``pool_wait_s``), then ``error``.
* The decode rank's READ carries the notification ``done:<req>:<unit>``; on it the slot is freed. A
  slot is also freed when its reader disconnects or its lease expires (reader died mid-read).
"""

from __future__ import annotations

import selectors
import socket
import time
from collections import deque
from dataclasses import dataclass, field

import torch

from hybrid_kv import ops
from hybrid_kv.batch import request_tables, validate_blocks
from hybrid_kv.layout import RankLayout
from hybrid_kv.plan import DEFAULT_MAX_UNIT_BYTES, TransferPlan
from hybrid_kv.transport.common import (
    RankMemory,
    SideConfig,
    background,
    blocks_from,
    check_peer,
    hello_fields,
    init_rank_process,
    write_request,
)
from hybrid_kv.transport.wire import PeerClosed, ProtocolError, recv_msg, send_msg

MSG_TIMEOUT_S = 10.0  # a message whose first byte arrived must be complete within this
IDLE_WAIT_S = 0.01  # longest sleep in select when no unit waits for a slot


@dataclass
class PrefillOptions:
    host: str = "127.0.0.1"
    port: int = 0
    pool_bytes: int = 256 << 20
    max_unit_bytes: int = DEFAULT_MAX_UNIT_BYTES
    pool_wait_s: float = 20.0
    lease_s: float = 30.0
    backend: str | None = None  # ops backend for packing
    poll_s: float = 0.0005


@dataclass
class Peer:
    sock: socket.socket
    agent: str | None = None
    tp_size: int = 0
    tp_rank: int = 0
    layouts: list | None = None  # the decode side's layouts, as this rank computes them
    plans: dict = field(default_factory=dict)


@dataclass
class Waiting:
    peer: Peer
    msg: dict
    since: float


class PrefillEndpoint:
    def __init__(self, cfg: SideConfig, rank: int, opts: PrefillOptions) -> None:
        self.cfg, self.rank, self.opts = cfg, rank, opts
        mem = RankMemory(cfg, rank, opts.pool_bytes, "prefill")
        self.spec, self.layouts, self.layout, self.geom = mem.spec, mem.layouts, mem.layout, mem.geom
        self.cache, self.staging, self.pool, self.agent = mem.cache, mem.staging, mem.pool, mem.agent
        self.cache_reg, self.staging_reg = mem.cache_reg, mem.staging_reg
        self.unit_bytes = min(opts.max_unit_bytes, opts.pool_bytes)
        self.sel = selectors.DefaultSelector()
        self.server = socket.create_server((opts.host, opts.port))
        self.server.setblocking(False)
        self.sel.register(self.server, selectors.EVENT_READ, None)
        self.port = self.server.getsockname()[1]
        self.peers: dict[int, Peer] = {}
        self.waiting: deque[Waiting] = deque()
        self.leases: dict[tuple, float] = {}
        self.last_disconnect = ""  # why the last decode peer went away (in counts(), for operators)
        self.stats = {
            "packed_units": 0,
            "refused_handshakes": 0,
            "pool_timeouts": 0,
            "lease_expired": 0,
            "disconnects": 0,
        }

    # ---- oracle fill (driver's request) ---------------------------------------------------------------

    def fill(self, seed: int, requests: list[dict], decode_block: int) -> None:
        host = background(self.geom, seed, 0, self.rank)
        for r in requests:
            write_request(
                host,
                self.layout,
                self.cfg.num_blocks,
                seed,
                r["id"],
                blocks_from(r["prefill_blocks"]),
                r["tokens"],
                self.layout.block_size,
                decode_block,
                "prefill",
            )
        self.cache.copy_(host)

    # ---- event loop -----------------------------------------------------------------------------------

    def step(self, timeout: float | None = None) -> None:
        # Slots only need freeing promptly when units wait for one; otherwise sleep in select (a new
        # message wakes it) instead of burning a core polling notifications.
        if timeout is None:
            timeout = self.opts.poll_s if self.waiting else IDLE_WAIT_S
        for key, _ in self.sel.select(timeout):
            if key.data is None:
                self._accept()
            else:
                self._on_readable(key.data)
        self._on_notifs()
        self._retry_waiting()
        self._expire_leases()

    def _accept(self) -> None:
        try:
            sock, _ = self.server.accept()
        except BlockingIOError:
            return
        sock.setblocking(True)
        peer = Peer(sock)
        self.peers[sock.fileno()] = peer
        self.sel.register(sock, selectors.EVENT_READ, peer)

    def _drop(self, peer: Peer, why: str) -> None:
        """A decode rank went away: free everything it held, forget its agent."""
        self.stats["disconnects"] += 1
        self.last_disconnect = f"decode rank {peer.tp_rank} ({peer.agent or 'no handshake'}): {why}"
        self.pool.free_where(lambda k, p=peer: k[0] == id(p))
        for k in [k for k in self.leases if k[0] == id(peer)]:
            del self.leases[k]
        self.waiting = deque(w for w in self.waiting if w.peer is not peer)
        if peer.agent:
            self.agent.remove_remote(peer.agent)
        self.sel.unregister(peer.sock)
        self.peers.pop(peer.sock.fileno(), None)
        peer.sock.close()

    def _on_readable(self, peer: Peer) -> None:
        try:
            msg, payload = recv_msg(peer.sock, MSG_TIMEOUT_S)
        except PeerClosed as e:
            self._drop(peer, str(e))
            return
        except (ProtocolError, TimeoutError) as e:
            self._error(peer, f"malformed message: {e}")
            self._drop(peer, str(e))
            return
        try:
            if msg["type"] == "hello":
                self._hello(peer, msg, payload)
            elif peer.agent is None:
                raise ProtocolError(f"{msg['type']!r} before a successful hello")
            elif msg["type"] == "pack":
                self.waiting.append(Waiting(peer, msg, time.monotonic()))
                self._retry_waiting()
            elif msg["type"] == "ping":  # the decode rank's cost model measures the round trip
                send_msg(peer.sock, {"type": "pong"})
            elif msg["type"] == "release":
                key = (id(peer), msg["req"], int(msg["unit"]))
                if self.pool.held(key):
                    self.pool.free(key)
                    self.leases.pop(key, None)
            elif msg["type"] == "bye":
                self._drop(peer, "bye")
            else:
                raise ProtocolError(f"unknown message type {msg['type']!r}")
        except (ValueError, KeyError, TypeError, ProtocolError) as e:
            self._error(peer, str(e), req=msg.get("req"), unit=msg.get("unit"))
            if msg.get("type") == "hello" or isinstance(e, ProtocolError):
                self.stats["refused_handshakes"] += msg.get("type") == "hello"
                self._drop(peer, str(e))

    def _error(self, peer: Peer, message: str, **extra) -> None:
        try:
            send_msg(peer.sock, {"type": "error", "message": message, **extra})
        except OSError:
            pass

    def _hello(self, peer: Peer, msg: dict, payload: bytes) -> None:
        if peer.agent is not None:
            raise ProtocolError("second hello on one connection")
        dec = check_peer(self.layout, msg, "prefill", "decode")
        if not payload or not isinstance(msg.get("agent"), str):
            raise ValueError("decode hello lacks its NIXL agent name or metadata")
        peer.tp_size, peer.tp_rank = dec.tp_size, dec.tp_rank
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
        peer.agent = self.agent.add_remote(payload)
        send_msg(
            peer.sock,
            {
                "type": "welcome",
                **hello_fields(self.layout, self.cfg),
                "agent": self.agent.name,
                "cache": self.cache_reg,
                "staging": self.staging_reg,
                "max_unit_bytes": self.unit_bytes,
            },
            self.agent.metadata(),
        )

    def _plan(self, peer: Peer, tokens: int) -> TransferPlan:
        if tokens not in peer.plans:
            peer.plans[tokens] = TransferPlan(self.layouts, peer.layouts, tokens, self.unit_bytes)
        return peer.plans[tokens]

    def _retry_waiting(self) -> None:
        now, still = time.monotonic(), deque()
        while self.waiting:
            w = self.waiting.popleft()
            try:
                done = self._pack(w.peer, w.msg)
            except (ValueError, KeyError, TypeError) as e:
                self._error(w.peer, str(e), req=w.msg.get("req"), unit=w.msg.get("unit"))
                continue
            if done:
                continue
            if now - w.since > self.opts.pool_wait_s:
                self.stats["pool_timeouts"] += 1
                self._error(
                    w.peer,
                    f"staging pool full for {self.opts.pool_wait_s:g} s: request "
                    f"{w.msg['req']} unit {w.msg['unit']} waited (pool {self.pool.capacity} B, "
                    f"{self.pool.in_use} B in use)",
                    req=w.msg["req"],
                    unit=w.msg["unit"],
                )
                continue
            still.append(w)
        self.waiting = still

    def _pack(self, peer: Peer, msg: dict) -> bool:
        """Pack one unit if a slot is free; False if it must wait."""
        req, unit, tokens = msg["req"], int(msg["unit"]), int(msg["tokens"])
        plan = self._plan(peer, tokens)
        pair = (self.rank, peer.tp_rank)
        if pair not in plan.staging:
            raise ValueError(f"request {req}: decode rank {peer.tp_rank} reads nothing from prefill rank {self.rank}")
        blocks = blocks_from(msg["blocks"])
        validate_blocks([plan], "prefill", [blocks], self.cfg.num_blocks)
        th = msg.get("threshold")
        if th is not None and (not isinstance(th, int) or th < 0):
            raise ValueError(f"request {req}: threshold={th!r} must be a non-negative integer or null")
        layouts = plan.staging if th is None else plan.split(th)[0]
        tables = request_tables(
            plan, blocks, None, self.geom, self.geom, src_rank=self.rank, dst_rank=peer.tp_rank, layouts=layouts
        )[pair]
        if not 0 <= unit < len(tables.units):
            raise ValueError(f"request {req}: unit {unit} out of range [0, {len(tables.units)})")
        a, b = tables.units[unit]
        key = (id(peer), req, unit)
        slot = self.pool.alloc(key, b - a)
        if slot is None:
            return False
        ops.copy_segments(self.cache, self.staging, tables.unit_pack(unit, slot.offset), backend=self.opts.backend)
        if self.cfg.device.startswith("cuda"):
            torch.cuda.synchronize()  # the READ must see the packed bytes
        self.leases[key] = time.monotonic()
        self.stats["packed_units"] += 1
        send_msg(
            peer.sock,
            {
                "type": "ready",
                "req": req,
                "unit": unit,
                "addr": self.staging_reg["addr"] + slot.offset,
                "nbytes": b - a,
            },
        )
        return True

    def _on_notifs(self) -> None:
        for agent, msgs in self.agent.notifs().items():
            peer = next((p for p in self.peers.values() if p.agent == agent), None)
            for m in msgs:
                parts = m.decode(errors="replace").split(":")
                if peer is None or len(parts) != 3 or parts[0] != "done":
                    continue  # strided-mode completions carry nothing to free
                key = (id(peer), parts[1], int(parts[2]))
                if self.pool.held(key):
                    self.pool.free(key)
                    self.leases.pop(key, None)

    def _expire_leases(self) -> None:
        now = time.monotonic()
        for key, t in list(self.leases.items()):
            if now - t > self.opts.lease_s:
                self.stats["lease_expired"] += 1
                self.pool.free(key)
                del self.leases[key]

    def counts(self) -> dict:
        return {
            **self.agent.counts(),
            "staging_slots": self.pool.live,
            "staging_in_use": self.pool.in_use,
            "peers": len(self.peers),
            "waiting": len(self.waiting),
            "last_disconnect": self.last_disconnect,
            **self.stats,
        }

    def close(self) -> None:
        for peer in list(self.peers.values()):
            self._drop(peer, "shutdown")
        self.sel.close()
        self.server.close()
        self.agent.close()


def prefill_main(cfg: SideConfig, rank: int, opts: PrefillOptions, ctl) -> None:
    """Process entry: serve until the driver says stop (or the driver's pipe closes)."""
    init_rank_process()
    try:
        ep = PrefillEndpoint(cfg, rank, opts)
    except Exception as e:  # reported to the driver, which raises it
        ctl.send(("failed", f"{type(e).__name__}: {e}"))
        return
    ctl.send(("port", ep.port))
    try:
        while True:
            if ctl.poll():
                try:
                    cmd, *args = ctl.recv()
                except EOFError:
                    break
                if cmd == "fill":
                    try:
                        ep.fill(*args)
                    except Exception as e:
                        ctl.send(("failed", f"fill: {type(e).__name__}: {e}"))
                        continue
                    ctl.send(("filled",))
                elif cmd == "counts":
                    ctl.send(("counts", ep.counts()))
                elif cmd == "stop":
                    break
            ep.step()
    finally:
        ep.close()
        try:
            ctl.send(("closed", ep.counts()))
        except (BrokenPipeError, OSError):
            pass
