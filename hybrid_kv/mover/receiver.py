"""A decode rank's receives: the one place a request's state is received, pulled (READs from the sources'
staging) or pushed (WRITEs into slots it granted), by a serving engine's rank or the CLI transport's.

A request's receive slots are allocated all or none (`alloc`), or, streaming (the CLI transport: a pool
smaller than a request), one per unit as its source announces it (`alloc_unit`); each source's
announcement (`ready`) is checked against this rank's own chunk before anything is posted (`check_units`);
whatever landed in a step is scattered by one launch (`scatter`, `scatter_units`); and a request is
reported received only once its scatter has completed. No I/O here: the caller posts the transfers and
sends the messages.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from hybrid_kv.mover import log
from hybrid_kv.mover.geometry import StateGeometry
from hybrid_kv.mover.link import PrefillLink
from hybrid_kv.staging import messages as M
from hybrid_kv.staging.chunk import Blocks, Chunk, copy_jobs, only_moved, state_chunk
from hybrid_kv.staging.copier import Copier, Done
from hybrid_kv.staging.pool import LeasedPool, Slot
from hybrid_kv.staging.template import PlanCache


@dataclass
class RecvState:
    """One request's state receive on this decode rank."""

    meta: object  # the engine's request metadata
    engine_id: str
    remote_tp: int
    local: Blocks  # group -> decode block ids
    remote: Blocks  # group -> prefill block ids
    chunks: dict[int, Chunk]  # source prefill rank -> this rank's chunk of its state
    units: dict[int, list[int]]  # source prefill rank -> bytes of each of its transfer units
    slots: dict[int, list[Slot]] = field(default_factory=dict)  # source -> receive slots
    read_by: dict[int, float] = field(default_factory=dict)  # source -> its staging lease's end, here
    posted: bool = False
    descriptors: int = 0
    push: Granted | None = None  # push mode: the grant's progress
    remote_of: dict[int, Blocks] = field(default_factory=dict)  # source -> its ids, where not all
    foreign: bool = False  # TP sizes that do not divide: attention KV moves here too, no stock READ
    held: list = field(default_factory=list)  # the stock READ's notifications, sent once every READ completed
    announced: set[tuple[int, int]] = field(default_factory=set)  # (source, unit) announced (checked once)
    unit_slots: dict[tuple[int, int], Slot] = field(default_factory=dict)  # streaming: (source, unit) -> slot

    def blocks_of(self, p: int) -> Blocks:
        """The prefill block ids source `p` packs (all of `remote` unless its pair moves fewer groups)."""
        return self.remote_of.get(p, self.remote)


@dataclass
class Granted:
    """Push mode: the progress of one request's state on this decode rank, from its grant to its last WRITE."""

    req: str  # this engine's request id (what the sources' vLLM knows as the remote request)
    since: float  # registered (the wait for staging and links is bounded from here)
    deadline: float = 0.0  # the grant's end here; 0 until granted
    landed: set[int] = field(default_factory=set)  # sources whose state WRITE landed
    ended: dict[int, str] = field(default_factory=dict)  # sources with nothing in flight and nothing to come
    lost: dict[int, float] = field(default_factory=dict)  # sources whose link was lost, when noticed
    stock_done: bool = False  # the engine's own transfers of the request (attention KV) all came

    def quiet(self, sources, now: float) -> bool:
        """Whether no WRITE of any source can still be in flight into this rank."""
        if not self.deadline or now >= self.deadline:
            return True
        gone = set(self.ended) | {p for p, t in self.lost.items() if now >= t + M.PUSH_MARGIN_S}
        return set(sources) <= gone or (self.stock_done and set(sources) <= self.landed | gone)


