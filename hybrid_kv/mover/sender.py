"""A prefill rank's staging: the one place a request's state is staged for a decode rank, whichever way it
leaves - a decode rank asked for it (pull), its prefill finished and it is packed before anyone asks, or
a decode rank granted receive slots and it is WRITTEN there (push).

Each staging is all or none (a request's slots for one or more decode ranks, in one pool allocation), its
copy is ordered after the step that wrote the pages (`fence`) and runs as one launch, and what is
announced carries a lease: the slots stay the decode rank's until then (`announce`; the decode rank's
fence is `messages.LeaseClock.read_by`). Slot keys are `(holder, request, decode rank, unit)`: `holder` is
a side-channel connection, or "push" for slots a WRITE reads (unleased: freed when the WRITE ends).
No I/O here: the side-channel server and the push adapter send what this returns.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from hybrid_kv.mover.geometry import StateGeometry
from hybrid_kv.staging import messages as M
from hybrid_kv.staging.chunk import Blocks, Chunk, copy_jobs, state_chunk
from hybrid_kv.staging.copier import Copier, Done
from hybrid_kv.staging.pool import LeasedPool
from hybrid_kv.staging.template import PlanCache

Prefix = tuple  # (holder, request, decode rank): a staging's slots are its keys plus the unit index
Item = tuple  # (prefix, chunk) or (prefix, chunk, units): what `launch` stages


def _keys(item: Item) -> list[tuple]:
    """The slot keys of an item: its prefix and each unit it stages."""
    return [item[0] + (u,) for u in (range(len(item[1].units)) if len(item) == 2 else item[2])]


def units(offsets: list[int], sizes: list[int]) -> list[tuple[int, int, int]]:
    """(unit, offset, nbytes) of a request's staged units, as `ready` announces them."""
    return [(u, o, n) for u, (o, n) in enumerate(zip(offsets, sizes))]


