"""Static slot templates: what one (prefill rank -> decode rank) pair copies of one layer of one block.

Everything that follows from (model, TP pair, block sizes, source, destination) is computed here once:

* the *state* template - the conv slices and SSM heads of one state layer (every state layer of a model
  shares one geometry, so one template serves them all);
* the *KV* templates - attention KV repeats with period `lcm(prefill block, decode block)` tokens; each
  (prefill block, decode block) intersection of one period is a template, with the block indices it
  touches and the token where it ends, so a request only chooses how many periods (and which prefix of
  the last one) it has.

A request is then a list of (template, layer, block) slots (`hybrid_kv.staging.chunk`); nothing here
depends on its token count, and `PlanCache` bounds how many pairs are kept.
"""

from __future__ import annotations

import itertools
import math
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from hybrid_kv.kernels.tiles import cut_tiles
from hybrid_kv.layout import RankLayout, cdiv
from hybrid_kv.plan import STAGING_ALIGN, Piece, TransferPlan

PIECE_COLUMNS = ("src_off", "dst_off", "rows", "row_bytes", "src_stride", "dst_stride", "stage_off")
MEMO_PAIRS = 256  # (TP pair, block sizes, source, destination) entries a PlanCache keeps
ALL = ("all", 0)


def _in_part(p: Piece, part: tuple) -> bool:
    kind, threshold = part
    if kind == "all":
        return True
    if kind not in ("small", "large"):
        raise ValueError(f"part={part!r} (accepted: ('all', 0), ('small', t), ('large', t))")
    return (p.src.row_bytes < threshold) == (kind == "small")


@dataclass(frozen=True, eq=False)
class SlotTemplate:
    """The pieces of one slot, laid end to end (16-byte aligned) in `stride` bytes of staging."""

    pieces: np.ndarray  # int64 [n, 7], PIECE_COLUMNS; offsets relative to the page / the slot
    tiles: np.ndarray  # int64 [t, 4]: src page rel, dst page rel, stage rel, nbytes
    runs: np.ndarray  # int64 [r, 3]: src page rel, dst page rel, nbytes of each contiguous run
    nbytes: int  # data bytes
    stride: int  # staging bytes of one slot

    @classmethod
    def of(cls, pieces: Sequence[Piece]) -> SlotTemplate:
        rows, pos = [], 0
        for p in pieces:
            pos = cdiv(pos, STAGING_ALIGN) * STAGING_ALIGN
            rows.append((p.src.offset, p.dst.offset, p.src.rows, p.src.row_bytes, p.src.stride, p.dst.stride, pos))
            pos += p.nbytes
        a = np.array(rows, dtype=np.int64).reshape(-1, len(PIECE_COLUMNS))
        src, dst, n, rb, ss, ds, st = a.T
        r = np.arange(int(n.sum()), dtype=np.int64) - np.repeat(np.cumsum(n) - n, n)
        run_src = np.repeat(src, n) + r * np.repeat(ss, n)
        run_dst = np.repeat(dst, n) + r * np.repeat(ds, n)
        run_stage = np.repeat(st, n) + r * np.repeat(rb, n)
        run_n = np.repeat(rb, n)
        # tiles of both sides cut identically: cut the (src, stage) runs and the (dst, stage) runs alike
        t_src = cut_tiles(run_src, run_stage, run_n)
        t_dst = cut_tiles(run_dst, run_stage, run_n)
        tiles = np.stack([t_src[:, 0], t_dst[:, 0], t_src[:, 1], t_src[:, 2]], axis=1)
        runs = np.stack([run_src, run_dst, run_n], axis=1).astype(np.int64)
        return cls(a, tiles, runs, int(rb @ n) if len(a) else 0, cdiv(pos, STAGING_ALIGN) * STAGING_ALIGN)

    def side_tiles(self, side: str) -> np.ndarray:
        """(page rel, stage rel, nbytes) of the side's page: the prefill page for packing, the decode
        page for scattering."""
        page = self.tiles[:, 0] if side == "prefill" else self.tiles[:, 1]
        return np.stack([page, self.tiles[:, 2], self.tiles[:, 3]], axis=1)

    def reach(self, side: str) -> int:
        """One past the last page byte this template touches on `side`."""
        if not len(self.pieces):
            return 0
        off, stride = (0, 4) if side == "prefill" else (1, 5)
        p = self.pieces
        return int((p[:, off] + (p[:, 2] - 1) * p[:, stride] + p[:, 3]).max())


