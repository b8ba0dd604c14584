"""Decode rank endpoint: connects to the prefill ranks it reads from, then moves requests.

* packed: before a run, tell each source to pack everything for this rank (``mode``, warm-up). The
  sources pack each request when its prefill finishes and announce each unit (``ready``) unasked; on
  ``ready`` READ it with **one descriptor** into a receive-staging slot; when READs complete, scatter
  every landed unit of the step into the pages (one launch) and free the slots. The READ's notification
  tells the source to free its slot. No request waits on a reply to a message of its own.
* auto: the same for the short runs of the pairs where packing pays (`cost`), the rest page to page.
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

from hybrid_kv.layout import cdiv
from hybrid_kv.plan import TransferPlan
from hybrid_kv.staging.chunk import Chunk, direct_runs, flat_chunk
from hybrid_kv.staging.copier import Copier
from hybrid_kv.staging.pagemap import PageMap
from hybrid_kv.staging.template import ALL, PlanCache
from hybrid_kv.transport.common import (
    RankMemory,
    SideConfig,
    blocks_from,
    check_peer,
    hello_fields,
    init_rank_process,
)
from hybrid_kv.transport.cost import calibrate, pack_pays
from hybrid_kv.transport.wire import PeerClosed, ProtocolError, expect, recv_msg, send_msg

IDLE_WAIT_S = 0.01  # longest sleep in select when only side-channel messages can make progress
MAX_EARLY_UNITS = 4096  # announcements kept per (request, source) before this rank starts the request


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
    chunks: dict  # prefill rank -> this rank's chunk of the packed part
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
        self.plans = PlanCache(self.spec, self.layout.conv_layout, self.layout.kv_layout, self.unit_bytes)
        self.pages = PageMap.flat(self.geom.num_layers, self.geom.num_blocks, self.geom.page_bytes)
        self.ppages = PageMap.flat(self.pgeom.num_layers, self.pgeom.num_blocks, self.pgeom.page_bytes)
        self.copier = Copier(self.cache, self.pages, self.recv, "decode", self.opts.backend)
        self.parts: dict[int, tuple | None] = {}  # source -> what it packs for this rank in this run
        self._early: dict[tuple[str, int], list[dict]] = {}  # (request, source) -> ready before it started
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
        from hybrid_kv.testing.fill import background

        self.cache.copy_(background(self.geom, seed, 1, self.rank))

    def mismatches(self, seed: int, requests: list[dict], ok_ids: set[str]) -> list[str]:
        """The cache against the oracle (pages of failed requests are not compared)."""
        from hybrid_kv.testing.fill import verify_cache

        return verify_cache(
            self.cache, self.layout, self.cfg.num_blocks, self.player[0].block_size, seed, requests, ok_ids
        )

    # ---- running requests -------------------------------------------------------------------------------

    def configure(self, mode: str, requests: list[dict], concurrency: int) -> None:
        """Before a run (warm-up, one reply per source): what each source packs for this rank. A source
        drops whatever it still holds for this rank from an earlier run when it gets this."""
        self._concurrency = concurrency
        self._early.clear()
        threshold = self.cost["threshold_bytes"]
        plan = self.plan(int(requests[0]["tokens"])) if (requests and mode == "auto") else None
        packed_t = plan.split(threshold)[0] if plan is not None else {}
        for p, src in self.sources.items():
            if mode == "packed":
                part = ALL
            elif mode == "auto" and plan is not None and self._pack_pays(plan, p, packed_t):
                part = ("small", threshold)
            else:
                part = None
            self.parts[p] = part
            if not src.alive:
                continue
            send_msg(src.sock, {"type": "mode", "part": None if part is None else list(part)})
            deadline = time.monotonic() + self.opts.handshake_timeout_s
            while True:  # announcements of an earlier run may still be queued ahead of the reply
                msg, _ = recv_msg(src.sock, max(0.0, deadline - time.monotonic()))
                if msg["type"] == "mode-ok":
                    break
                if msg["type"] == "error" and msg.get("req") is None:
                    raise RuntimeError(f"prefill rank {p} refused mode {mode}: {msg.get('message')}")

    def run(self, mode: str, requests: list[dict], concurrency: int) -> list[Request]:
        if concurrency < 1:
            raise ValueError(f"concurrency={concurrency} must be >= 1")
        self._concurrency = concurrency
        todo = deque(requests)
        active: dict[str, Request] = {}
        finished: list[Request] = []
        self._reads: dict = {}  # xfer handle -> (request, source rank, unit, slot key, posted)
        self._wait_slot: deque = deque()  # (request, source rank, ready message) waiting for a recv slot
        while todo or active:
            while todo and len(active) < concurrency:
                r = self._start(todo.popleft(), mode)
                active[r.id] = r  # even a request that failed to start may have READs to retire
                for p in list(r.chunks):
                    for msg in self._early.pop((r.id, p), []):
                        self._on_ready(r, p, msg)
            self._step(active, mode)
            now = time.monotonic()
            for rid, r in list(active.items()):
                if not r.done and now - r.start > self.opts.request_timeout_s:
                    r.error = (
                        f"request {rid}: timed out after {self.opts.request_timeout_s:.1f} s waiting for "
                        f"{sorted(r.pending)} (prefill rank, unit)"
                    )
                if r.done and not self._reads_of(r):
                    if r.error is not None:
                        self._release_request(r)
                    r.end = time.monotonic()
                    finished.append(active.pop(rid))
        # READs of requests that failed while they were in flight: retire them (bounded by the deadline
        # the poll loop applies) so no handle outlives the run.
        while self._reads:
            self._step({}, mode)
        return finished

    def _reads_of(self, r: Request) -> bool:
        return any(v[0] is r for v in self._reads.values())

    def _chunk(
        self, p: int, part: tuple, tokens: int, pb, db, prefill_side: bool = False
    ) -> tuple[Chunk, Chunk | None]:
        sizes = (self.pcfg.block_size, self.cfg.block_size)
        pair = self.plans.pair(self.pcfg.tp_size, self.cfg.tp_size, p, self.rank, sizes, part)
        bs = (self.player[0].block_size, self.layout.block_size)
        d = flat_chunk(self.plans.shapes, pair, self.pages, "decode", tokens, db.state, db.kv, bs)
        if not prefill_side:
            return d, None
        return d, flat_chunk(self.plans.shapes, pair, self.ppages, "prefill", tokens, pb.state, pb.kv, bs)

    def _start(self, spec: dict, mode: str) -> Request:
        pb, db = blocks_from(spec["prefill_blocks"]), blocks_from(spec["decode_blocks"])
        r = Request(str(spec["id"]), int(spec["tokens"]), pb, db, {}, start=time.monotonic())
        try:
            _check_kv_ids(db, r.tokens, self.layout.block_size if self.spec.attention_layers else 0, "decode")
            sources = self.plans.sources(
                self.pcfg.tp_size, self.cfg.tp_size, (self.pcfg.block_size, self.cfg.block_size)
            )
            for p in sources[self.rank]:
                if not self.sources[p].alive:
                    raise ValueError(f"prefill rank {p} is gone")
                part = self.parts.get(p) if mode in ("packed", "auto") else None
                if mode == "contiguous":
                    r.chunks[p] = self._chunk(p, ALL, r.tokens, pb, db)[0]
                elif part is not None:
                    r.chunks[p] = self._chunk(p, part, r.tokens, pb, db)[0]
                if mode in ("strided", "auto"):  # page to page: all of it, or the large runs
                    rest = ("large", part[1]) if part is not None else ("large", 0)
                    dx, px = self._chunk(p, rest, r.tokens, pb, db, prefill_side=True)
                    runs = direct_runs(px, dx)
                    if len(runs):
                        src = self.sources[p]
                        local = np.stack([self.cache_reg["addr"] + runs[:, 1], runs[:, 2]], axis=1)
                        remote = np.stack([src.info["cache"]["addr"] + runs[:, 0], runs[:, 2]], axis=1)
                        r.pending.add((p, -1))
                        self._post(r, p, -1, None, local, remote, f"sdone:{r.id}")
        except ValueError as e:
            r.error = f"request {r.id}: {e}"
            return r
        for p, chunk in r.chunks.items():
            if mode == "contiguous":
                # Benchmark reference: the same bytes per unit as one READ of contiguous memory (the
                # source's staging area), no pack, no scatter. Contents are not meaningful.
                src = self.sources[p]
                for u, n in enumerate(chunk.unit_bytes):
                    r.pending.add((p, u))
                    local = np.array([[self.recv_reg["addr"], n]], dtype=np.int64)
                    remote = np.array([[src.info["staging"]["addr"], n]], dtype=np.int64)
                    self._post(r, p, u, None, local, remote, f"cdone:{r.id}")
            else:
                r.pending.update((p, u) for u in range(len(chunk.units)))  # announced by the source
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
            if r.error is None and not self._landing(r, p, msg):
                break
            self._wait_slot.popleft()
        landed = []  # (request, source, unit, slot key): scattered together, one launch
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
                    landed.append((r, p, unit, slot_key))
                    continue
                r.pending.discard((p, unit))
            if slot_key is not None:
                self.pool.free(slot_key)
        if landed:
            self._scatter(landed)

    def _scatter(self, landed: list) -> None:
        t = time.monotonic()
        got: dict[tuple, dict[int, int]] = {}
        for r, p, u, k in landed:
            got.setdefault((id(r), p), {})[u] = self.pool.held(k).offset
        jobs, seen = [], set()
        for r, p, _, _ in landed:  # a chunk whose units all landed now is one job
            if (id(r), p) in seen:
                continue
            seen.add((id(r), p))
            chunk, offs = r.chunks[p], got[(id(r), p)]
            if len(offs) == len(chunk.units):
                jobs.append((chunk, [offs[u] for u in range(len(chunk.units))]))
            else:
                jobs += [(chunk.unit(u), [off]) for u, off in offs.items()]
        try:
            self.copier.run(jobs).wait()
        except ValueError as e:  # validated before any byte was written
            for r, *_ in landed:
                r.error = r.error or f"request {r.id}: scatter refused: {e}"
        dt = time.monotonic() - t
        for r, p, u, k in landed:
            r.scatter_s += dt
            r.pending.discard((p, u))
            self.pool.free(k)

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
        if r is None:  # announced before this rank started the request: keep it (bounded by the run)
            early = self._early.setdefault((str(msg.get("req")), src.rank), [])
            if len(early) < MAX_EARLY_UNITS:
                early.append(msg)
            return
        self._on_ready(r, src.rank, msg)

    def _on_ready(self, r: Request, p: int, msg: dict) -> None:
        if r.error is not None:
            return  # the request's release (when it retires) frees the source's slots
        chunk = r.chunks.get(p)
        unit, n, addr = msg.get("unit"), msg.get("nbytes"), msg.get("addr")
        staging = self.sources[p].info["staging"]
        ok = (
            chunk is not None
            and isinstance(unit, int)
            and 0 <= unit < len(chunk.units)
            and n == chunk.unit_bytes[unit]
            and isinstance(addr, int)
            and staging["addr"] <= addr
            and addr + n <= staging["addr"] + staging["nbytes"]
            and (p, unit) in r.pending
        )
        if not ok:
            r.error = (
                f"request {r.id}: prefill rank {p} announced unit={unit!r} nbytes={n!r} addr={addr!r}, "
                f"which its plan for this rank does not hold"
            )
            return
        if not r.ready_s:
            r.ready_s = time.monotonic() - r.start
        if not self._landing(r, p, msg):
            self._wait_slot.append((r, p, msg))

    def _release_request(self, r: Request) -> None:
        """Tell each source to free what it staged (or still queues) for a request that failed."""
        for p in r.chunks:
            src = self.sources[p]
            if src.alive:
                try:
                    send_msg(src.sock, {"type": "release", "req": r.id})
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
            if cmd == "arm":  # reset the cache to the oracle background, configure sources, wait for "go"
                mode, requests, concurrency, seed, verify = args
                ep.reset(seed)
                try:
                    ep.configure(mode, requests, concurrency)
                except Exception as e:
                    ctl.send(("failed", f"arm: {type(e).__name__}: {e}"))
                    continue
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


def _check_kv_ids(blocks, tokens: int, block_size: int, side: str) -> None:
    """The right number of distinct KV block ids for `tokens` (range is checked with the page map)."""
    want = cdiv(tokens, block_size) if block_size else 0
    if len(blocks.kv) != want:
        raise ValueError(f"{side}: {len(blocks.kv)} kv block ids for {tokens} tokens (expected {want})")
    if len(set(blocks.kv)) != len(blocks.kv):
        raise ValueError(f"{side}: duplicate kv block ids {sorted(blocks.kv)}")
