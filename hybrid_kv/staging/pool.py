"""Bounded staging pool: variable-size slots carved first-fit out of one registered buffer.

A slot is never handed out twice while held; freed neighbours coalesce. The pool does not wait:
`alloc` returns None when nothing fits, and the endpoint's event loop queues the request and retries
when a slot is freed (bounded by its own deadline), so a full pool delays work and never overwrites.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

ALIGN = 16


@dataclass
class Slot:
    key: tuple
    offset: int
    nbytes: int


class StagingPool:
    def __init__(self, capacity: int) -> None:
        if capacity < ALIGN:
            raise ValueError(f"staging pool capacity={capacity} must be >= {ALIGN} bytes")
        self.capacity = capacity - capacity % ALIGN
        self._free: list[tuple[int, int]] = [(0, self.capacity)]  # sorted (offset, size)
        self._held: dict[tuple, Slot] = {}
        self.high_water = 0
        self.in_use = 0  # bytes held

    @property
    def live(self) -> int:
        return len(self._held)

    def alloc(self, key: tuple, nbytes: int) -> Slot | None:
        if key in self._held:
            raise ValueError(f"staging slot {key} is already held")
        if nbytes > self.capacity:
            raise ValueError(f"a {nbytes}-byte unit can never fit the {self.capacity}-byte staging pool")
        size = max(ALIGN, -(-nbytes // ALIGN) * ALIGN)
        for i, (off, free) in enumerate(self._free):
            if free >= size:
                if free == size:
                    del self._free[i]
                else:
                    self._free[i] = (off + size, free - size)
                slot = Slot(key, off, size)
                self._held[key] = slot
                self.in_use += size
                self.high_water = max(self.high_water, self.in_use)
                return slot
        return None

    def free(self, key: tuple) -> None:
        slot = self._held.pop(key)
        self.in_use -= slot.nbytes
        off, size, free = slot.offset, slot.nbytes, self._free
        i = bisect.bisect_left(free, (off, 0))
        if i < len(free) and off + size == free[i][0]:  # coalesce with the next free range
            size += free.pop(i)[1]
        if i > 0 and free[i - 1][0] + free[i - 1][1] == off:  # and with the previous one
            i -= 1
            off, size = free[i][0], free[i][1] + size
            del free[i]
        free.insert(i, (off, size))

    def free_where(self, pred) -> int:
        """Free every held slot whose key satisfies `pred`; returns how many."""
        keys = [k for k in self._held if pred(k)]
        for k in keys:
            self.free(k)
        return len(keys)

    def held(self, key: tuple) -> Slot | None:
        return self._held.get(key)

    def rekey(self, key: tuple, new: tuple) -> Slot:
        """Hold `key`'s slot under `new` (its bytes unchanged): `key` may be allocated again."""
        if new in self._held:
            raise ValueError(f"staging slot {new} is already held")
        slot = self._held.pop(key)
        slot.key = new
        self._held[new] = slot
        return slot


class LeasedPool(StagingPool):
    """A `StagingPool` whose slots may carry a lease: a slot nobody released is freed when its lease
    expires (`expire`), so a reader that died never pins staging. `alloc_all` is all-or-none."""

    def __init__(self, capacity: int) -> None:
        super().__init__(capacity)
        self.leases: dict[tuple, float] = {}  # key -> monotonic deadline

    def alloc_all(self, keys: list[tuple], sizes: list[int], until: float | None = None) -> list[Slot] | None:
        """Every slot or none (None: not all fit now); `until` leases them."""
        if len(keys) != len(sizes):
            raise ValueError(f"alloc_all: {len(keys)} keys but {len(sizes)} sizes")
        got: list[Slot] = []
        complete = False
        try:
            for k, n in zip(keys, sizes):
                slot = self.alloc(k, n)
                if slot is None:
                    return None
                got.append(slot)
            complete = True
        finally:  # a slot that does not fit, or a key or size `alloc` refuses: nothing of `keys` stays held
            if not complete:
                for s in got:
                    self.free(s.key)
        if until is not None:
            self.leases.update((k, until) for k in keys)
        return got

    def lease(self, key: tuple, until: float) -> None:
        if key in self._held:
            self.leases[key] = until

    def free(self, key: tuple) -> None:
        super().free(key)
        self.leases.pop(key, None)

    def rekey(self, key: tuple, new: tuple) -> Slot:
        slot = super().rekey(key, new)
        if key in self.leases:
            self.leases[new] = self.leases.pop(key)
        return slot

    def release(self, key: tuple) -> bool:
        """Free `key` if it is held (a peer's notification may name a slot already freed)."""
        if key not in self._held:
            return False
        self.free(key)
        return True

    def expire(self, now: float) -> int:
        """Free every slot whose lease ended before `now`; returns how many."""
        keys = [k for k, t in self.leases.items() if t < now]
        for k in keys:
            self.free(k)
        return len(keys)
