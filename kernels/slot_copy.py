"""Slot copy: one launch packs (or scatters) every slot of every request that is ready in one step.

The tables it reads (slot rows, the tile table) and its torch reference are in `tiles.py`. The grid is flat:
one program per tile of the launch, so no program idles behind a slot with fewer tiles than the largest
(a grid of slots x the largest slot's tile count left most programs of a conv-heavy step empty). Program
`t` finds its slot by binary search over the slots' first program, then copies tile `tile_lo + t - first`
between ``page_base + page_rel`` and ``stage_base + stage_rel``, in the direction `PACK` selects, in
steps of two blocks whose loads are both issued before either store. The loop runs to the tile's own
length, not to the largest tile's.

Buffers are viewed with the widest element (4, 2 or 1 bytes) that divides every static offset, length and
base (the caller computes it once per table and page map); offsets are hinted as multiples of 16 bytes
where they are, so the compiler can emit 16-byte accesses. No autotuning: a trial launch would write into
live pages. Block and warp sizes come from the hand-set `CONFIGS` by the table's mean tile length (set
without a GPU in this issue's session; see bench/RESULTS.md for what was measured where).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from hybrid_kv.kernels.tiles import TileTable

# (mean tile bytes up to, block bytes, warps): small tiles (conv slices, a few KiB) take fewer threads so a
# program is not mostly masked; large ones (SSM slices, attention blocks) 4 KiB steps with 4 warps.
CONFIGS = ((4096, 1024, 2), (1 << 62, 4096, 4))


# The slot count and search depth change every step: specializing on them (Triton folds an int equal to 1 and
# hints one divisible by 16) would compile a new variant, tens of ms, in the serving path the first time a
# step hits such a count.
@triton.jit(do_not_specialize=["n_slots", "steps"])
def _slot_copy_kernel(
    page_ptr,
    stage_ptr,
    tiles_ptr,  # int64 [n_tiles, 3]: page_rel, stage_rel, nbytes
    slots_ptr,  # int64 [n_slots, 5]: page_base, stage_base, tile_lo, tile_n, first (bytes / tile indices)
    n_slots,
    steps,  # binary-search steps: ceil(log2(n_slots))
    PACK: tl.constexpr,  # page -> stage (gather) if true, stage -> page (scatter) otherwise
    ELEM: tl.constexpr,  # element bytes of the buffer views
    BLOCK: tl.constexpr,  # elements per load
    ALIGN: tl.constexpr,  # every offset is a multiple of ALIGN elements
):
    t = tl.program_id(0).to(tl.int64)
    lo = t - t
    hi = lo + n_slots
    for _ in range(steps):  # the last slot whose first program is <= t (empty slots are skipped over)
        mid = (lo + hi) // 2
        take = tl.load(slots_ptr + mid * 5 + 4) <= t
        lo = tl.where(take, mid, lo)
        hi = tl.where(take, hi, mid)
    row = slots_ptr + lo * 5
    k = tl.load(row + 2) + t - tl.load(row + 4)
    page_off = tl.multiple_of((tl.load(row) + tl.load(tiles_ptr + k * 3)) // ELEM, ALIGN)
    stage_off = tl.multiple_of((tl.load(row + 1) + tl.load(tiles_ptr + k * 3 + 1)) // ELEM, ALIGN)
    n = tl.load(tiles_ptr + k * 3 + 2) // ELEM
    if PACK:
        src = page_ptr + page_off
        dst = stage_ptr + stage_off
    else:
        src = stage_ptr + stage_off
        dst = page_ptr + page_off
    for start in tl.range(0, n, 2 * BLOCK):
        o0 = start + tl.arange(0, BLOCK).to(tl.int64)
        o1 = o0 + BLOCK
        m0 = o0 < n
        m1 = o1 < n
        x0 = tl.load(src + o0, mask=m0)
        x1 = tl.load(src + o1, mask=m1)
        tl.store(dst + o0, x0, mask=m0)
        tl.store(dst + o1, x1, mask=m1)


def config(table: TileTable) -> tuple[int, int]:
    """(block bytes, warps) for a table, from `CONFIGS` by its mean tile length."""
    return next((b, w) for up_to, b, w in CONFIGS if table.mean_tile_bytes <= up_to)


def launch(
    page: torch.Tensor,
    stage: torch.Tensor,
    table: TileTable,
    slots: torch.Tensor,
    programs: int,
    *,
    pack: bool,
    elem: int,
    align: int,
) -> None:
    """Run one slot-copy launch; `slots` (int64 [n, 5] with `first`, on the device) was validated by the
    caller, `programs` is its tile count (`tiles.with_first`)."""
    if len(slots) == 0 or programs == 0:
        return
    block, warps = config(table)
    view = {4: torch.int32, 2: torch.int16, 1: torch.uint8}[elem]
    _slot_copy_kernel[(programs,)](
        page_ptr=page.view(view),
        stage_ptr=stage.view(view),
        tiles_ptr=table.tiles,
        slots_ptr=slots,
        n_slots=len(slots),
        steps=(len(slots) - 1).bit_length(),
        PACK=pack,
        ELEM=elem,
        BLOCK=block // elem,
        ALIGN=align,
        num_warps=warps,
    )
