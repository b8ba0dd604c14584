"""What the slot-copy kernel (`slot_copy.py`) reads, and its torch reference: numpy and torch only, so the
staging core imports it without triton.

A *slot* is one layer's page region of one block for one (prefill rank -> decode rank) pair; what to copy
inside it is a static *template* of tiles ``(page_rel, stage_rel, nbytes)``, built once per pair and kept
on the device (`TileTable`). Per launch only a small int64 array crosses to the device, one row per slot::

    (page_base, stage_base, tile_lo, tile_n, first)     # bytes, bytes, first tile, tile count, flat index

`first` is the slot's first program in the launch's flat grid (the tile counts' exclusive prefix sum), so
the grid has exactly one program per tile: a program finds its slot by binary search over `first`.
"""

from __future__ import annotations

import numpy as np
import torch

TILE_BYTES = 32 * 1024  # the most one program copies: large runs become many programs, the grid stays even
SLOT_COLUMNS = ("page_base", "stage_base", "tile_lo", "tile_n", "first")


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
    tile for the element-size choice, `mean_tile_bytes` for the launch configuration (kept as tiles are
    added, so a launch does not scan the table)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._host = np.zeros((0, 3), dtype=np.int64)
        self.tiles = torch.zeros((0, 3), dtype=torch.int64, device=device)
        self.lo: dict[object, int] = {}
        self.n: dict[object, int] = {}
        self.offset_gcd = 0
        self.length_gcd = 0
        self.mean_tile_bytes = 0

    @property
    def host(self) -> np.ndarray:
        return self._host

    def add(self, key: object, tiles: np.ndarray) -> tuple[int, int]:
        if key in self.lo:
            return self.lo[key], self.n[key]
        self.lo[key], self.n[key] = len(self._host), len(tiles)
        if len(tiles):
            self.offset_gcd = int(np.gcd.reduce(np.append(tiles[:, :2].reshape(-1), self.offset_gcd)))
            self.length_gcd = int(np.gcd.reduce(np.append(tiles[:, 2], self.length_gcd)))
            self._host = np.concatenate([self._host, tiles])
            self.mean_tile_bytes = int(self._host[:, 2].mean())
            self.tiles = torch.from_numpy(self._host.copy()).to(self.device)
        return self.lo[key], self.n[key]


def element_size(*gcds: int) -> tuple[int, int]:
    """(element bytes, alignment in elements) for offsets/lengths whose gcds are given (0 = no constraint)."""
    g = int(np.gcd.reduce(np.array([x for x in gcds if x] or [16], dtype=np.int64)))
    elem = next(e for e in (4, 2, 1) if g % e == 0)
    return elem, max(1, min(16, _lowbit(g)) // elem)


def with_first(rows: np.ndarray) -> tuple[np.ndarray, int]:
    """Slot rows with each slot's flat grid start in column 4 (appended to 4-column rows; filled in place in
    5-column ones, so a caller that builds them wide copies nothing), and the launch's program count."""
    if rows.shape[1] == 4:
        rows = np.concatenate([rows, np.zeros((len(rows), 1), dtype=np.int64)], axis=1)
    n = rows[:, 3]
    np.cumsum(n, out=rows[:, 4])
    rows[:, 4] -= n
    return rows, int(rows[-1, 4] + rows[-1, 3]) if len(rows) else 0


def copy_reference(page: torch.Tensor, stage: torch.Tensor, tiles: np.ndarray, slots: np.ndarray, pack: bool) -> None:
    """The kernel's meaning, one tile at a time (flat uint8 buffers; `slots` as the kernel reads them)."""
    for base_p, base_s, lo, n, _ in np.asarray(slots, dtype=np.int64).tolist():
        for rel_p, rel_s, nbytes in tiles[lo : lo + n].tolist():
            a, b = base_p + rel_p, base_s + rel_s
            if pack:
                stage[b : b + nbytes] = page[a : a + nbytes]
            else:
                page[a : a + nbytes] = stage[b : b + nbytes]