class Receiver:
    """Receive slots, announcement checks and the batched scatter of one decode rank (engine thread)."""

    def __init__(self, geometry: StateGeometry | None, plans: PlanCache | None, pool: LeasedPool, copier: Copier,
                 timeout_s: float) -> None:  # fmt: skip
        """`geometry` and `plans` (an engine's rank) give `open` the chunks; the CLI passes its own (`track`)."""
        self.geom, self.plans, self.pool, self.copier, self.timeout_s = geometry, plans, pool, copier, timeout_s
        self.recvs: dict[str, RecvState] = {}
        self.scattering: list[tuple[Done, list[str]]] = []  # launched scatters not yet complete

    def open(self, req_id: str, meta, engine_id: str, remote_tp: int, local: Blocks, remote: Blocks,
             foreign: bool = False) -> RecvState:  # fmt: skip
        """A request's receive from its sources (held from now, no slots yet): this rank's chunk of each
        source's state from its own block ids per group (checked), and which prefill ids each source packs."""
        self.geom.check_blocks(local, "decode")
        lay, geom, plans = self.geom.layout, self.geom, self.plans
        pairs = {p: plans.pair(remote_tp, lay.tp_size, p, lay.tp_rank)
                 for p in plans.sources(remote_tp, lay.tp_size)[lay.tp_rank]}  # fmt: skip
        chunks = {p: state_chunk(pair, geom, only_moved(pair, geom, local), "decode", plans.shapes)
                  for p, pair in pairs.items()}  # fmt: skip
        recv = self.track(req_id, chunks, meta, engine_id, remote_tp, local, remote, foreign)
        for p, pair in pairs.items() if remote else ():
            mine = only_moved(pair, geom, remote)
            if mine is not remote:
                recv.remote_of[p] = mine
        return recv

    def track(self, req_id: str, chunks: dict[int, Chunk], meta=None, engine_id: str = "", remote_tp: int = 0,
              local: Blocks | None = None, remote: Blocks | None = None,
              foreign: bool = False) -> RecvState:  # fmt: skip
        """A request's receive of `chunks` (source -> this rank's chunk of its state), held from now."""
        units = {p: c.unit_bytes for p, c in chunks.items()}
        recv = RecvState(meta, engine_id, remote_tp, local or {}, remote or {}, chunks, units, foreign=foreign)
        self.recvs[req_id] = recv
        return recv

    # ---- receive slots --------------------------------------------------------------------------------

    def alloc(self, req_id: str, recv: RecvState) -> None:
        """All of a request's receive slots or none."""
        try:
            for p, units in recv.units.items():
                got = self.pool.alloc_all([(req_id, p, u) for u in range(len(units))], units)
                if got is None:
                    raise RuntimeError(
                        f"hybrid-kv receive staging full: request {req_id} needs {sum(units)} B more from "
                        f"prefill rank {p}, {self.pool.in_use} of {self.pool.capacity} B in use "
                        "(raise hybrid_kv_staging_bytes)"
                    )
                recv.slots[p] = got
        except BaseException:
            self.free(recv)
            raise

    def alloc_unit(self, req_id: str, recv: RecvState, p: int, u: int) -> Slot | None:
        """Streaming: the receive slot of source `p`'s unit `u` (None while the pool has no room for it)."""
        slot = self.pool.alloc((req_id, p, u), recv.units[p][u])
        if slot is not None:
            recv.unit_slots[(p, u)] = slot
        return slot

    def free_unit(self, recv: RecvState, p: int, u: int) -> None:
        slot = recv.unit_slots.pop((p, u), None)
        if slot is not None:
            self.pool.free(slot.key)

    def quarantine_unit(self, recv: RecvState, p: int, u: int, key: tuple) -> None:
        """Streaming: a unit's slot whose READ could not be released (a late write may still land there) is
        kept under `key`, out of the request's reach, until the caller frees it."""
        self.pool.rekey(recv.unit_slots.pop((p, u)).key, key)

    def free(self, recv: RecvState) -> None:
        for slot in [s for slots in recv.slots.values() for s in slots] + list(recv.unit_slots.values()):
            self.pool.free(slot.key)
        recv.slots.clear()
        recv.unit_slots.clear()

    def drop(self, req_id: str) -> RecvState | None:
        """Forget a request and free its slots (nothing can be in flight into them)."""
        recv = self.recvs.pop(req_id, None)
        if recv is not None:
            self.free(recv)
        return recv

    # ---- announcements --------------------------------------------------------------------------------

    @staticmethod
    def same_blocks(ready: dict, blocks: Blocks) -> bool:
        try:
            return M.blocks_of(ready.get("blocks")) == blocks
        except ValueError:
            return False  # checked again, and refused with its value, by `check_ready`

    def fresh(self, recv: RecvState, p: int, ready: dict, link: PrefillLink) -> bool:
        """Whether a `ready` pushed unasked is of this request's blocks and its lease leaves this rank its
        whole wait for the READ (else it asks again, and the source renews the lease)."""
        if not self.same_blocks(ready, recv.blocks_of(p)):
            return False
        try:
            end = link.clock.local(ready.get("until"))
        except (AttributeError, ValueError):
            return False
        return end - time.monotonic() > 2 * self.timeout_s

    @staticmethod
    def check_units(recv: RecvState, p: int, ready: dict, staging_bytes: int, clock: M.LeaseClock,
                    lease_s: float) -> tuple[list[tuple[int, int, int]], float]:  # fmt: skip
        """The units (unit, offset, bytes) a source's `ready` announces, checked against this rank's own chunk
        of its state and the source's registered staging before any READ is posted: units of the chunk, each
        at its planned size, inside the staging, none announced before; and the READ's fence, the lease's end
        on this rank's clock less the margin (`LeaseClock.read_by`)."""
        units = M.ready_units(ready, recv.units[p], staging_bytes, f"prefill rank {p}")
        again = sorted(u for u, _, _ in units if (p, u) in recv.announced)
        if again:
            raise ValueError(f"prefill rank {p} announced units {again} again, which this rank already holds")
        read_by = clock.read_by(ready.get("until"), lease_s)
        recv.announced.update((p, u) for u, _, _ in units)
        return units, read_by

    def check_ready(self, recv: RecvState, p: int, ready: dict, link: PrefillLink) -> list[tuple[int, int, int]]:
        """A source's `ready` of the whole request (`check_units`, every unit of the chunk, the same blocks)."""
        units, recv.read_by[p] = self.check_units(recv, p, ready, int(link.peer["staging"][1]), link.clock,
                                                  link.peer["lease_s"])  # fmt: skip
        if len(units) != len(recv.units[p]) or not self.same_blocks(ready, recv.blocks_of(p)):
            raise ValueError(
                f"prefill rank {p} announced units {[u for u, _, _ in units]} of blocks "
                f"{ready.get('blocks')!r:.120}; this rank needs units 0..{len(recv.units[p]) - 1} of "
                f"{recv.blocks_of(p)}"
            )
        return sorted(units)

    def grant(self, recv: RecvState, now: float, lease_s: float, clocks: dict[int, M.LeaseClock]) -> dict[int, dict]:
        """Push mode: this rank's grant of the request's receive slots to each source (slots held: `alloc`),
        ending `lease_s` from now here, the end handed to each source on its own clock (`clocks`)."""
        recv.push.deadline = now + lease_s
        return {
            p: M.grant(recv.push.req, [(u, s.offset, n) for u, (s, n) in enumerate(zip(recv.slots[p], sizes))],
                       clocks[p].remote(recv.push.deadline), recv.local)
            for p, sizes in recv.units.items()
        }  # fmt: skip

    def reads(self, recv: RecvState, p: int, units: list[tuple[int, int, int]], peer_staging) -> list[tuple]:
        """Pull: one READ per unit source `p` announced (checked: `check_ready`), into the request's receive
        slots: (local, remote) descriptors of (address, bytes, device)."""
        base, dev = self.copier.staging.data_ptr(), self.copier.staging.device.index or 0
        p_addr, _, p_dev = (int(x) for x in peer_staging)
        return [((base + slot.offset, int(n), dev), (p_addr + int(off), int(n), p_dev))
                for (_, off, n), slot in zip(units, recv.slots[p])]  # fmt: skip

    def late(self, req_id: str, now: float) -> bool:
        """Whether a READ of the request completed after a source's staging lease could have ended."""
        return now >= min(self.recvs[req_id].read_by.values(), default=now)

    # ---- the scatter ----------------------------------------------------------------------------------

    def scatter(self, reqs: list[str]) -> list[str]:
        """One launch for every request whose state landed this step, on the copier's own stream; the
        requests whose scatter was refused (they are still held: the caller fails them)."""
        if not reqs:
            return []
        jobs = {r: [(c, [s.offset for s in self.recvs[r].slots[p]]) for p, c in self.recvs[r].chunks.items()]
                for r in reqs}  # fmt: skip
        try:
            self.scattering.append((self.copier.run([j for r in reqs for j in jobs[r]]), reqs))
            return []
        except Exception as e:  # validated before any byte is written: find the bad request(s)
            log.warning("hybrid-kv: batched scatter of %d request(s) refused (%s); retrying one by one", len(reqs), e)
        refused = []
        for r in reqs:
            try:
                self.scattering.append((self.copier.run(jobs[r]), [r]))
            except Exception as e:
                log.error("hybrid-kv: scatter of %s failed: %s", r, e)
                refused.append(r)
        return refused

    def scatter_units(self, landed: list[tuple[str, int, int]]) -> Done:
        """Streaming: one launch for the units that landed, (request, source, unit): a chunk whose every unit
        is among them is one job. A refused batch raises before any byte is written."""
        parts: dict[tuple[str, int], tuple[Chunk, dict[int, int]]] = {}
        for req_id, p, u in landed:
            recv = self.recvs[req_id]
            parts.setdefault((req_id, p), (recv.chunks[p], {}))[1][u] = recv.unit_slots[(p, u)].offset
        return self.copier.run(copy_jobs(parts.values()))

    def scattered(self) -> list[str]:
        """Requests whose scatter has completed (still held: the caller retires and reports them)."""
        still, out = [], []
        for fin, reqs in self.scattering:
            if fin.ready():
                out += reqs
            else:
                still.append((fin, reqs))
        self.scattering = still
        return out

    def in_scatter(self, req_id: str) -> bool:
        return any(req_id in reqs for _, reqs in self.scattering)
