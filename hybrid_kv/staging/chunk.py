"""One request's chunk for one (prefill rank -> decode rank) pair, on one side.

A chunk is the request's slots laid end to end: slot `i` uses template `tpl[i]`, sits at `page[i]` in
this side's backing buffer and at `stage[i]` in the chunk. Transfer units (one descriptor each) are runs
of whole slots; each gets its own staging slot, so `slot_bases(unit_offsets)` gives every slot's
absolute staging offset for the kernel. Both sides build the same chunk from the same block-id lists,
so their staging layouts agree byte for byte without exchanging offsets.

Two request forms, both shells' (`flat_chunk`: the CLI's flat caches, a token count and one state block;
`state_chunk`: a serving engine's block ids per group on its `StateGeometry`), share the shapes below.
Per request only block ids are new: everything else of a chunk (templates, stage offsets, units, which
block id each slot uses) is a `ChunkShape`, built once per (pair, page map, side, slot structure) and
kept in a bounded LRU (`Shapes`), so a request costs a handful of array operations.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from hybrid_kv.plan import copied_tokens
from hybrid_kv.staging.pagemap import PageMap
from hybrid_kv.staging.template import PairPlan, Shapes

_EMPTY = np.zeros(0, dtype=np.int64)


@dataclass(frozen=True, eq=False)
class Chunk:
    pair: PairPlan
    tpl: np.ndarray  # [S] template index
    page: np.ndarray  # [S] page byte offset in this side's buffer (-1 where this side is not known)
    stage: np.ndarray  # [S] byte offset in the chunk
    unit_of: np.ndarray  # [S] transfer unit of each slot
    units: np.ndarray  # [U, 2] (start, stop) byte ranges of the chunk
    rel: np.ndarray = field(default=None)  # [S] stage - start of the slot's unit (derived when None)

    def __post_init__(self) -> None:
        if self.rel is None:
            rel = self.stage - self.units[self.unit_of, 0] if len(self.units) else self.stage
            object.__setattr__(self, "rel", rel)

    @property
    def nbytes(self) -> int:
        return int(self.units[-1, 1]) if len(self.units) else 0

    @property
    def unit_bytes(self) -> list[int]:
        """Bytes of each transfer unit (built once per chunk: the host path asks for it several times; a
        shared list, not to be changed). Memoized by hand: `functools.cached_property` takes a lock."""
        got = self.__dict__.get("_unit_bytes")
        if got is None:
            got = (self.units[:, 1] - self.units[:, 0]).tolist()
            object.__setattr__(self, "_unit_bytes", got)
        return got

    def unit(self, u: int) -> Chunk:
        """The slots of transfer unit `u` alone (packed or scattered when that unit's slot is known)."""
        if len(self.units) == 1 and u == 0:
            return self
        keep = self.unit_of == u
        n = int(keep.sum())
        return Chunk(
            self.pair, self.tpl[keep], self.page[keep], self.stage[keep], np.zeros(n, np.int64), self.units[u : u + 1]
        )

    def slot_bases(self, unit_offsets: Sequence[int] | np.ndarray) -> np.ndarray:
        """Absolute staging offset of every slot, given each unit's staging slot offset."""
        if len(unit_offsets) != len(self.units):
            raise ValueError(f"{len(unit_offsets)} unit offsets for a chunk of {len(self.units)} units")
        if len(self.units) == 1:
            return self.rel + int(unit_offsets[0])
        return np.asarray(unit_offsets, dtype=np.int64)[self.unit_of] + self.rel


def copy_jobs(parts) -> list[tuple[Chunk, list[int]]]:
    """The copier's jobs for units of chunks at their staging slots, `parts` = [(chunk, {unit: slot offset})]:
    a chunk whose every unit is there is one job (its slots whole), else one job per unit (packed or
    scattered as its own slot comes: units stream)."""
    jobs = []
    for chunk, got in parts:
        if len(got) == len(chunk.units):
            jobs.append((chunk, [got[u] for u in range(len(chunk.units))]))
        else:
            jobs += [(chunk.unit(u), [o]) for u, o in got.items()]
    return jobs


def make_chunk(pair: PairPlan, tpl: np.ndarray, page: np.ndarray) -> Chunk:
    """Lay the slots out and cut them into units of at most the pair's unit budget.

    Unit k holds the slots whose chunk offset falls in [k*H, (k+1)*H) with H = budget - largest stride + 1,
    so a unit never exceeds the budget (its last slot starts before (k+1)*H and is at most the largest
    stride long), and the cut is the same vectorized arithmetic on both sides."""
    strides = pair.strides[tpl] if len(tpl) else _EMPTY
    stage = np.cumsum(strides) - strides
    if not len(tpl):
        return Chunk(pair, tpl, page, stage, _EMPTY, np.zeros((0, 2), dtype=np.int64))
    h = pair.max_unit_bytes - int(strides.max()) + 1
    bucket = stage // h
    first = np.flatnonzero(np.r_[True, bucket[1:] != bucket[:-1]])
    unit_of = np.cumsum(np.r_[False, bucket[1:] != bucket[:-1]]).astype(np.int64)
    last = np.r_[first[1:] - 1, len(tpl) - 1]
    units = np.stack([stage[first], stage[last] + strides[last]], axis=1)
    return Chunk(pair, tpl, page, stage, unit_of, units)


def flat_slots(
    pair: PairPlan, side: str, tokens: int, state_block: int | None, kv_blocks: Sequence[int], block_sizes
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(template, layer, block) of every slot of a request in the CLI's flat caches: every state layer's
    state block, then every attention layer's KV intersections, in token order.

    `block_sizes` are the two sides' layout block sizes (tokens per KV page); `kv_blocks` are this side's."""
    tpl, layer, block = [], [], []
    if pair.state is not None and len(pair.state_layers):
        if state_block is None:
            raise ValueError(f"{side}: the model has state layers but no state block id was given")
        n = len(pair.state_layers)
        tpl.append(np.full(n, pair.state, dtype=np.int64))
        layer.append(pair.state_layers)
        block.append(np.full(n, state_block, dtype=np.int64))
    if len(pair.kv) and len(pair.attention_layers):
        end = copied_tokens(tokens, *block_sizes)
        full, rem = divmod(end, pair.period)
        k_last = int(np.searchsorted(pair.kv_end, rem, side="right")) if rem else 0
        types = np.concatenate([np.tile(np.arange(len(pair.kv)), full), np.arange(k_last)]).astype(np.int64)
        period = np.concatenate([np.repeat(np.arange(full), len(pair.kv)), np.full(k_last, full)]).astype(np.int64)
        per = pair.blocks_per_period[0 if side == "prefill" else 1]
        idx = period * per + (pair.kv_ib if side == "prefill" else pair.kv_jb)[types]
        kv = np.asarray(kv_blocks, dtype=np.int64)
        if len(idx) and int(idx.max()) >= len(kv):
            raise ValueError(f"{side}: {len(kv)} kv block ids for {tokens} tokens (need {int(idx.max()) + 1})")
        n_attn = len(pair.attention_layers)
        tpl.append(np.tile(pair.kv[types], n_attn))
        layer.append(np.repeat(pair.attention_layers, len(types)))
        block.append(np.tile(kv[idx], n_attn))
    cat = lambda xs: np.concatenate(xs).astype(np.int64) if xs else _EMPTY
    return cat(tpl), cat(layer), cat(block)


def direct_runs(prefill: Chunk, decode: Chunk) -> np.ndarray:
    """(prefill offset, decode offset, nbytes) of every contiguous run of a request's pair, page to page:
    one NIXL descriptor each (the strided baseline, and the large pieces of `auto`)."""
    if not np.array_equal(prefill.tpl, decode.tpl):
        raise ValueError("prefill and decode chunks of one pair must have the same slots")
    temps = prefill.pair.templates
    if not len(prefill.tpl):
        return np.zeros((0, 3), dtype=np.int64)
    runs = [temps[t].runs for t in range(len(temps))]
    count = np.array([len(r) for r in runs], dtype=np.int64)
    first = np.cumsum(count) - count
    allruns = np.concatenate(runs) if runs else np.zeros((0, 3), dtype=np.int64)
    k = count[prefill.tpl]
    idx = np.repeat(first[prefill.tpl] - np.cumsum(k) + k, k) + np.arange(int(k.sum()))
    r = allruns[idx]
    return np.stack([np.repeat(prefill.page, k) + r[:, 0], np.repeat(decode.page, k) + r[:, 1], r[:, 2]], axis=1)


@dataclass(frozen=True, eq=False)
class ChunkShape:
    """A chunk without its block ids: slot `i` reads block id `ids[block_index[i]]` of the request's
    flat id list, at `base[i] + id * stride[i]` in this side's buffer."""

    chunk: Chunk  # page offsets not meaningful
    pages: PageMap
    block_index: np.ndarray
    base: np.ndarray
    stride: np.ndarray
    ids: int  # length of the id list it expects
    num_blocks: int

    def with_ids(self, ids: Sequence[int], side: str) -> Chunk:
        if len(ids) != self.ids:
            raise ValueError(f"{side}: {len(ids)} block ids for a chunk that uses {self.ids}")
        if ids and (min(ids) < 0 or max(ids) >= self.num_blocks):
            bad = next(b for b in ids if not 0 <= b < self.num_blocks)
            raise ValueError(f"{side} block id {bad} out of range [0, {self.num_blocks})")
        c = self.chunk
        page = self.base + np.asarray(ids, dtype=np.int64)[self.block_index] * self.stride
        return Chunk(c.pair, c.tpl, page, c.stage, c.unit_of, c.units, c.rel)


def shape_of(pair: PairPlan, pages: PageMap, tpl: np.ndarray, layer: np.ndarray, index: np.ndarray, ids: int):
    c = make_chunk(pair, tpl, np.zeros(len(tpl), dtype=np.int64))
    return ChunkShape(c, pages, index, pages.base[layer], pages.stride[layer], ids, pages.num_blocks)


def flat_chunk(
    shapes: Shapes,
    pair: PairPlan,
    pages: PageMap,
    side: str,
    tokens: int,
    state_block: int | None,
    kv_blocks: Sequence[int],
    block_sizes: tuple[int, int],
) -> Chunk:
    """A request's chunk in the CLI's flat caches (`flat_slots` order), from its block ids."""
    has_state = pair.state is not None and len(pair.state_layers) > 0
    if has_state and state_block is None:
        raise ValueError(f"{side}: the model has state layers but no state block id was given")
    n_kv = len(kv_blocks)
    end = copied_tokens(tokens, *block_sizes) if len(pair.kv) else 0
    key = ("flat", side, end, n_kv, has_state)

    def build() -> ChunkShape:
        tpl, layer, index = flat_slots(pair, side, tokens, 0, list(range(1, 1 + n_kv)), block_sizes)
        return shape_of(pair, pages, tpl, layer, index, 1 + n_kv)

    shape = shapes.get(pair, pages, key, build)
    return shape.with_ids([state_block if has_state else 0, *kv_blocks], side)


# ---- a serving engine's request: block ids per group, on a rank's state geometry (hybrid_kv.mover.geometry) --

Blocks = dict[int, list[int]]  # a request's block ids per engine group (Mamba, then mapped attention)


def only_moved(pair: PairPlan, geom, blocks: Blocks) -> Blocks:
    """`blocks` restricted to the groups `pair` moves (the ids one source packs or one decode rank scatters):
    `blocks` itself where the pair moves all of its groups (not copied: on the host path of every request)."""
    keep = pair_groups(pair, geom)
    if all(g in keep for g in blocks):
        return blocks
    return {g: ids for g, ids in blocks.items() if g in keep}


def pair_groups(pair: PairPlan, geom) -> list[int]:
    """The groups a pair moves: the Mamba groups where it has state, the attention groups where its plan
    carries KV (TP sizes that do not divide: `hybrid_kv.vllm.anytp`)."""
    groups = list(geom.groups) if pair.state is not None else []
    if len(pair.kv):
        if len(pair.kv) != 1 or pair.period != geom.kv_block_size:
            raise ValueError(f"KV plan of period {pair.period} for {geom.kv_block_size}-token blocks on both sides")
        groups += geom.attn_groups
    return groups


def state_chunk(pair: PairPlan, geom, blocks: Mapping[int, Sequence[int]], side: str, shapes: Shapes) -> Chunk:
    """A request's chunk for one pair on this rank (block ids per group, checked): its state, and its
    attention KV where the pair's plan carries KV (one whole block per paired block, equal block sizes)."""
    groups = pair_groups(pair, geom)
    if not groups:
        raise ValueError(f"prefill rank {pair.src_rank} holds nothing for decode rank {pair.dst_rank}")
    stray = sorted(g for g, ids in blocks.items() if len(ids) and g not in groups)
    if stray:
        who = f"{pair.src_rank}->{pair.dst_rank}"
        raise ValueError(f"{side}: block ids for groups {stray}, which pair {who} does not move (it moves {groups})")
    counts = tuple(len(blocks.get(g, ())) for g in groups)

    def build() -> ChunkShape:
        layer, index = geom.slots(
            {g: list(range(sum(counts[:i]), sum(counts[: i + 1]))) for i, g in enumerate(groups)}, groups
        )
        kv = int(pair.kv[0]) if len(pair.kv) else -1
        tpl = np.where(geom.kind[layer] == 1, kv, -1 if pair.state is None else pair.state).astype(np.int64)
        return shape_of(pair, geom.pages, tpl, layer, index, sum(counts))

    shape = shapes.get(pair, geom.pages, ("state", side, tuple(groups), counts), build)
    return shape.with_ids([b for g in groups for b in blocks.get(g, ())], side)
