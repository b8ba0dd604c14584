"""Resolve plans + block ids of a batch of requests into absolute segment tables.

Each rank's cache is one flat byte buffer (like vLLM's single backing allocation): layer `l`, block `b`
starts at `(l * num_blocks + b) * page_bytes`. A segment table is an int64 array with one row per copy::

    (src_offset, dst_offset, rows, row_bytes, src_stride, dst_stride)      # SEGMENT_COLUMNS

Staging, per prefill rank `p`: chunks (request i, decode rank d) back to back, each chunk the pair's
`PackedLayout`. Receive staging, per decode rank `d`: chunks (request i, prefill rank p) likewise. A
transfer unit moves a byte range of a chunk from `p`'s staging to the same range of `d`'s.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from hybrid_kv.layout import RankLayout, cdiv
from hybrid_kv.plan import STAGING_ALIGN, PackedLayout, Piece, TransferPlan

SEGMENT_COLUMNS = ("src_offset", "dst_offset", "rows", "row_bytes", "src_stride", "dst_stride")


@dataclass(frozen=True)
class CacheGeometry:
    """Where each (layer, block) page sits in one rank's flat cache buffer."""

    num_layers: int
    num_blocks: int
    page_bytes: int

    @classmethod
    def of(cls, layout: RankLayout, num_blocks: int) -> CacheGeometry:
        if num_blocks < 1:
            raise ValueError(f"num_blocks={num_blocks} must be >= 1")
        return cls(len(layout.spec.layers), num_blocks, layout.page_bytes)

    @property
    def layer_stride(self) -> int:
        return self.num_blocks * self.page_bytes

    @property
    def nbytes(self) -> int:
        return self.num_layers * self.layer_stride

    def block_offset(self, layer: int, block: int) -> int:
        return layer * self.layer_stride + block * self.page_bytes


@dataclass(frozen=True)
class RequestBlocks:
    """A request's block ids on one side: its running-state block (all state layers) and KV blocks."""

    state: int | None
    kv: tuple[int, ...] = ()


def blocks_from(obj) -> RequestBlocks:
    """A request's blocks from their wire / JSON form `[state, [kv, ...]]`."""
    state, kv = obj
    return RequestBlocks(None if state is None else int(state), tuple(int(b) for b in kv))


@dataclass(frozen=True)
class Transfer:
    """One transfer unit: one descriptor, `nbytes` from prefill staging to decode receive staging."""

    request: int
    src_rank: int
    dst_rank: int
    src_offset: int  # in the prefill rank's staging
    dst_offset: int  # in the decode rank's receive staging
    nbytes: int


def _pair_arrays(layout: PackedLayout) -> dict[str, np.ndarray]:
    ps: Sequence[Piece] = layout.pieces
    return {
        "layer": np.array([p.layer for p in ps], dtype=np.int64),
        "is_kv": np.array([p.component == "kv" for p in ps], dtype=bool),
        "src_block": np.array([p.src_block for p in ps], dtype=np.int64),
        "dst_block": np.array([p.dst_block for p in ps], dtype=np.int64),
        "src_off": np.array([p.src.offset for p in ps], dtype=np.int64),
        "dst_off": np.array([p.dst.offset for p in ps], dtype=np.int64),
        "rows": np.array([p.src.rows for p in ps], dtype=np.int64),
        "row_bytes": np.array([p.src.row_bytes for p in ps], dtype=np.int64),
        "src_stride": np.array([p.src.stride for p in ps], dtype=np.int64),
        "dst_stride": np.array([p.dst.stride for p in ps], dtype=np.int64),
        "stage_off": np.array(layout.offsets, dtype=np.int64),
    }


def _block_ids(arr: dict[str, np.ndarray], which: str, blocks: RequestBlocks) -> np.ndarray:
    kv = np.asarray(blocks.kv, dtype=np.int64)
    idx = arr[f"{which}_block"]
    state = -1 if blocks.state is None else blocks.state
    return np.where(arr["is_kv"], kv[idx] if kv.size else 0, state)


