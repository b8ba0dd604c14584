"""Batched byte-range copy: one launch executes a whole segment table (pack *and* unpack).

The table's rows are `(src_off, dst_off, rows, row_bytes, src_stride, dst_stride)` (`hybrid_kv.batch`).
This module is a leaf: torch, numpy and triton only.
The launcher cuts every row of every segment into tiles of at most `TILE_BYTES`, so a 1 MiB SSM slice
becomes many programs and a 1.5 KiB conv slice one: the grid stays balanced whatever the mix. Each
program copies one tile. Buffers are viewed with the widest element (int32 / int16 / uint8) that divides
every offset, size and base address, and offsets are hinted as multiples of 16 bytes where they are, so
the compiler emits 16-byte accesses.

No autotuning: trial launches would write into live cache pages. The tile and block sizes are a small
hand-set table (`_CONFIG`): 32 KiB tiles in 4 KiB steps with 4 warps keep 128 threads x 16-byte
accesses in flight per step while a tile stays small enough for the balance above.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import triton
import triton.language as tl
from hybrid_kv.kernels.slot_copy import cut_tiles

TILE_BYTES = 32 * 1024
BLOCK_BYTES = 4 * 1024
NUM_WARPS = 4


@triton.jit
def _segment_copy_kernel(
    # pointers
    src_ptr,
    dst_ptr,
    tiles_ptr,  # int64 [n_tiles, 3]: src offset, dst offset, length (all in elements)
    # meta-parameters
    TILE: tl.constexpr,  # elements per tile (upper bound of length)
    BLOCK: tl.constexpr,  # elements per step
    ALIGN: tl.constexpr,  # offsets are multiples of ALIGN elements (16 bytes when possible)
):
    t = tl.program_id(0).to(tl.int64)
    src_off = tl.load(tiles_ptr + t * 3)
    dst_off = tl.load(tiles_ptr + t * 3 + 1)
    n = tl.load(tiles_ptr + t * 3 + 2)
    src_off = tl.multiple_of(src_off, ALIGN)
    dst_off = tl.multiple_of(dst_off, ALIGN)
    for start in tl.static_range(0, TILE, BLOCK):
        offs = start + tl.arange(0, BLOCK).to(tl.int64)
        mask = offs < n
        x = tl.load(src_ptr + src_off + offs, mask=mask)
        tl.store(dst_ptr + dst_off + offs, x, mask=mask)


def expand_tiles(table: np.ndarray, tile_bytes: int = TILE_BYTES) -> np.ndarray:
    """(src, dst, nbytes) per tile: every row of every segment, cut into pieces of <= tile_bytes."""
    t = np.asarray(table, dtype=np.int64).reshape(-1, 6)
    s0, d0, reps, rb, ss, ds = t.T
    r = np.arange(int(reps.sum()), dtype=np.int64) - np.repeat(np.cumsum(reps) - reps, reps)
    src, dst, n = (
        np.repeat(s0, reps) + r * np.repeat(ss, reps),
        np.repeat(d0, reps) + r * np.repeat(ds, reps),
        np.repeat(rb, reps),
    )
    return cut_tiles(src, dst, n, tile_bytes)


def _element(src: torch.Tensor, dst: torch.Tensor, tiles: np.ndarray) -> int:
    """Widest element size (4, 2, 1 bytes) dividing every offset, length, base address and buffer size."""
    g = int(np.gcd.reduce(tiles.reshape(-1))) if tiles.size else 1
    for x in (src.data_ptr(), dst.data_ptr(), src.numel(), dst.numel()):
        g = int(np.gcd(g, x))
    for e in (4, 2):
        if g % e == 0:
            return e
    return 1


@dataclass(frozen=True)
class TritonLaunch:
    """A segment table turned into device tiles for one (src, dst) buffer pair: built once, launched often."""

    tiles: torch.Tensor  # int64 [n, 3] on the device, in elements
    elem: int  # element bytes (4, 2, 1)
    align: int  # offsets are multiples of this many elements

    def __call__(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        if len(self.tiles) == 0:
            return
        view = {4: torch.int32, 2: torch.int16, 1: torch.uint8}[self.elem]
        _segment_copy_kernel[(len(self.tiles),)](
            src_ptr=src.view(view),
            dst_ptr=dst.view(view),
            tiles_ptr=self.tiles,
            TILE=TILE_BYTES // self.elem,
            BLOCK=BLOCK_BYTES // self.elem,
            ALIGN=self.align,
            num_warps=NUM_WARPS,
        )


def prepare_triton(src: torch.Tensor, dst: torch.Tensor, table: np.ndarray) -> TritonLaunch:
    """Tile `table` (validated by the caller) for `src` -> `dst` (flat uint8 buffers on one device)."""
    tiles = expand_tiles(table)
    if len(tiles) == 0:
        return TritonLaunch(torch.zeros((0, 3), dtype=torch.int64, device=dst.device), 1, 1)
    e = _element(src, dst, tiles)
    g = int(np.gcd.reduce(tiles[:, :2].reshape(-1)))
    align = max(1, min(16, (g & -g) if g else 16) // e)  # largest power-of-two byte alignment, in elements
    return TritonLaunch(torch.from_numpy(tiles // e).to(dst.device), e, align)
