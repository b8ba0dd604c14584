"""Decode rank endpoint: connects to the prefill ranks it reads from, then moves requests.

* packed: ask each source for each transfer unit (``pack``); on ``ready`` READ it with **one
  descriptor** into a receive-staging slot; when the READ completes, scatter the unit into the pages
  (one launch) and free the slot. The READ's notification tells the source to free its slot.
* strided: one READ per source with one descriptor per contiguous run, page to page (vLLM-style).

A request completes when every unit from every source has landed; it fails (with its id in the error)
when a source disconnects, refuses, a READ errs, or the request's deadline passes. Pages of a failed
request may hold some of its units, but the request is never reported as received.
"""

from __future__ import annotations

import selectors
import socket
import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np
import torch

from hybrid_kv import ops
from hybrid_kv.batch import request_tables, validate_blocks
from hybrid_kv.plan import TransferPlan
from hybrid_kv.transport.common import (
    RankMemory,
    SideConfig,
    background,
    blocks_from,
    check_peer,
    hello_fields,
    init_rank_process,
    verify_cache,
)
from hybrid_kv.transport.cost import calibrate, pack_pays
from hybrid_kv.transport.wire import PeerClosed, ProtocolError, expect, recv_msg, send_msg

IDLE_WAIT_S = 0.01  # longest sleep in select when only side-channel messages can make progress


@dataclass
class DecodeOptions:
    pool_bytes: int = 256 << 20
    request_timeout_s: float = 60.0
    handshake_timeout_s: float = 20.0
    backend: str | None = None
    poll_s: float = 0.0002
    # Cost model of the auto mode; None = measured at start-up.
    desc_cost_us: float | None = None  # NIXL cost of one more descriptor in a READ
    copy_gbps: float | None = None  # local copy bandwidth (pack and scatter each copy once)


@dataclass
class Source:
    rank: int
    sock: socket.socket
    agent: str
    info: dict
    alive: bool = True


@dataclass
class Request:
    id: str
    tokens: int
    pblocks: object
    dblocks: object
    tables: dict  # prefill rank -> PairTables
    start: float = 0.0
    end: float = 0.0
    pending: set = field(default_factory=set)  # (prefill rank, unit) not yet landed
    error: str | None = None
    descriptors: int = 0
    nbytes: int = 0
    post_us: float = 0.0
    xfer_us: float = 0.0
    nixl_descs: int = 0
    ready_s: float = 0.0  # first 'ready' from a source, after the request started
    read_s: float = 0.0  # READ post -> completion seen, summed over READs
    scatter_s: float = 0.0  # unpack launches, summed

    @property
    def done(self) -> bool:
        return self.error is not None or not self.pending