@dataclass(frozen=True)
class PairTables:
    """One request, one (prefill rank -> decode rank) pair: its pieces as absolute segment tables.

    `pack` reads the prefill cache and writes staging offsets relative to the pair's chunk; `unpack`
    reads those offsets and writes the decode cache. Rows are in staging order, so the rows of transfer
    unit `u` are a contiguous range (`unit_rows`).
    """

    units: tuple[tuple[int, int], ...]
    nbytes: int  # staging bytes of the pair's chunk
    stage_off: np.ndarray  # [n] staging offset of each row
    src: np.ndarray  # [n] prefill cache offset
    dst: np.ndarray  # [n] decode cache offset
    rows: np.ndarray
    row_bytes: np.ndarray
    src_stride: np.ndarray
    dst_stride: np.ndarray

    def unit_rows(self, u: int) -> slice:
        a, b = self.units[u]
        return slice(int(np.searchsorted(self.stage_off, a)), int(np.searchsorted(self.stage_off, b)))

    def pack(self, rows: slice = slice(None), stage_base: int = 0) -> np.ndarray:
        """cache -> staging (at `stage_base` + row offset), for `rows`."""
        r = rows
        return np.stack(
            [
                self.src[r],
                stage_base + self.stage_off[r],
                self.rows[r],
                self.row_bytes[r],
                self.src_stride[r],
                self.row_bytes[r],
            ],
            axis=1,
        )

    def unpack(self, rows: slice = slice(None), stage_base: int = 0) -> np.ndarray:
        """staging (at `stage_base` + row offset) -> cache, for `rows`."""
        r = rows
        return np.stack(
            [
                stage_base + self.stage_off[r],
                self.dst[r],
                self.rows[r],
                self.row_bytes[r],
                self.row_bytes[r],
                self.dst_stride[r],
            ],
            axis=1,
        )

    def unit_pack(self, u: int, slot_offset: int) -> np.ndarray:
        return self.pack(self.unit_rows(u), slot_offset - self.units[u][0])

    def unit_unpack(self, u: int, slot_offset: int) -> np.ndarray:
        return self.unpack(self.unit_rows(u), slot_offset - self.units[u][0])

    def strided(self) -> np.ndarray:
        """Cache -> cache, one 1-D row per contiguous run (the strided baseline's descriptors)."""
        t = np.stack([self.src, self.dst, self.rows, self.row_bytes, self.src_stride, self.dst_stride], axis=1)
        s, d, n = expand_rows(t)
        return np.stack([s, d, np.ones_like(n), n, n, n], axis=1)


def pair_tables(
    arr: dict[str, np.ndarray],
    layout: PackedLayout,
    prefill: RequestBlocks | None,
    decode: RequestBlocks | None,
    prefill_geom: CacheGeometry,
    decode_geom: CacheGeometry,
) -> PairTables:
    """A side whose blocks are None (it only needs the other side's offsets) gets -1 offsets."""
    gp, gd = prefill_geom, decode_geom
    n = len(arr["layer"])
    src_ids = _block_ids(arr, "src", prefill) if prefill is not None else None
    dst_ids = _block_ids(arr, "dst", decode) if decode is not None else None
    return PairTables(
        units=layout.units,
        nbytes=layout.nbytes,
        stage_off=arr["stage_off"],
        src=arr["layer"] * gp.layer_stride + src_ids * gp.page_bytes + arr["src_off"]
        if src_ids is not None
        else np.full(n, -1, dtype=np.int64),
        dst=arr["layer"] * gd.layer_stride + dst_ids * gd.page_bytes + arr["dst_off"]
        if dst_ids is not None
        else np.full(n, -1, dtype=np.int64),
        rows=arr["rows"],
        row_bytes=arr["row_bytes"],
        src_stride=arr["src_stride"],
        dst_stride=arr["dst_stride"],
    )


