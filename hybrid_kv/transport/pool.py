"""Bounded staging pool: variable-size slots carved first-fit out of one registered buffer.

A slot is never handed out twice while held; freed neighbours coalesce. The pool does not wait:
`alloc` returns None when nothing fits, and the endpoint's event loop queues the request and retries
when a slot is freed (bounded by its own deadline), so a full pool delays work and never overwrites.
"""

from __future__ import annotations

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

    @property
    def in_use(self) -> int:
        return sum(s.nbytes for s in self._held.values())

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
                self.high_water = max(self.high_water, self.in_use)
                return slot
        return None

    def free(self, key: tuple) -> None:
        slot = self._held.pop(key)
        self._free.append((slot.offset, slot.nbytes))
        self._free.sort()
        merged: list[tuple[int, int]] = []
        for off, size in self._free:
            if merged and merged[-1][0] + merged[-1][1] == off:
                merged[-1] = (merged[-1][0], merged[-1][1] + size)
            else:
                merged.append((off, size))
        self._free = merged

    def free_where(self, pred) -> int:
        """Free every held slot whose key satisfies `pred`; returns how many."""
        keys = [k for k in self._held if pred(k)]
        for k in keys:
            self.free(k)
        return len(keys)

    def held(self, key: tuple) -> Slot | None:
        return self._held.get(key)
