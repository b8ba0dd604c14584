"""The decode rank's run loop (`DecodeEndpoint.runs`): configure the sources for a run, start
requests up to the concurrency, take the sources' unasked announcements, post one READ per unit (or per
run, page to page, for strided / auto's large runs), and fail a request (releasing its source slots) on a
refusal, a lost source, a failed READ or its deadline. Its receive slots (one per unit, as announced), the
checks of each announcement against this rank's own chunk and the scatter of every unit that landed in a
step (one launch) are the state mover's (`hybrid_kv.mover.receiver.Receiver`, the endpoint's `rx`)."""

from __future__ import annotations

import time
from collections import deque

import numpy as np

from hybrid_kv.batch import blocks_from
from hybrid_kv.layout import cdiv
from hybrid_kv.staging import messages as M
from hybrid_kv.staging.chunk import Chunk, direct_runs, flat_chunk
from hybrid_kv.staging.template import ALL
from hybrid_kv.staging.wire import PeerClosed, ProtocolError, send_msg
from hybrid_kv.transport.cost import pack_pays
from hybrid_kv.transport.request import Request, Source

IDLE_WAIT_S = 0.01  # longest sleep in select when only side-channel messages can make progress
MAX_EARLY_UNITS = 4096  # announcements kept per (request, source) before this rank starts the request