class DecodeEndpoint:
    def __init__(
        self, cfg: SideConfig, rank: int, prefill: SideConfig, addrs: list[tuple[str, int]], opts: DecodeOptions
    ) -> None:
        self.cfg, self.rank, self.pcfg, self.opts = cfg, rank, prefill, opts
        mem = RankMemory(cfg, rank, opts.pool_bytes, "decode")
        self.spec, self.layouts, self.layout, self.geom = mem.spec, mem.layouts, mem.layout, mem.geom
        self.cache, self.recv, self.pool, self.agent = mem.cache, mem.staging, mem.pool, mem.agent
        self.cache_reg, self.recv_reg = mem.cache_reg, mem.staging_reg
        self.pgeom = None
        self.sel = selectors.DefaultSelector()
        self.sources: dict[int, Source] = {}
        self.player = None  # prefill layouts, as this rank computes them
        try:
            self._connect(addrs)
        except BaseException:
            self.close()  # a refused handshake must not leave sockets, peers or registrations behind
            raise

    # ---- handshake ------------------------------------------------------------------------------------

    def _connect(self, addrs: list[tuple[str, int]]) -> None:
        from hybrid_kv.layout import RankLayout

        self.player = [
            RankLayout(
                self.spec, self.pcfg.tp_size, r, self.pcfg.conv_layout, self.pcfg.kv_layout, self.pcfg.block_size
            )
            for r in range(self.pcfg.tp_size)
        ]
        probe = TransferPlan(self.player, self.layouts, 1)
        unit = None
        for p in probe.sources_of(self.rank):
            host, port = addrs[p]
            sock = socket.create_connection((host, port), timeout=self.opts.handshake_timeout_s)
            send_msg(
                sock,
                {"type": "hello", **hello_fields(self.layout, self.cfg), "agent": self.agent.name},
                self.agent.metadata(),
            )
            msg, meta = recv_msg(sock, self.opts.handshake_timeout_s)
            expect(msg, "welcome")
            theirs = check_peer(self.layout, msg, "decode", "prefill")
            if theirs.tp_rank != p:
                raise ValueError(f"prefill at {host}:{port} is rank {theirs.tp_rank}, expected {p}")
            if unit is not None and msg["max_unit_bytes"] != unit:
                raise ValueError(f"prefill ranks disagree on max_unit_bytes ({unit} vs {msg['max_unit_bytes']})")
            unit = int(msg["max_unit_bytes"])
            if unit > self.pool.capacity:
                raise ValueError(
                    f"decode staging pool ({self.pool.capacity} B) is smaller than the prefill "
                    f"transfer unit budget ({unit} B): raise the decode pool or lower max_unit_bytes"
                )
            name = self.agent.add_remote(meta)
            sock.setblocking(True)
            src = Source(p, sock, name, msg)
            self.sources[p] = src
            self.sel.register(sock, selectors.EVENT_READ, src)
        self.unit_bytes = unit or probe.max_unit_bytes
        self.pgeom = self.pcfg.geometry(self.player[0])
        self._plans: dict[int, TransferPlan] = {}
        self.cost = self._calibrate()

    def _calibrate(self) -> dict:
        src = self.sources[min(self.sources)] if self.sources else None
        return calibrate(self, src)

    def _pack_pays(self, plan: TransferPlan, p: int, packed: dict) -> bool:
        return pack_pays(plan, p, self.rank, packed, self.cost, self._concurrency)

    def timed_read(self, src: Source, local: np.ndarray, remote: np.ndarray) -> float:
        t = time.monotonic()
        h = self.agent.read(
            local,
            remote,
            src.agent,
            b"calibrate",
            self.cache_reg["mem"],
            self.cache_reg["dev"],
            src.info["cache"]["dev"],
        )
        try:
            while (state := self.agent.poll(h)) == "PROC":
                if time.monotonic() - t > self.opts.handshake_timeout_s:
                    raise TimeoutError("calibration READ did not complete")
            if state != "DONE":
                raise RuntimeError(f"calibration READ ended {state}")
        finally:
            self.agent.release(h)
        return time.monotonic() - t

    def plan(self, tokens: int) -> TransferPlan:
        if tokens not in self._plans:
            self._plans[tokens] = TransferPlan(self.player, self.layouts, tokens, self.unit_bytes)
        return self._plans[tokens]

    # ---- oracle -----------------------------------------------------------------------------------------

    def reset(self, seed: int) -> None:
        self.cache.copy_(background(self.geom, seed, 1, self.rank))

    def mismatches(self, seed: int, requests: list[dict], ok_ids: set[str]) -> list[str]:
        """The cache against the oracle (pages of failed requests are not compared)."""
        return verify_cache(
            self.cache, self.layout, self.cfg.num_blocks, self.player[0].block_size, seed, requests, ok_ids
        )

    # ---- running requests -------------------------------------------------------------------------------

    def run(self, mode: str, requests: list[dict], concurrency: int) -> list[Request]:
        if concurrency < 1:
            raise ValueError(f"concurrency={concurrency} must be >= 1")
        self._concurrency = concurrency
        todo = deque(requests)
        active: dict[str, Request] = {}
        finished: list[Request] = []
        self._reads: dict = {}  # xfer handle -> (request, source rank, unit, slot key)
        self._wait_slot: deque = deque()  # (request, source rank, ready message) waiting for a recv slot
        while todo or active:
            while todo and len(active) < concurrency:
                r = self._start(todo.popleft(), mode)
                active[r.id] = r  # even a request that failed to start may have READs to retire
            self._step(active, mode)
            now = time.monotonic()
            for rid, r in list(active.items()):
                if not r.done and now - r.start > self.opts.request_timeout_s:
                    r.error = (
                        f"request {rid}: timed out after {self.opts.request_timeout_s:.1f} s waiting for "
                        f"{sorted(r.pending)} (prefill rank, unit)"
                    )
                if r.done and not self._reads_of(r):
                    r.end = time.monotonic()
                    finished.append(active.pop(rid))
        # READs of requests that failed while they were in flight: retire them (bounded by the deadline
        # the poll loop applies) so no handle outlives the run.
        while self._reads:
            self._step({}, mode)
        return finished

    def _reads_of(self, r: Request) -> bool:
        return any(v[0] is r for v in self._reads.values())

    def _start(self, spec: dict, mode: str) -> Request:
        plan = self.plan(int(spec["tokens"]))
        pb, db = blocks_from(spec["prefill_blocks"]), blocks_from(spec["decode_blocks"])
        r = Request(str(spec["id"]), int(spec["tokens"]), pb, db, {}, start=time.monotonic())
        try:
            validate_blocks([plan], "prefill", [pb], self.pcfg.num_blocks)
            validate_blocks([plan], "decode", [db], self.cfg.num_blocks)
        except ValueError as e:
            r.error = f"request {r.id}: {e}"
            return r
        threshold = self.cost["threshold_bytes"] if mode == "auto" else None
        packed_l = direct_l = None
        if mode == "auto":
            packed_t, direct_t = plan.split(threshold)
            direct_all = plan.split(0)[1]
            pays = {p: self._pack_pays(plan, p, packed_t) for p, _ in plan.pairs}
            packed_l = {k: v for k, v in packed_t.items() if pays[k[0]]}
            direct_l = {k: (direct_t[k] if pays[k[0]] else direct_all[k]) for k in plan.pairs}
        tables = request_tables(plan, pb, db, self.pgeom, self.geom, dst_rank=self.rank, layouts=packed_l)
        r.tables = {p: t for (p, _), t in tables.items()}
        if mode == "auto":
            direct = request_tables(plan, pb, db, self.pgeom, self.geom, dst_rank=self.rank, layouts=direct_l)
            for (p, _), t in direct.items():
                if not self.sources[p].alive:
                    r.error = f"request {r.id}: prefill rank {p} is gone"
                    return r
                if len(t.src):
                    runs = t.strided()
                    local = np.stack([self.cache_reg["addr"] + runs[:, 1], runs[:, 3]], axis=1)
                    remote = np.stack([self.sources[p].info["cache"]["addr"] + runs[:, 0], runs[:, 3]], axis=1)
                    r.pending.add((p, -1))
                    self._post(r, p, -1, None, local, remote, f"sdone:{r.id}")
        for p, t in r.tables.items():
            src = self.sources[p]
            if not src.alive:
                r.error = f"request {r.id}: prefill rank {p} is gone"
                return r
            if mode in ("packed", "auto"):
                for u in range(len(t.units)):
                    r.pending.add((p, u))
                    try:
                        send_msg(
                            src.sock,
                            {
                                "type": "pack",
                                "req": r.id,
                                "unit": u,
                                "tokens": r.tokens,
                                "blocks": [pb.state, list(pb.kv)],
                                "threshold": threshold,
                            },
                        )
                    except OSError as e:
                        self._source_lost(src, f"{e}")
            elif mode == "contiguous":
                # Benchmark reference: the same bytes per unit as one READ of contiguous memory (the
                # source's staging area), no pack, no scatter. Contents are not meaningful.
                for u, (a, b) in enumerate(t.units):
                    r.pending.add((p, u))
                    local = np.array([[self.recv_reg["addr"], b - a]], dtype=np.int64)
                    remote = np.array([[src.info["staging"]["addr"], b - a]], dtype=np.int64)
                    self._post(r, p, u, None, local, remote, f"cdone:{r.id}")
            else:
                runs = t.strided()
                local = np.stack([self.cache_reg["addr"] + runs[:, 1], runs[:, 3]], axis=1)
                remote = np.stack([src.info["cache"]["addr"] + runs[:, 0], runs[:, 3]], axis=1)
                r.pending.add((p, 0))
                self._post(r, p, 0, None, local, remote, f"sdone:{r.id}")
        return r

    def _post(self, r: Request, p: int, unit: int, slot_key, local: np.ndarray, remote: np.ndarray, notif: str) -> None:
        src = self.sources[p]
        try:
            h = self.agent.read(
                local,
                remote,
                src.agent,
                notif.encode(),
                self.cache_reg["mem"],
                self.cache_reg["dev"],
                src.info["cache"]["dev"],
            )
        except Exception as e:  # NIXL raises its own error types
            r.error = f"request {r.id}: READ from prefill rank {p} failed to post: {e}"
            if slot_key is not None:
                self.pool.free(slot_key)
            return
        r.descriptors += len(local)
        r.nbytes += int(local[:, 1].sum())
        self._reads[h] = (r, p, unit, slot_key, time.monotonic())

    def _step(self, active: dict[str, Request], mode: str) -> None:
        # Block on the side channel while no READ is in flight (no CPU burnt waiting for 'ready');
        # poll briefly while READs progress (without a progress thread, polling drives UCX).
        wait = self.opts.poll_s if (self._reads or self._wait_slot) else IDLE_WAIT_S
        for key, _ in self.sel.select(wait):
            self._on_message(key.data, active)
        while self._wait_slot:
            r, p, msg = self._wait_slot[0]
            if r.error is not None:  # the request failed meanwhile: let the source free the unit
                self._release(self.sources[p], msg)
            elif not self._landing(r, p, msg):
                break
            self._wait_slot.popleft()
        for h, (r, p, unit, slot_key, posted) in list(self._reads.items()):
            state = self.agent.poll(h)
            if state == "PROC" and self.sources[p].alive and time.monotonic() - r.start <= self.opts.request_timeout_s:
                continue
            r.read_s += time.monotonic() - posted
            tel = self.agent.telemetry(h) if state == "DONE" else {}
            try:
                self.agent.release(h)
            except Exception:  # a handle whose peer died may refuse release; it is dropped either way
                pass
            del self._reads[h]
            if state != "DONE":
                r.error = r.error or f"request {r.id}: READ from prefill rank {p} ended {state}"
            else:
                r.post_us += tel.get("post_us", 0)
                r.xfer_us += tel.get("xfer_us", 0)
                r.nixl_descs += tel.get("desc_count", 0)
                if slot_key is not None and r.error is None:
                    t = time.monotonic()
                    t = time.monotonic()
                    table = r.tables[p].unit_unpack(unit, self.pool.held(slot_key).offset)
                    ops.copy_segments(self.recv, self.cache, table, backend=self.opts.backend)
                    if self.cfg.device.startswith("cuda"):
                        torch.cuda.synchronize()
                    r.scatter_s += time.monotonic() - t
                r.pending.discard((p, unit))
            if slot_key is not None:
                self.pool.free(slot_key)

    def _on_message(self, src: Source, active: dict[str, Request]) -> None:
        try:
            msg, _ = recv_msg(src.sock, 10.0)
        except (PeerClosed, ProtocolError, TimeoutError, OSError) as e:
            self._source_lost(src, str(e), active)
            return
        r = active.get(str(msg.get("req")))
        if msg["type"] == "error":
            if r is not None and r.error is None:
                r.error = f"request {r.id}: prefill rank {src.rank} refused: {msg.get('message')}"
            return
        if msg["type"] != "ready":
            return
        if r is None or r.error is not None:
            self._release(src, msg)  # a unit of a request that already failed
            return
        if not r.ready_s:
            r.ready_s = time.monotonic() - r.start
        if not self._landing(r, src.rank, msg):
            self._wait_slot.append((r, src.rank, msg))

    def _release(self, src: Source, msg: dict) -> None:
        """Tell `src` to free the slot of a ready unit that will not be read."""
        if src.alive:
            try:
                send_msg(src.sock, {"type": "release", "req": msg.get("req"), "unit": msg.get("unit")})
            except OSError:
                pass

    def _landing(self, r: Request, p: int, msg: dict) -> bool:
        """Post the READ of a ready unit into a receive slot; False if no slot is free yet."""
        unit, n = int(msg["unit"]), int(msg["nbytes"])
        key = (r.id, p, unit)
        slot = self.pool.alloc(key, n)
        if slot is None:
            return False
        local = np.array([[self.recv_reg["addr"] + slot.offset, n]], dtype=np.int64)
        remote = np.array([[int(msg["addr"]), n]], dtype=np.int64)
        self._post(r, p, unit, key, local, remote, f"done:{r.id}:{unit}")
        return True

    def _source_lost(self, src: Source, why: str, active: dict[str, Request] | None = None) -> None:
        if not src.alive:
            return
        src.alive = False
        try:
            self.sel.unregister(src.sock)
        except (KeyError, ValueError):
            pass
        src.sock.close()
        for r in (active or {}).values():
            if any(p == src.rank for p, _ in r.pending) and r.error is None:
                r.error = f"request {r.id}: prefill rank {src.rank} lost ({why})"

    def counts(self) -> dict:
        return {
            **self.agent.counts(),
            "staging_slots": self.pool.live,
            "staging_in_use": self.pool.in_use,
            "in_flight_reads": len(getattr(self, "_reads", {})),
        }

    def close(self) -> None:
        for src in self.sources.values():
            if src.alive:
                try:
                    send_msg(src.sock, {"type": "bye"})
                except OSError:
                    pass
                src.sock.close()
        self.sel.close()
        self.agent.close()