@dataclass(frozen=True, eq=False)
class PairPlan:
    """All templates of one (prefill rank -> decode rank) pair. Template 0 is the state template when
    the pair moves state; the KV templates follow, one per intersection of a period."""

    src_rank: int
    dst_rank: int
    templates: tuple[SlotTemplate, ...]
    state: int | None  # index of the state template
    kv: np.ndarray  # int64 [k]: template index of each KV intersection, in token order
    kv_ib: np.ndarray  # prefill block of each intersection within its period
    kv_jb: np.ndarray  # decode block of each intersection within its period
    kv_end: np.ndarray  # token (within the period) where each intersection ends
    period: int  # tokens of one KV period
    blocks_per_period: tuple[int, int]  # (prefill, decode) blocks of a period
    state_layers: np.ndarray  # hybrid-kv layer indices of the state layers
    attention_layers: np.ndarray
    max_unit_bytes: int

    @property
    def strides(self) -> np.ndarray:
        return np.array([t.stride for t in self.templates], dtype=np.int64)

    @classmethod
    def build(
        cls,
        prefill: Sequence[RankLayout],
        decode: Sequence[RankLayout],
        src: int,
        dst: int,
        max_unit_bytes: int,
        *,
        kv: bool = True,
        part: tuple = ALL,
    ) -> PairPlan:
        """`kv=False`: state templates only (the vLLM connector leaves attention KV to the stock READ).
        `part`: ALL pieces, ("small", t) those whose runs are shorter than t bytes (packed by `auto`), or
        ("large", t) the others (read page to page; ("large", 0) is the strided baseline)."""
        spec = prefill[0].spec
        bs_p, bs_d = prefill[0].block_size, decode[0].block_size
        period = math.lcm(bs_p, bs_d) if spec.attention_layers and kv else 0
        plan = TransferPlan(list(prefill), list(decode), period, max_unit_bytes=1 << 62)
        mine = [p for p in plan.pairs.get((src, dst), []) if _in_part(p, part)]
        templates: list[SlotTemplate] = []
        state = None
        if spec.state_layers:
            first = spec.state_layers[0].index
            tpl = SlotTemplate.of([p for p in mine if p.layer == first])
            if tpl.nbytes:
                state = len(templates)
                templates.append(tpl)
        kv, ib, jb, end = [], [], [], []
        if period:
            first = spec.attention_layers[0].index
            cuts = sorted({0, period, *range(0, period, bs_p), *range(0, period, bs_d)})
            for t0, t1 in itertools.pairwise(cuts):
                i, j = t0 // bs_p, t0 // bs_d
                ps = [p for p in mine if p.layer == first and (p.src_block, p.dst_block) == (i, j)]
                tpl = SlotTemplate.of(ps)
                if tpl.nbytes:
                    kv.append(len(templates))
                    templates.append(tpl)
                    ib.append(i)
                    jb.append(j)
                    end.append(t1)
        biggest = max((t.stride for t in templates), default=0)
        if biggest > max_unit_bytes:
            raise ValueError(
                f"one layer's slot for prefill rank {src} -> decode rank {dst} is {biggest} B, more than the "
                f"transfer unit budget max_unit_bytes={max_unit_bytes}; use at least {biggest}"
            )
        i64 = lambda xs: np.array(xs, dtype=np.int64)
        return cls(
            src,
            dst,
            tuple(templates),
            state,
            i64(kv),
            i64(ib),
            i64(jb),
            i64(end),
            period,
            (period // bs_p, period // bs_d) if period else (0, 0),
            i64([layer.index for layer in spec.state_layers]),
            i64([layer.index for layer in spec.attention_layers] if period else []),
            max_unit_bytes,
        )


def layouts_of(
    spec, prefill_tp: int, decode_tp: int, conv_layout: str, kv_layout: str, block_sizes: tuple[int, int]
) -> tuple[list[RankLayout], list[RankLayout]]:
    pre = [RankLayout(spec, prefill_tp, r, conv_layout, kv_layout, block_sizes[0]) for r in range(prefill_tp)]
    dec = [RankLayout(spec, decode_tp, r, conv_layout, kv_layout, block_sizes[1]) for r in range(decode_tp)]
    return pre, dec


def trim_oldest(memo: dict, bound: int) -> None:
    """Drop `memo`'s oldest entries (insertion order) beyond `bound`: memos, and what a rank keeps of its
    peers' messages and requests, stay bounded whatever comes."""
    while len(memo) > bound:
        memo.pop(next(iter(memo)))


def lru_get(memo: OrderedDict, key: tuple, bound: int, build: Callable, valid: Callable = lambda hit: True):
    """`memo[key]`, built on a miss (or when `valid` rejects the hit), least recently used dropped beyond
    `bound` entries."""
    hit = memo.get(key)
    if hit is None or not valid(hit):
        hit = memo[key] = build()
        trim_oldest(memo, bound)
    else:
        memo.move_to_end(key)
    return hit


class Shapes:
    """`ChunkShape`s by key, least recently used dropped beyond `max_entries` (a shape is cheap to
    rebuild; the bound keeps a stream of distinct request lengths from growing memory)."""

    def __init__(self, max_entries: int = 512) -> None:
        self.max_entries = max_entries
        self._memo: OrderedDict[tuple, object] = OrderedDict()  # -> chunk.ChunkShape

    def __len__(self) -> int:
        return len(self._memo)

    def get(self, pair: PairPlan, pages, key: tuple, build: Callable):
        key = (id(pair), id(pages), *key)
        # the ids of dropped objects may be reused: a hit must hold these very objects
        return lru_get(self._memo, key, self.max_entries, build, lambda h: h.chunk.pair is pair and h.pages is pages)


class PlanCache:
    """`PairPlan`s and per-TP-pair source lists, built once, keyed by TP pair and block sizes (never by
    token count), least recently used dropped beyond `max_pairs` entries. `kv=False` builds state
    templates only."""

    def __init__(
        self,
        spec,
        conv_layout: str,
        kv_layout: str,
        max_unit_bytes: int,
        max_pairs: int = MEMO_PAIRS,
        *,
        kv: bool = True,
    ) -> None:
        self.spec, self.conv_layout, self.kv_layout, self.kv = spec, conv_layout, kv_layout, kv
        self.max_unit_bytes, self.max_pairs = max_unit_bytes, max_pairs
        self._pairs: OrderedDict[tuple, PairPlan] = OrderedDict()
        self._sources: OrderedDict[tuple, dict[int, list[int]]] = OrderedDict()
        self.shapes = Shapes()  # chunk shapes of these pairs (hybrid_kv.staging.chunk)

    def __len__(self) -> int:
        return len(self._pairs)

    def _layouts(self, prefill_tp: int, decode_tp: int, block_sizes: tuple[int, int]):
        return layouts_of(self.spec, prefill_tp, decode_tp, self.conv_layout, self.kv_layout, block_sizes)

    def sources(self, prefill_tp: int, decode_tp: int, block_sizes: tuple[int, int] = (16, 16)) -> dict:
        """decode rank -> the prefill ranks it reads from (refuses TP sizes the model cannot shard)."""

        def build() -> dict:
            pre, dec = self._layouts(prefill_tp, decode_tp, block_sizes)
            probe = TransferPlan(pre, dec, 1 if self.spec.attention_layers and self.kv else 0, max_unit_bytes=1 << 62)
            return {d: probe.sources_of(d) for d in range(decode_tp)}

        return lru_get(self._sources, (prefill_tp, decode_tp, *block_sizes), self.max_pairs, build)

    def pair(
        self,
        prefill_tp: int,
        decode_tp: int,
        src: int,
        dst: int,
        block_sizes: tuple[int, int] = (16, 16),
        part: tuple = ALL,
    ) -> PairPlan:
        def build() -> PairPlan:
            pre, dec = self._layouts(prefill_tp, decode_tp, block_sizes)
            return PairPlan.build(pre, dec, src, dst, self.max_unit_bytes, kv=self.kv, part=part)

        return lru_get(self._pairs, (prefill_tp, decode_tp, *block_sizes, src, dst, part), self.max_pairs, build)
