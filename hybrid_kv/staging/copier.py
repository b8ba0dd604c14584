"""Execute the chunks that are ready in one step: one launch per side, validated before any byte moves.

`Copier` binds one rank's backing buffer (with its `PageMap`) and its staging buffer. `run(jobs)` takes
(chunk, unit staging offsets) pairs - every request ready now, for every pair of this side - builds one
int64 row per slot (`hybrid_kv.kernels.tiles.SLOT_COLUMNS`), checks every staging range against the
buffer (pages were checked through their block ids), and copies:

* ``triton`` - one `slot_copy` launch for all jobs, on the copier's own CUDA stream; `run` returns a
  `Done` whose `ready()` polls the stream's event, so no caller blocks on the GPU;
* ``torch``  - the reference: one strided copy per piece per slot (CPU or GPU), complete on return.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

import numpy as np
import torch

from hybrid_kv.kernels.tiles import TileTable, element_size, with_first
from hybrid_kv.ops import as_bytes, resolve_backend
from hybrid_kv.staging.chunk import Chunk
from hybrid_kv.staging.pagemap import PageMap
from hybrid_kv.staging.template import PairPlan
from hybrid_kv.staging.upload import RowUpload

Job = tuple[Chunk, Sequence[int]]  # a chunk and the staging offset of each of its units
MAX_SHAPES = 1024  # template rows kept per copier (rebuilt after a clear: microseconds each)


class Done:
    """Completion of one `Copier.run`: `ready()` never blocks; `wait()` does (off the engine thread)."""

    def __init__(self, event=None) -> None:
        self._event = event

    def ready(self) -> bool:
        return self._event is None or self._event.query()

    def wait(self) -> None:
        if self._event is not None:
            self._event.synchronize()


class Copier:
    def __init__(
        self, storage: torch.Tensor, pages: PageMap, staging: torch.Tensor, side: str, backend: str | None = None
    ) -> None:
        if side not in ("prefill", "decode"):
            raise ValueError(f"side={side!r} (accepted: prefill, decode)")
        self.storage, self.staging = as_bytes(storage), as_bytes(staging)
        if self.storage.device != self.staging.device:
            raise ValueError(f"cache on {self.storage.device} but staging on {self.staging.device}")
        if pages.storage_bytes > self.storage.numel():
            raise ValueError(f"page map spans {pages.storage_bytes} B of a {self.storage.numel()}-byte buffer")
        self.pages, self.side = pages, side
        self.pack = side == "prefill"
        self.backend = resolve_backend(backend, self.storage.device)
        self.launches = 0
        self._lock = threading.Lock()  # the prefill side packs from one thread per decode connection
        self._pairs: dict[int, tuple[PairPlan, np.ndarray, np.ndarray]] = {}  # id -> (pair, lo, n)
        self._rows: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # id(tpl) -> (tpl, template rows)
        self._table = None
        self._stream = None
        self._upload: RowUpload | None = None
        self._elem: tuple[tuple[int, int], tuple[int, int]] | None = None  # (table gcds, element size)
        if self.backend == "triton":
            self._table = TileTable(self.storage.device)
            if self.storage.is_cuda:
                self._stream = torch.cuda.Stream(self.storage.device)
                self._upload = RowUpload(self.storage.device, self._stream)

    # ---- static, once per pair ----------------------------------------------------------------------------

    def register(self, pair: PairPlan) -> None:
        """Check the pair's templates against this side's pages and put their tiles on the device."""
        if id(pair) in self._pairs:
            return
        for t in pair.templates:
            if t.reach(self.side) > self.pages.page_bytes:
                raise ValueError(
                    f"a template of pair {pair.src_rank}->{pair.dst_rank} reaches byte {t.reach(self.side)} of a "
                    f"{self.pages.page_bytes}-byte {self.side} page"
                )
        lo = np.zeros(len(pair.templates), dtype=np.int64)
        n = np.zeros(len(pair.templates), dtype=np.int64)
        if self._stream is not None:  # adding tiles replaces the table's tensor: launches queued may read it
            self._table.tiles.record_stream(self._stream)
        if self._table is not None:
            for i, t in enumerate(pair.templates):
                lo[i], n[i] = self._table.add((id(pair), i), t.side_tiles(self.side))
        self._pairs[id(pair)] = (pair, lo, n)  # holds `pair`, so its id stays unique

    # ---- per step -------------------------------------------------------------------------------------------

    def _template_rows(self, chunk: Chunk) -> tuple[np.ndarray, int]:
        """(-, stage rel, tile lo, tile count, first program within the chunk) per slot and the chunk's
        program count, static per chunk shape: chunks of one shape share their `tpl` array, so it keys the
        memo (held, so its id stays unique)."""
        hit = self._rows.get(id(chunk.tpl))
        if hit is not None and hit[0] is chunk.tpl:
            return hit[1], hit[2]
        entry = self._pairs.get(id(chunk.pair))
        if entry is None:
            self.register(chunk.pair)
            entry = self._pairs[id(chunk.pair)]
        rows = np.stack([np.zeros_like(chunk.rel), chunk.rel, entry[1][chunk.tpl], entry[2][chunk.tpl]], axis=1)
        rows, programs = with_first(rows)
        if len(self._rows) >= MAX_SHAPES:
            self._rows.clear()
        self._rows[id(chunk.tpl)] = (chunk.tpl, rows, programs)
        return rows, programs

    def slot_rows(self, jobs: Sequence[Job]) -> tuple[np.ndarray, int]:
        """The launch's slot rows for `jobs`, each with its first program (`tiles.with_first`), and the
        program count. Every unit's staging range is checked against the staging buffer (a slot lies inside
        its unit by construction, and its page was checked through its block id), so nothing here is
        proportional to the bytes or pieces moved."""
        size = self.staging.numel()
        picked, total, programs = [], 0, 0
        for chunk, offsets in jobs:
            if len(offsets) != len(chunk.units):
                raise ValueError(f"{len(offsets)} unit offsets for a chunk of {len(chunk.units)} units")
            for off, (a, b) in zip(offsets, chunk.units.tolist()):
                if off < 0 or off + b - a > size:
                    raise ValueError(f"staging range [{off}, {off + b - a}) outside the {size}-byte staging buffer")
            tpl, n = self._template_rows(chunk)
            picked.append((tpl, n, chunk, offsets))
            total += len(tpl)
        out = np.empty((total, 5), dtype=np.int64)  # no concatenation, no running sum per launch
        i = 0
        for tpl, n, chunk, offsets in picked:
            j = i + len(tpl)
            out[i:j] = tpl
            out[i:j, 0] = chunk.page
            if programs:
                out[i:j, 4] += programs  # the chunk's programs follow the jobs' before it
            programs += n
            if len(offsets) == 1:
                out[i:j, 1] += offsets[0]
            else:
                out[i:j, 1] += np.asarray(offsets, dtype=np.int64)[chunk.unit_of]
            i = j
        return out, programs

    def run(self, jobs: Sequence[Job], after: Sequence = ()) -> Done:
        """Copy every slot of `jobs` in one launch; nothing is written unless every job is valid. `after`:
        CUDA events the copy is ordered behind (the model step that wrote the pages, recorded on the engine
        thread's stream: from any other thread, the current stream is not the one the model ran on)."""
        with self._lock:
            return self._run(jobs, [e for e in after if e is not None])

    def _run(self, jobs: Sequence[Job], after: list) -> Done:
        rows, programs = self.slot_rows(jobs)
        if not len(rows):
            return Done()
        self.launches += 1
        if self._table is None:
            if after and self.storage.is_cuda:
                for ev in after:
                    torch.cuda.current_stream(self.storage.device).wait_event(ev)
            self._run_torch(jobs, rows)
            return Done()
        from hybrid_kv.kernels.slot_copy import launch

        elem, align = self._element_size()
        if self._stream is None:
            launch(self.storage, self.staging, self._table, torch.from_numpy(rows), programs,
                   pack=self.pack, elem=elem, align=align)  # fmt: skip
            return Done()
        self._stream.wait_stream(torch.cuda.current_stream(self.storage.device))  # pages written by the model
        for ev in after:
            self._stream.wait_event(ev)
        with torch.cuda.stream(self._stream):
            dev_rows = self._upload(rows)  # no allocation per launch (staging/upload.py)
            launch(self.storage, self.staging, self._table, dev_rows, programs, pack=self.pack, elem=elem, align=align)
            event = torch.cuda.Event()
            event.record(self._stream)
        return Done(event)

    def _element_size(self) -> tuple[int, int]:
        """`tiles.element_size` of this copier's buffers and tiles, recomputed only when tiles were added."""
        key = (self._table.offset_gcd, self._table.length_gcd)
        if self._elem is None or self._elem[0] != key:
            size = element_size(
                *key,
                self.pages.gcd,
                16,
                self.storage.data_ptr(),
                self.staging.data_ptr(),
                self.storage.numel(),
                self.staging.numel(),
            )
            self._elem = (key, size)
        return self._elem[1]

    def _run_torch(self, jobs: Sequence[Job], rows: np.ndarray) -> None:
        s, d = self.storage, self.staging
        i = 0
        for chunk, _ in jobs:
            temps = chunk.pair.templates
            for t in chunk.tpl.tolist():
                page, stage = int(rows[i, 0]), int(rows[i, 1])
                i += 1
                for src, dst, nrows, rb, ss, ds, st in temps[t].pieces.tolist():
                    p_off, p_stride = (src, ss) if self.pack else (dst, ds)
                    a = s.as_strided((nrows, rb), (p_stride, 1), page + p_off)
                    b = d.as_strided((nrows, rb), (rb, 1), stage + st)
                    (b if self.pack else a).copy_(a if self.pack else b)
