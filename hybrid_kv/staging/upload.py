"""Slot rows to the device without an allocation per launch.

Each launch's rows (a few KiB) go host -> device on the copier's stream. Allocating a pinned tensor and a
device tensor per launch (and recording the stream on them) cost more host time than building the rows.
`RowUpload` keeps a few pinned host buffers and one device buffer:

* a host buffer is rewritten only after the copy out of it completed (its event); if every buffer is
  still being read (the stream is behind, e.g. waiting for the model's step), that launch takes a one-off
  pinned tensor instead: the caller never waits;
* the device buffer is reused in stream order: the next launch's copy into it is queued after the
  kernel that reads it, on the same stream.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from hybrid_kv.kernels.tiles import SLOT_COLUMNS

COLUMNS = len(SLOT_COLUMNS)


class RowUpload:
    def __init__(
        self,
        device: torch.device,
        stream,
        buffers: int = 4,
        rows: int = 1024,
        pin: bool = True,
        event: Callable[[], object] | None = None,
    ) -> None:
        """`stream`: where the copies run (current while `__call__` runs); `event()`: a new event with
        `record(stream)` and `query()` (default torch.cuda.Event); `pin`: page-locked host buffers."""
        self.device, self.stream, self._pin = device, stream, pin
        make = event or torch.cuda.Event
        self._host = [self._alloc_host(rows) for _ in range(buffers)]
        self._events = [make() for _ in range(buffers)]  # one never recorded queries done
        self._next = 0
        self._dev = torch.empty((rows, COLUMNS), dtype=torch.int64, device=device)
        self.fallbacks = 0  # launches that found every host buffer still being read

    def _alloc_host(self, rows: int) -> tuple[torch.Tensor, np.ndarray]:
        t = torch.empty((rows, COLUMNS), dtype=torch.int64, pin_memory=self._pin)
        return t, t.numpy()

    def __call__(self, rows: np.ndarray) -> torch.Tensor:
        """The device copy of `rows` (int64 [n, 5]), queued on `stream` (which must be current)."""
        n = len(rows)
        if n > len(self._dev):
            if self._dev.is_cuda:
                self._dev.record_stream(self.stream)  # kernels queued on the stream may still read it
            self._dev = torch.empty((max(n, 2 * len(self._dev)), COLUMNS), dtype=torch.int64, device=self.device)
        dev = self._dev[:n]
        i = self._next
        if not self._events[i].query():
            self.fallbacks += 1
            one_off = torch.from_numpy(np.ascontiguousarray(rows, dtype=np.int64))
            dev.copy_(one_off.pin_memory() if self._pin else one_off, non_blocking=True)
            return dev
        self._next = (i + 1) % len(self._host)
        if n > len(self._host[i][0]):
            self._host[i] = self._alloc_host(max(n, 2 * len(self._host[i][0])))
        host, view = self._host[i]
        view[:n] = rows
        dev.copy_(host[:n], non_blocking=True)
        self._events[i].record(self.stream)
        return dev