def request_tables(
    plan: TransferPlan,
    prefill: RequestBlocks | None,
    decode: RequestBlocks | None,
    prefill_geom: CacheGeometry,
    decode_geom: CacheGeometry,
    *,
    src_rank: int | None = None,
    dst_rank: int | None = None,
    layouts: dict | None = None,
) -> dict[tuple[int, int], PairTables]:
    """`PairTables` of every (prefill rank, decode rank) pair of one request (optionally one side's),
    for the plan's staging layouts or the given ones (`TransferPlan.split`)."""
    memo = plan.__dict__.setdefault("_pair_arrays", {})
    out = {}
    for (p, d), lay in sorted((plan.staging if layouts is None else layouts).items()):
        if (src_rank is not None and p != src_rank) or (dst_rank is not None and d != dst_rank):
            continue
        if id(lay) not in memo:  # layouts are memoised by the plan, so their ids are stable
            memo[id(lay)] = _pair_arrays(lay)
        out[(p, d)] = pair_tables(memo[id(lay)], lay, prefill, decode, prefill_geom, decode_geom)
    return out


class BatchPlan:
    """Segment tables and transfer units for a batch of requests between all prefill and decode ranks."""

    def __init__(
        self,
        plans: Sequence[TransferPlan],
        prefill_blocks: Sequence[RequestBlocks],
        decode_blocks: Sequence[RequestBlocks],
        prefill_num_blocks: int,
        decode_num_blocks: int,
        template: TransferPlan | None = None,
    ) -> None:
        """`template` fixes the TP pair and layouts when the batch may be empty (else plans[0])."""
        if not (len(plans) == len(prefill_blocks) == len(decode_blocks)):
            raise ValueError(
                f"got {len(plans)} plans, {len(prefill_blocks)} prefill and {len(decode_blocks)} decode block lists"
            )
        self.plans = list(plans)
        self.prefill_blocks = list(prefill_blocks)
        self.decode_blocks = list(decode_blocks)
        ref = template or (plans[0] if plans else None)
        if ref is None:
            raise ValueError("an empty batch needs a template plan")
        for plan in self.plans:
            if (plan.prefill_tp, plan.decode_tp) != (ref.prefill_tp, ref.decode_tp) or plan.spec != ref.spec:
                raise ValueError("all requests of a batch must share the model and the TP pair")
        self.prefill_tp, self.decode_tp = ref.prefill_tp, ref.decode_tp
        self.prefill_geom = CacheGeometry.of(ref.prefill[0], prefill_num_blocks)
        self.decode_geom = CacheGeometry.of(ref.decode[0], decode_num_blocks)
        for side, blocks, n in (
            ("prefill", self.prefill_blocks, prefill_num_blocks),
            ("decode", self.decode_blocks, decode_num_blocks),
        ):
            validate_blocks(self.plans, side, blocks, n)
        # Staging offsets of each (request, pair) chunk, on both sides.
        self.stage_base: dict[tuple[int, int, int], int] = {}  # (i, p, d) -> offset in p's staging
        self.recv_base: dict[tuple[int, int, int], int] = {}  # (i, p, d) -> offset in d's receive staging
        stage_end = [0] * self.prefill_tp
        recv_end = [0] * self.decode_tp
        for i, plan in enumerate(self.plans):
            for (p, d), lay in sorted(plan.staging.items(), key=lambda kv: (kv[0][1], kv[0][0])):
                self.stage_base[(i, p, d)] = stage_end[p]
                stage_end[p] = _align(stage_end[p] + lay.nbytes)
            for (p, d), lay in sorted(plan.staging.items()):
                self.recv_base[(i, p, d)] = recv_end[d]
                recv_end[d] = _align(recv_end[d] + lay.nbytes)
        self.stage_bytes = stage_end
        self.recv_bytes = recv_end

    def _pairs(self, rank: int, side: str):
        for i, plan in enumerate(self.plans):
            kw = {"src_rank": rank} if side == "prefill" else {"dst_rank": rank}
            tables = request_tables(
                plan, self.prefill_blocks[i], self.decode_blocks[i], self.prefill_geom, self.decode_geom, **kw
            )
            for (p, d), t in tables.items():
                yield i, p, d, t

    def pack_table(self, src_rank: int) -> np.ndarray:
        """Prefill rank `src_rank`: cache -> staging, for every request and decode rank."""
        return _concat(
            [t.pack(stage_base=self.stage_base[(i, p, d)]) for i, p, d, t in self._pairs(src_rank, "prefill")]
        )

    def unpack_table(self, dst_rank: int) -> np.ndarray:
        """Decode rank `dst_rank`: receive staging -> cache, for every request and prefill rank."""
        return _concat(
            [t.unpack(stage_base=self.recv_base[(i, p, d)]) for i, p, d, t in self._pairs(dst_rank, "decode")]
        )

    def strided_table(self, dst_rank: int) -> list[tuple[int, np.ndarray]]:
        """Strided (baseline) mode for decode rank `dst_rank`: per source rank, a table of 1-D runs
        (cache -> cache), one row per NIXL descriptor."""
        by_src: dict[int, list[np.ndarray]] = {}
        for _, p, _, t in self._pairs(dst_rank, "decode"):
            by_src.setdefault(p, []).append(t.strided())
        return [(p, _concat(v)) for p, v in sorted(by_src.items())]

    def transfers(self, dst_rank: int | None = None) -> list[Transfer]:
        """Packed-mode transfer units (one descriptor each), optionally for one decode rank."""
        out = []
        for i, plan in enumerate(self.plans):
            for (p, d), lay in sorted(plan.staging.items()):
                if dst_rank is not None and d != dst_rank:
                    continue
                sb, rb = self.stage_base[(i, p, d)], self.recv_base[(i, p, d)]
                out += [Transfer(i, p, d, sb + a, rb + a, b - a) for a, b in lay.units]
        return out


