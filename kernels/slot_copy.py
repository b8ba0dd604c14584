"""Slot copy: one launch packs (or scatters) every slot of every request that is ready in one step.

A *slot* is one layer's page region of one block for one (prefill rank -> decode rank) pair; what to copy
inside it is a static *template* of tiles ``(page_rel, stage_rel, nbytes)``, built once per pair and kept
on the device (`TileTable`). Per request only a small int64 array crosses to the device, one row per slot::

    (page_base, stage_base, tile_lo, tile_n)      # bytes, bytes, first tile, tile count

and the kernel computes every address itself: program (s, t) copies tile `tile_lo + t` of slot `s`
between ``page_base + page_rel`` and ``stage_base + stage_rel``, in the direction `PACK` selects.

Buffers are viewed with the widest element (4, 2 or 1 bytes) that divides every static offset, length and
base (the caller computes it once per table and page map); offsets are hinted as multiples of 16 bytes
where they are. This module is a leaf: torch, numpy and triton only.
"""

from __future__ import annotations

import numpy as np
import torch
import triton
import triton.language as tl

TILE_BYTES = 32 * 1024
BLOCK_BYTES = 4 * 1024
NUM_WARPS = 4
MAX_TILES_PER_SLOT = 65535  # grid axis 1 limit
SLOT_COLUMNS = ("page_base", "stage_base", "tile_lo", "tile_n")


@triton.jit
def _slot_copy_kernel(
    page_ptr,
    stage_ptr,
    tiles_ptr,  # int64 [n_tiles, 3]: page_rel, stage_rel, nbytes
    slots_ptr,  # int64 [n_slots, 4]: page_base, stage_base, tile_lo, tile_n (bytes / tile indices)
    PACK: tl.constexpr,  # page -> stage (gather) if true, stage -> page (scatter) otherwise
    ELEM: tl.constexpr,  # element bytes of the buffer views
    TILE: tl.constexpr,  # elements per tile (upper bound of a tile's length)
    BLOCK: tl.constexpr,  # elements per step
    ALIGN: tl.constexpr,  # every offset is a multiple of ALIGN elements
):
    s = tl.program_id(0).to(tl.int64)
    t = tl.program_id(1).to(tl.int64)
    n_tiles = tl.load(slots_ptr + s * 4 + 3)
    if t < n_tiles:
        k = tl.load(slots_ptr + s * 4 + 2) + t
        page_off = (tl.load(slots_ptr + s * 4) + tl.load(tiles_ptr + k * 3)) // ELEM
        stage_off = (tl.load(slots_ptr + s * 4 + 1) + tl.load(tiles_ptr + k * 3 + 1)) // ELEM
        n = tl.load(tiles_ptr + k * 3 + 2) // ELEM
        page_off = tl.multiple_of(page_off, ALIGN)
        stage_off = tl.multiple_of(stage_off, ALIGN)
        for start in tl.static_range(0, TILE, BLOCK):
            offs = start + tl.arange(0, BLOCK).to(tl.int64)
            mask = offs < n
            if PACK:
                x = tl.load(page_ptr + page_off + offs, mask=mask)
                tl.store(stage_ptr + stage_off + offs, x, mask=mask)
            else:
                x = tl.load(stage_ptr + stage_off + offs, mask=mask)
                tl.store(page_ptr + page_off + offs, x, mask=mask)


def cut_tiles(a: np.ndarray, b: np.ndarray, nbytes: np.ndarray, tile_bytes: int = TILE_BYTES) -> np.ndarray:
    """Runs (a offset, b offset, nbytes) cut into tiles of at most `tile_bytes`: int64 [n, 3]."""
    keep = nbytes > 0
    a, b, nbytes = a[keep], b[keep], nbytes[keep]
    k = -(-nbytes // tile_bytes)
    c = np.arange(int(k.sum()), dtype=np.int64) - np.repeat(np.cumsum(k) - k, k)
    n_rep = np.repeat(nbytes, k)
    return np.stack(
        [
            np.repeat(a, k) + c * tile_bytes,
            np.repeat(b, k) + c * tile_bytes,
            np.minimum(tile_bytes, n_rep - c * tile_bytes),
        ],
        axis=1,
    ).astype(np.int64)


def _lowbit(g: int) -> int:
    return g & -g if g else 1 << 20


class TileTable:
    """Every template of one side's pairs, on one device: appended on first use (warm-up), never rebuilt
    per request. `lo[key]`/`n[key]` locate a template's tiles; `offset_gcd`/`length_gcd` summarize every
    tile for the element-size choice."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._host = np.zeros((0, 3), dtype=np.int64)
        self.tiles = torch.zeros((0, 3), dtype=torch.int64, device=device)
        self.lo: dict[object, int] = {}
        self.n: dict[object, int] = {}
        self.offset_gcd = 0
        self.length_gcd = 0

    def add(self, key: object, tiles: np.ndarray) -> tuple[int, int]:
        if key in self.lo:
            return self.lo[key], self.n[key]
        if len(tiles) > MAX_TILES_PER_SLOT:
            raise ValueError(f"a slot of {len(tiles)} tiles exceeds the kernel's {MAX_TILES_PER_SLOT}")
        self.lo[key], self.n[key] = len(self._host), len(tiles)
        if len(tiles):
            self.offset_gcd = int(np.gcd.reduce(np.append(tiles[:, :2].reshape(-1), self.offset_gcd)))
            self.length_gcd = int(np.gcd.reduce(np.append(tiles[:, 2], self.length_gcd)))
            self._host = np.concatenate([self._host, tiles])
            self.tiles = torch.from_numpy(self._host.copy()).to(self.device)
        return self.lo[key], self.n[key]


def element_size(*gcds: int) -> tuple[int, int]:
    """(element bytes, alignment in elements) for offsets/lengths whose gcds are given (0 = no constraint)."""
    g = int(np.gcd.reduce(np.array([x for x in gcds if x] or [16], dtype=np.int64)))
    elem = next(e for e in (4, 2, 1) if g % e == 0)
    return elem, max(1, min(16, _lowbit(g)) // elem)


def launch(
    page: torch.Tensor,
    stage: torch.Tensor,
    table: TileTable,
    slots: torch.Tensor,
    max_tiles: int,
    *,
    pack: bool,
    elem: int,
    align: int,
) -> None:
    """Run one slot-copy launch; `slots` (int64 [n, 4], on the device) was validated by the caller."""
    if len(slots) == 0 or max_tiles == 0:
        return
    view = {4: torch.int32, 2: torch.int16, 1: torch.uint8}[elem]
    _slot_copy_kernel[(len(slots), max_tiles)](
        page_ptr=page.view(view),
        stage_ptr=stage.view(view),
        tiles_ptr=table.tiles,
        slots_ptr=slots,
        PACK=pack,
        ELEM=elem,
        TILE=TILE_BYTES // elem,
        BLOCK=BLOCK_BYTES // elem,
        ALIGN=align,
        num_warps=NUM_WARPS,
    )