class DecodeRuns:
    """The runs of one decode endpoint (`ep`: its sources, receiver, plans and options), and what a run holds
    in flight: READs, units waiting for a receive slot, announcements that came early."""

    def __init__(self, ep) -> None:
        self.ep = ep
        self.parts: dict[int, tuple | None] = {}  # source -> what it packs for this rank in this run
        self._concurrency = 1
        self._early: dict[tuple[str, int], list[dict]] = {}  # (request, source) -> ready before it started
        self.stuck: dict = {}  # abandoned READ handles that refused release -> their receive slot (all runs)
        self.reads: dict = {}  # xfer handle -> (request, source rank, unit, slot key, posted, read_by)
        self._wait_slot: deque = deque()  # (request, source, (unit, offset, nbytes), read_by) waiting for a slot

    def configure(self, mode: str, requests: list[dict], concurrency: int) -> None:
        """Before a run (warm-up, one reply per source): what each source packs for this rank. A source
        drops whatever it still holds for this rank from an earlier run when it gets this."""
        self._concurrency = concurrency
        self._early.clear()
        threshold = self.ep.cost["threshold_bytes"]
        plan = self.ep.plan(int(requests[0]["tokens"])) if (requests and mode == "auto") else None
        packed_t = plan.split(threshold)[0] if plan is not None else {}
        for p, src in self.ep.sources.items():
            if mode == "packed":
                part = ALL
            elif mode == "auto" and plan is not None and self._pack_pays(plan, p, packed_t):
                part = ("small", threshold)
            else:
                part = None
            self.parts[p] = part
            if not src.alive:
                continue
            send_msg(src.sock, {"type": M.MODE, "part": None if part is None else list(part)})
            self._await_mode_ok(p, src, mode)

    def _pack_pays(self, plan, p: int, packed: dict) -> bool:
        return pack_pays(plan, p, self.ep.rank, packed, self.ep.cost, self._concurrency)

    def _await_mode_ok(self, p: int, src, mode: str) -> None:
        """Wait for source `p`'s reply to `mode`. Announcements of an earlier run may still be queued ahead
        of it (skipped); what comes after it in the same read is this run's, kept until its request starts."""
        deadline = time.monotonic() + self.ep.opts.handshake_timeout_s
        while True:
            msgs = [m for m, _ in src.reader.wait(deadline, f"prefill rank {p}: mode")]
            for i, m in enumerate(msgs):
                if m["type"] == M.ERROR and m.get("req") is None:
                    raise RuntimeError(f"prefill rank {p} refused mode {mode}: {m.get('message')}")
                if m["type"] == M.MODE_OK:
                    for later in msgs[i + 1 :]:
                        self._on_message(src, later, {})
                    return

    def run(self, mode: str, requests: list[dict], concurrency: int, on_finished=None) -> list[Request]:
        """Move `requests`, at most `concurrency` at once; `on_finished(n)` (if given) hears the number of
        requests that have ended (received or failed) each time one ends."""
        if concurrency < 1:
            raise ValueError(f"concurrency={concurrency} must be >= 1")
        self._concurrency = concurrency
        todo = deque(requests)
        active: dict[str, Request] = {}
        finished: list[Request] = []
        self.reads, self._wait_slot = {}, deque()
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
                if not r.done and now - r.start > self.ep.opts.request_timeout_s:
                    r.error = (
                        f"request {rid}: timed out after {self.ep.opts.request_timeout_s:.1f} s waiting for "
                        f"{sorted(r.pending)} (prefill rank, unit)"
                    )
                if r.done and not self._reads_of(r):
                    if r.error is not None:
                        self._release_request(r)
                    self.ep.rx.drop(rid)  # (its slots are free or quarantined by now)
                    r.end = time.monotonic()
                    finished.append(active.pop(rid))
                    if on_finished is not None:
                        on_finished(len(finished))
        # READs of requests that failed while they were in flight: retire them (bounded by the deadline
        # the poll loop applies) so no handle outlives the run.
        while self.reads:
            self._step({}, mode)
        return finished

    def _reads_of(self, r: Request) -> bool:
        return any(v[0] is r for v in self.reads.values())

    def _chunk(
        self, p: int, part: tuple, tokens: int, pb, db, prefill_side: bool = False
    ) -> tuple[Chunk, Chunk | None]:
        sizes = (self.ep.pcfg.block_size, self.ep.cfg.block_size)
        pair = self.ep.plans.pair(self.ep.pcfg.tp_size, self.ep.cfg.tp_size, p, self.ep.rank, sizes, part)
        bs = (self.ep.player[0].block_size, self.ep.layout.block_size)
        d = flat_chunk(self.ep.plans.shapes, pair, self.ep.pages, "decode", tokens, db.state, db.kv, bs)
        if not prefill_side:
            return d, None
        return d, flat_chunk(
            self.ep.plans.shapes, pair, self.ep.sources[p].pages, "prefill", tokens, pb.state, pb.kv, bs
        )

    def _start(self, spec: dict, mode: str) -> Request:
        pb, db = blocks_from(spec["prefill_blocks"]), blocks_from(spec["decode_blocks"])
        r = Request(str(spec["id"]), int(spec["tokens"]), pb, db, {}, start=time.monotonic())
        try:
            _check_kv_ids(db, r.tokens, self.ep.layout.block_size if self.ep.spec.attention_layers else 0, "decode")
            sources = self.ep.plans.sources(
                self.ep.pcfg.tp_size, self.ep.cfg.tp_size, (self.ep.pcfg.block_size, self.ep.cfg.block_size)
            )
            for p in sources[self.ep.rank]:
                if not self.ep.sources[p].alive:
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
                        src = self.ep.sources[p]
                        local = np.stack([self.ep.cache_reg["addr"] + runs[:, 1], runs[:, 2]], axis=1)
                        remote = np.stack([src.info["cache"]["addr"] + runs[:, 0], runs[:, 2]], axis=1)
                        r.pending.add((p, -1))
                        self._post(r, p, -1, None, local, remote, f"sdone:{r.id}")
        except ValueError as e:
            r.error = f"request {r.id}: {e}"
            return r
        if mode != "contiguous":
            self.ep.rx.track(r.id, r.chunks)
        for p, chunk in r.chunks.items():
            if mode == "contiguous":
                # Benchmark reference: the same bytes per unit as one READ of contiguous memory (the
                # source's staging area), no pack, no scatter. Contents are not meaningful.
                src = self.ep.sources[p]
                for u, n in enumerate(chunk.unit_bytes):
                    r.pending.add((p, u))
                    local = np.array([[self.ep.recv_reg["addr"], n]], dtype=np.int64)
                    remote = np.array([[src.info["staging"]["addr"], n]], dtype=np.int64)
                    self._post(r, p, u, None, local, remote, f"cdone:{r.id}")
            else:
                r.pending.update((p, u) for u in range(len(chunk.units)))  # announced by the source
        return r

    def _post(
        self, r: Request, p: int, unit: int, slot_key, local, remote, notif: str, read_by: float | None = None
    ) -> None:
        src = self.ep.sources[p]
        try:
            h = self.ep.agent.read(
                local,
                remote,
                src.agent,
                notif.encode(),
                self.ep.cache_reg["mem"],
                self.ep.cache_reg["dev"],
                src.info["cache"]["dev"],
            )
        except Exception as e:  # NIXL raises its own error types
            r.error = f"request {r.id}: READ from prefill rank {p} failed to post: {e}"
            if slot_key is not None:
                self.ep.rx.free_unit(self.ep.rx.recvs[r.id], p, unit)
            return
        r.descriptors += len(local)
        r.nbytes += int(local[:, 1].sum())
        self.reads[h] = (r, p, unit, slot_key, time.monotonic(), read_by)

    def _step(self, active: dict[str, Request], mode: str) -> None:
        # Block on the side channel while no READ is in flight (no CPU burnt waiting for 'ready');
        # poll briefly while READs progress (without a progress thread, polling drives UCX).
        wait = self.ep.opts.poll_s if (self.reads or self._wait_slot) else IDLE_WAIT_S
        for key, _ in self.ep.sel.select(wait):
            self._on_readable(key.data, active)
        now = time.monotonic()
        for src in self.ep.sources.values():
            if src.alive and src.reader.stale(now):
                self.ep.source_lost(src, f"a message incomplete after {src.reader.deadline_s:g} s", active)
        while self._wait_slot:
            r, p, unit, read_by = self._wait_slot[0]
            if r.error is None and not self._landing(r, p, unit, read_by):
                break
            self._wait_slot.popleft()
        landed = []  # (request, source, unit, slot key): scattered together, one launch
        self._poll_stuck()
        for h, (r, p, unit, slot_key, posted, read_by) in list(self.reads.items()):
            state = self.ep.agent.poll(h)
            now = time.monotonic()
            if state == "PROC":
                if read_by is not None and now >= read_by:
                    why = f"did not complete within the source's staging lease ({self.ep.sources[p].lease_s:g} s)"
                elif now - r.start > self.ep.opts.request_timeout_s:
                    why = f"timed out after {self.ep.opts.request_timeout_s:.1f} s"
                elif not self.ep.sources[p].alive:
                    why = "lost its source"
                else:
                    continue
                r.error = r.error or f"request {r.id}: READ of unit {unit} from prefill rank {p} {why}"
            r.read_s += now - posted
            tel = self.ep.agent.telemetry(h) if state == "DONE" else {}
            del self.reads[h]
            try:
                self.ep.agent.release(h)
            except Exception:  # still in flight: a late write may land in its slot, so the slot waits
                if state == "PROC" and slot_key is not None:
                    # under a key of its own: the request's id may come again (a retry, the next run)
                    self.stuck[h] = ("quarantined", id(h))
                    self.ep.rx.quarantine_unit(self.ep.rx.recvs[r.id], p, unit, self.stuck[h])
                    continue
            if state == "DONE" and read_by is not None and now >= read_by:
                state = "after the source's staging lease could have ended (bytes not used)"
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
                self.ep.rx.free_unit(self.ep.rx.recvs[r.id], p, unit)
        if landed:
            self._scatter(landed)

    def _poll_stuck(self) -> None:
        """Receive slots of abandoned READs whose handle could not be released: freed once it ends."""
        for h, slot_key in list(self.stuck.items()):
            if self.ep.agent.poll(h) == "PROC":
                continue
            try:
                self.ep.agent.release(h)
            except Exception:
                continue
            del self.stuck[h]
            self.ep.rx.pool.free(slot_key)

    def _scatter(self, landed: list) -> None:
        """Scatter every unit that landed this step: one launch (Triton); with the synchronous torch
        backend one request (and source) at a time, so that each completes as soon as its own bytes are
        in, rather than after the whole step's."""
        groups: dict[tuple, list] = {}
        for item in landed:
            groups.setdefault((id(item[0]), item[1]), []).append(item)
        batches = [list(groups.values())] if self.ep.copier.backend != "torch" else [[g] for g in groups.values()]
        for batch in batches:
            t = time.monotonic()
            try:
                self.ep.rx.scatter_units([(r.id, p, u) for items in batch for r, p, u, _ in items]).wait()
            except ValueError as e:  # validated before any byte was written
                for items in batch:
                    r = items[0][0]
                    r.error = r.error or f"request {r.id}: scatter refused: {e}"
            dt = time.monotonic() - t
            for items in batch:
                items[0][0].scatter_s += dt
                for r, p, u, _ in items:
                    r.pending.discard((p, u))
                    self.ep.rx.free_unit(self.ep.rx.recvs[r.id], p, u)

    def _on_readable(self, src: Source, active: dict[str, Request]) -> None:
        """What arrived from `src`, never blocking: a source that sent part of a message and stalls is
        lost once the message is overdue (`_step`), and no other source waits for it."""
        try:
            msgs = src.reader.read()
        except (PeerClosed, ProtocolError, OSError) as e:
            self.ep.source_lost(src, str(e), active)
            return
        for msg, _ in msgs:
            self._on_message(src, msg, active)

    def _on_message(self, src: Source, msg: dict, active: dict[str, Request]) -> None:
        r = active.get(str(msg.get("req")))
        if msg["type"] == M.ERROR:
            if r is not None and r.error is None:
                r.error = f"request {r.id}: prefill rank {src.rank} refused: {msg.get('message')}"
            return
        if msg["type"] != M.READY:
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
        recv, src = self.ep.rx.recvs.get(r.id), self.ep.sources[p]
        try:
            if recv is None or p not in recv.chunks:
                raise ValueError(f"prefill rank {p} announced units for a request it holds no chunk of here")
            # the fence: bytes count only if their READ completed before the lease could end here
            units, read_by = self.ep.rx.check_units(recv, p, msg, src.info["staging"]["nbytes"], src.clock, src.lease_s)
        except ValueError as e:
            r.error = f"request {r.id}: {e}"
            return
        if not r.ready_s:
            r.ready_s = time.monotonic() - r.start
        for unit in units:
            if not self._landing(r, p, unit, read_by):
                self._wait_slot.append((r, p, unit, read_by))

    def _release_request(self, r: Request) -> None:
        """Tell each source to free what it staged (or still queues) for a request that failed."""
        for p in r.chunks:
            src = self.ep.sources[p]
            if src.alive:
                try:
                    send_msg(src.sock, {"type": M.RELEASE, "req": r.id})
                except OSError:
                    pass

    def _landing(self, r: Request, p: int, unit: tuple[int, int, int], read_by: float) -> bool:
        """Post the READ of a ready (unit, offset, nbytes) into a receive slot; False if no slot is free yet.

        The lease fence: the source may reuse the slot once the lease it announced ends, so a unit is READ
        only while `read_by` (that end on this rank's clock, minus a margin) is ahead, a READ still running
        at `read_by` is abandoned and one that completed after it is discarded (`_step`). A late unit
        fails its request; it never delivers bytes of whatever the source staged there next."""
        u, off, n = unit
        if time.monotonic() >= read_by:
            r.error = r.error or (
                f"request {r.id}: unit {u} of prefill rank {p} waited past its staging lease "
                f"({self.ep.sources[p].lease_s:g} s) for a receive slot; not read (raise the prefill's lease or "
                "this rank's staging pool)"
            )
            return True
        slot = self.ep.rx.alloc_unit(r.id, self.ep.rx.recvs[r.id], p, u)
        if slot is None:
            return False
        local = np.array([[self.ep.recv_reg["addr"] + slot.offset, n]], dtype=np.int64)
        remote = np.array([[self.ep.sources[p].info["staging"]["addr"] + off, n]], dtype=np.int64)
        self._post(r, p, u, slot.key, local, remote, f"done:{r.id}:{u}", read_by)
        return True


def _check_kv_ids(blocks, tokens: int, block_size: int, side: str) -> None:
    """The right number of distinct KV block ids for `tokens` (range is checked with the page map)."""
    want = cdiv(tokens, block_size) if block_size else 0
    if len(blocks.kv) != want:
        raise ValueError(f"{side}: {len(blocks.kv)} kv block ids for {tokens} tokens (expected {want})")
    if len(set(blocks.kv)) != len(blocks.kv):
        raise ValueError(f"{side}: duplicate kv block ids {sorted(blocks.kv)}")