def result_row(r: Request) -> dict:
    return {
        "id": r.id,
        "ok": r.error is None,
        "error": r.error,
        "start": r.start,
        "end": r.end,
        "descriptors": r.descriptors,
        "bytes": r.nbytes,
        "post_us": r.post_us,
        "xfer_us": r.xfer_us,
        "nixl_descs": r.nixl_descs,
        "ready_s": r.ready_s,
        "read_s": r.read_s,
        "scatter_s": r.scatter_s,
    }


def decode_main(cfg: SideConfig, rank: int, prefill: SideConfig, addrs, opts: DecodeOptions, ctl) -> None:
    """Process entry: connect, then run what the driver asks until it says stop."""
    init_rank_process()
    try:
        ep = DecodeEndpoint(cfg, rank, prefill, addrs, opts)
    except Exception as e:  # reported to the driver, which raises it
        ctl.send(("failed", f"{type(e).__name__}: {e}"))
        return
    ctl.send(("ready", {"sources": sorted(ep.sources), "unit_bytes": ep.unit_bytes, "cost": ep.cost}))
    try:
        while True:
            try:
                cmd, *args = ctl.recv()
            except EOFError:
                break
            if cmd == "arm":  # reset the cache to the oracle background, then wait for "go"
                mode, requests, concurrency, seed, verify = args
                ep.reset(seed)
                ctl.send(("armed",))
            elif cmd == "go":
                t0 = time.monotonic()
                try:
                    done = ep.run(mode, requests, concurrency)
                except Exception as e:
                    ctl.send(("failed", f"run: {type(e).__name__}: {e}"))
                    continue
                t1 = time.monotonic()
                mism = ep.mismatches(seed, requests, {r.id for r in done if r.error is None}) if verify else []
                ctl.send(
                    (
                        "result",
                        {
                            "rows": [result_row(r) for r in done],
                            "t0": t0,
                            "t1": t1,
                            "mismatches": mism,
                            "counts": ep.counts(),
                        },
                    )
                )
            elif cmd == "counts":
                ctl.send(("counts", ep.counts()))
            elif cmd == "stop":
                break
    finally:
        ep.close()
        counts = ep.counts()  # after close: what is still held is a leak
        try:
            ctl.send(("closed", counts))
        except (BrokenPipeError, OSError):
            pass