class Sender:
    """Staging slots, fences and leases of one prefill rank (thread-safe: packs run on several threads).
    `geometry` and `plans` (an engine's rank) give `chunk`; the CLI transport builds its own chunks."""

    def __init__(self, copier: Copier, lease_s: float, timeout_s: float, *, geometry: StateGeometry | None = None,
                 plans: PlanCache | None = None, pool: LeasedPool | None = None) -> None:  # fmt: skip
        self.copier, self.staging = copier, copier.staging
        self.geom, self.plans, self.lease_s, self.timeout_s = geometry, plans, lease_s, timeout_s
        self.pool = pool if pool is not None else LeasedPool(self.staging.numel())
        self._cv = threading.Condition()
        self._fences: dict[str, object] = {}  # request -> CUDA event after the step that wrote its state
        self._staged: dict[Prefix, tuple[Blocks, list[int], list[int]]] = {}  # -> (blocks, offsets, sizes)

    # ---- what to stage --------------------------------------------------------------------------------

    def chunk(self, decode_tp: int, decode_rank: int, blocks: Blocks, pair=None) -> Chunk:
        """This rank's chunk of a request for one decode rank (its block ids per group, checked; `pair`: its
        plan, if the caller has it)."""
        lay = self.geom.layout
        pair = pair or self.plans.pair(lay.tp_size, decode_tp, lay.tp_rank, decode_rank)
        self.geom.check_blocks(blocks, "prefill")
        return state_chunk(pair, self.geom, blocks, "prefill", self.plans.shapes)

    # ---- staging --------------------------------------------------------------------------------------

    def stage(self, items: list[Item], reqs: list[str], **kw) -> list[list[int] | None]:
        """`launch`, then wait for the copy; their slot offsets, in order."""
        offsets, done = self.launch(items, reqs, **kw)
        try:
            done.wait()
        except BaseException:
            self._free_items(items, offsets)
            raise
        return offsets

    def launch(self, items: list[Item], reqs: list[str], *, fit: str = "all", wait_s: float | None = None,
               leased: bool = True) -> tuple[list[list[int] | None], Done]:  # fmt: skip
        """Allocate the slots of `items` ((prefix, chunk) or (prefix, chunk, units): those units only; keys
        `(*prefix, unit)`) and pack them in one launch, behind the fences of `reqs`: their offsets, in order,
        and the launch's completion. `fit`: "all" - every item or none, waiting up to `wait_s` (default half
        the decode rank's timeout) while the pool is full; "each" - item by item, None for those that find no
        room or are held already (staged by another thread); "fifo" - in order, up to the first that finds
        none. `leased`: the slots expire (else they stay
        until freed: a WRITE's, or announced later). A failed launch frees every slot it had, and raises."""
        keys = [_keys(item) for item in items]
        sizes = [item[1].unit_bytes if len(item) == 2 else [item[1].unit_bytes[u] for u in item[2]] for item in items]
        if fit == "all":
            flat = self._alloc([k for ks in keys for k in ks], [n for ns in sizes for n in ns], reqs, wait_s, leased)
            got = iter(flat)
            offsets: list[list[int] | None] = [[next(got) for _ in ks] for ks in keys]
        else:
            offsets = [None] * len(items)
            with self._cv:
                until = time.monotonic() + self.lease_s if leased else None
                for i, ks in enumerate(keys):
                    if fit == "each" and any(self.pool.held(k) for k in ks):
                        continue  # staged already, by another thread
                    slots = self.pool.alloc_all(ks, sizes[i], until)
                    if slots is None:
                        if fit == "fifo":  # later items must not overtake
                            break
                        continue
                    offsets[i] = [s.offset for s in slots]
        run, parts = [], None  # whole chunks as they are; units of one chunk merged (whole if all came)
        for item, offs in zip(items, offsets):
            if offs is None:
                continue
            if len(item) == 2:
                run.append((item[1], offs))
            else:
                parts = parts or {}
                parts.setdefault(id(item[1]), (item[1], {}))[1].update(zip(item[2], offs))
        if parts:
            run += copy_jobs(parts.values())
        after = [self._fences[r] for r in reqs if r in self._fences]
        try:
            done = self.copier.run(run, after=after) if run else Done()
        except BaseException:
            self._free_items(items, offsets)
            raise
        return offsets, done

    def _free_items(self, items: list[Item], offsets) -> None:
        mine = {k for item, o in zip(items, offsets) if o is not None for k in _keys(item)}
        self.free_where(lambda k: k in mine)

    def stage_writes(self, req: str, decode_tp: int, blocks: Blocks, theirs: Blocks, grants: dict, wait_s: float,
                     granted_as: str):  # fmt: skip
        """Push: the request's state for every decode rank that granted receive slots (for its request
        `granted_as`, the decode engine's id of it), staged in one launch
        (unleased: the WRITEs' end frees them, keys `("push", req, rank, unit)`) once each grant is checked: it
        is for the blocks the decode engine registered (`theirs`), it ends later than `PUSH_MARGIN_S` from
        now (the decode rank's fence), and it names every unit of this rank's chunk at its planned size.
        Each rank's WRITE as (local, remote) descriptor lists of (address, bytes, device)."""
        now = time.monotonic()
        for r, g in grants.items():
            if now > g.until - M.PUSH_MARGIN_S:
                raise ValueError(f"decode rank {r}'s grant of {granted_as} ends in {g.until - now:.1f} s (too late)")
            if g.blocks != theirs:
                raise ValueError(f"decode rank {r} granted blocks {g.blocks}, its engine registered {theirs}")
        chunks = {r: self.chunk(decode_tp, r, blocks) for r in grants}
        for r, c in chunks.items():
            if [n for _, _, n in grants[r].units] != c.unit_bytes:
                raise ValueError(f"decode rank {r} granted {grants[r].units}, the plan has units {c.unit_bytes}")
        staged = self.stage([(("push", req, r), c) for r, c in chunks.items()], [req], wait_s=wait_s, leased=False)
        base, dev = self.staging.data_ptr(), self.staging.device.index or 0
        return {
            r: ([(base + o, n, dev) for o, (_, _, n) in zip(offs, g.units)],
                [(g.staging[0] + o, n, g.staging[2]) for _, o, n in g.units])
            for (r, g), offs in zip(grants.items(), staged)
        }  # fmt: skip

    def _alloc(self, keys: list[tuple], sizes: list[int], reqs: list[str], wait_s: float | None, leased: bool):
        wait_s = self.timeout_s / 2 if wait_s is None else wait_s  # answer before the decode rank's deadline
        deadline = time.monotonic() + wait_s
        with self._cv:
            while True:
                got = self.pool.alloc_all(keys, sizes, time.monotonic() + self.lease_s if leased else None)
                if got is not None:
                    return [s.offset for s in got]
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(
                        f"staging pool full: request {', '.join(reqs)} needs {sum(sizes)} B in {len(sizes)} "
                        f"slot(s), {self.pool.in_use} of {self.pool.capacity} B held for {wait_s:.0f} s "
                        "(raise hybrid_kv_staging_bytes, or hybrid_kv_timeout_s to wait longer)"
                    )
                self._cv.wait(min(left, 0.5))

    def staged(self, prefix: Prefix, blocks: Blocks, sizes: list[int]) -> list[int] | None:
        """The offsets of a staging of the same blocks and units announced earlier and still held."""
        with self._cv:
            hit = self._staged.get(prefix)
        return hit[1] if hit is not None and hit[0] == blocks and hit[2] == sizes else None

    def lease(self, keys: list[tuple]) -> float | None:
        """Lease `keys` from now (the decode rank READs within it: its fence); None if one was freed meanwhile."""
        with self._cv:
            if not all(self.pool.held(k) for k in keys):
                return None
            until = time.monotonic() + self.lease_s
            for k in keys:
                self.pool.lease(k, until)
            return until

    def announce(self, prefix: Prefix, blocks: Blocks, offsets: list[int], sizes: list[int]) -> dict | None:
        """Lease a staging from now and give its `ready` (None: its slots were freed meanwhile); kept, so a
        decode rank that asks for the same blocks gets it again (`staged`)."""
        with self._cv:
            until = self.lease([(*prefix, u) for u in range(len(sizes))])
            if until is None:
                return None
            self._staged[prefix] = (blocks, offsets, sizes)
        return M.ready(prefix[1], units(offsets, sizes), until, blocks)

    def release(self, key: tuple) -> bool:
        """A decode rank's READ of `key` completed (its notification): the slot is free."""
        with self._cv:
            return self.pool.release(key)

    # ---- life of the slots ----------------------------------------------------------------------------

    def fence(self, reqs, event) -> None:
        """Order every staging of `reqs` behind `event`, a CUDA event recorded on the engine thread's stream."""
        with self._cv:
            self._fences.update(dict.fromkeys(reqs, event))

    def forget(self, req: str) -> None:
        """The request is done on this prefill rank (read, aborted or its lease expired): free its slots."""
        self.free_where(lambda k: k[1] == req)
        with self._cv:
            self._fences.pop(req, None)

    def free_where(self, pred: Callable[[tuple], bool]) -> int:
        """Free every slot whose key satisfies `pred` (and wake waiters); returns how many."""
        with self._cv:
            n = self.pool.free_where(pred)
            if n:
                self._drop_unheld()
            return n

    def reap(self) -> int:
        """Free the slots whose lease ended; returns how many."""
        with self._cv:
            n = self.pool.expire(time.monotonic())
            if n:
                self._drop_unheld()
            return n

    def _drop_unheld(self) -> None:
        self._staged = {k: v for k, v in self._staged.items() if self.pool.held((*k, 0))}
        self._cv.notify_all()

    @property
    def live_slots(self) -> int:
        with self._cv:
            return self.pool.live