def expand_rows(table: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(src, dst, nbytes) of every contiguous run of a segment table (a segment has `rows` runs)."""
    t = np.asarray(table, dtype=np.int64).reshape(-1, 6)
    src, dst, reps, rb, ss, ds = t.T
    r = np.arange(int(reps.sum()), dtype=np.int64) - np.repeat(np.cumsum(reps) - reps, reps)
    return (
        np.repeat(src, reps) + r * np.repeat(ss, reps),
        np.repeat(dst, reps) + r * np.repeat(ds, reps),
        np.repeat(rb, reps),
    )


def _align(n: int) -> int:
    return cdiv(n, STAGING_ALIGN) * STAGING_ALIGN


def _concat(parts: list[np.ndarray]) -> np.ndarray:
    return np.concatenate(parts).astype(np.int64) if parts else np.zeros((0, 6), dtype=np.int64)


def validate_blocks(plans: Sequence[TransferPlan], side: str, blocks: Sequence[RequestBlocks], num_blocks: int) -> None:
    """Every id in range, the right number of KV blocks per request, no decode block written twice."""
    seen_state: dict[int, int] = {}
    seen_kv: dict[int, int] = {}
    for i, (plan, rb) in enumerate(zip(plans, blocks)):
        has_state = bool(plan.spec.state_layers)
        if has_state and rb.state is None:
            raise ValueError(f"{side} request {i}: the model has state layers but no state block id was given")
        ids = ([rb.state] if has_state else []) + list(rb.kv)
        for b in ids:
            if not isinstance(b, (int, np.integer)) or isinstance(b, bool) or not 0 <= b < num_blocks:
                raise ValueError(f"{side} request {i}: block id {b!r} out of range [0, {num_blocks})")
        want = plan.num_kv_blocks(side)
        if len(rb.kv) != want:
            raise ValueError(
                f"{side} request {i}: {len(rb.kv)} kv block ids for {plan.tokens} tokens (expected {want})"
            )
        if len(set(rb.kv)) != len(rb.kv):
            raise ValueError(f"{side} request {i}: duplicate kv block ids {sorted(rb.kv)}")
        if side != "decode":
            continue  # prefill blocks are only read: sharing them between requests is fine
        for b, seen, what in ([(rb.state, seen_state, "state")] if has_state else []) + [
            (k, seen_kv, "kv") for k in rb.kv
        ]:
            if b in seen:
                raise ValueError(f"decode requests {seen[b]} and {i} both write {what} block {b}")
            seen[b] = i
