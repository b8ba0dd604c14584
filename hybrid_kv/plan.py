"""Transfer plans: which bytes of which prefill rank's pages land where in which decode rank's pages.

A plan is built once per (model, prefill TP, decode TP, token count) from the two sides' `RankLayout`s.
It is a list of `Piece`s, each one copy of one component (conv.x, ssm, kv, ...) of one layer between
one prefill block and one decode block, for *any* TP pair whose sharded dimensions divide evenly. From
the pieces derive:

* strided mode (the vLLM-style baseline): one descriptor per contiguous run, page to page;
* packed mode: per (prefill rank -> decode rank), the pieces laid end to end in a staging buffer
  (gather), moved as one descriptor per transfer unit, and scattered into the decode pages.

Every needed byte is read exactly once, from one source. Replicated units (Mamba2 B/C with
n_groups == 1, attention heads with TP > num_kv_heads) are read from a prefill rank the decode rank
already reads from when there is one, spread across the candidates otherwise.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from functools import cached_property
from itertools import pairwise

from hybrid_kv.layout import ConvPart, RankLayout, Region, Shard, cdiv
from hybrid_kv.spec import LayerKind, ModelSpec

STAGING_ALIGN = 16  # bytes: piece starts in staging, so kernels can use 16-byte accesses
DEFAULT_MAX_UNIT_BYTES = 64 << 20  # largest transfer unit (one NIXL descriptor, one staging slot)
MAX_PIECES = 1_000_000  # a plan larger than this is refused before it is built (~1 KB of memory a piece)


@dataclass(frozen=True)
class Piece:
    """One copy: `src` of a prefill rank's page -> `dst` of a decode rank's page (same rows x row_bytes)."""

    src_rank: int
    dst_rank: int
    layer: int
    component: str  # conv.x conv.B conv.C conv.q conv.k conv.v conv ssm kv
    src_block: int  # index into the request's prefill block list of this layer kind (0 for state)
    dst_block: int  # index into the request's decode block list
    src: Region
    dst: Region

    @property
    def nbytes(self) -> int:
        return self.src.nbytes

    @property
    def runs(self) -> int:
        """Contiguous runs: NIXL descriptors in strided mode."""
        return self.src.rows

    def run_offsets(self) -> list[tuple[int, int, int]]:
        """(src offset, dst offset, nbytes) of each contiguous run, within the two pages."""
        s, d = self.src, self.dst
        return [(s.offset + r * s.stride, d.offset + r * d.stride, s.row_bytes) for r in range(s.rows)]


def _piece(src_rank, dst_rank, layer, component, src_block, dst_block, src: Region, dst: Region) -> Piece:
    if (src.rows, src.row_bytes) != (dst.rows, dst.row_bytes):
        raise AssertionError(f"shape mismatch {src} vs {dst}")  # a plan bug, never user input
    if src.rows > 1 and src.stride == src.row_bytes and dst.stride == dst.row_bytes:
        n = src.nbytes  # rows are back to back on both sides: one run
        src, dst = Region(src.offset, 1, n, n), Region(dst.offset, 1, n, n)
    return Piece(src_rank, dst_rank, layer, component, src_block, dst_block, src, dst)


def preferred_sources(prefill_tp: int, decode_tp: int, dst_rank: int) -> list[int]:
    """Prefill ranks whose share of the model overlaps decode rank `dst_rank`'s share."""
    return [
        p
        for p in range(prefill_tp)
        if p * decode_tp < (dst_rank + 1) * prefill_tp and dst_rank * prefill_tp < (p + 1) * decode_tp
    ]


def assign_sources(
    need: Shard, held: Sequence[Shard | None], preferred: Sequence[int], dst_rank: int
) -> list[tuple[int, int, int]]:
    """Cover global units [need.start, need.stop) with (source rank, u0, u1) intervals, one source each."""
    cuts = {need.start, need.stop}
    for h in held:
        if h is not None:
            cuts.update(c for c in (h.start, h.stop) if need.start < c < need.stop)
    out: list[tuple[int, int, int]] = []
    bounds = sorted(cuts)
    for u0, u1 in pairwise(bounds):
        cands = [p for p, h in enumerate(held) if h is not None and h.start <= u0 and u1 <= h.stop]
        if not cands:
            raise AssertionError(f"no prefill rank holds units [{u0}, {u1})")
        pref = [p for p in cands if p in preferred] or cands
        src = pref[dst_rank % len(pref)]
        if out and out[-1][0] == src and out[-1][2] == u0:
            out[-1] = (src, out[-1][1], u1)
        else:
            out.append((src, u0, u1))
    return out


MATCHING_FIELDS = ("architecture", "layer_kinds", "state", "attention", "conv_layout", "kv_layout")
# differ legitimately between the sides (names, TP-dependent sizes, checked against the TP elsewhere)
UNMATCHED_FIELDS = frozenset({"model", "tp_size", "tp_rank", "block_size", "page_bytes"})


def _diff(key: str, a, b, a_name: str, b_name: str) -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):  # every key of either side: an extra key is a difference
        out = []
        for k in sorted(set(a) | set(b), key=str):
            out += _diff(f"{key}.{k}", a.get(k), b.get(k), a_name, b_name)
        return out
    return [] if a == b and type(a) is type(b) else [f"{key}: {a_name} {a!r} vs {b_name} {b!r}"]


def fingerprint_diff(a: dict, b: dict, a_name: str = "prefill", b_name: str = "decode") -> str | None:
    """None if the two sides' pages can correspond, else a message naming every differing field. Every
    field either side sends is compared (nested ones too), except the UNMATCHED_FIELDS: a field added
    later, or one side's extra key, is a difference, never ignored."""
    keys = [k for k in MATCHING_FIELDS] + sorted((set(a) | set(b)) - set(MATCHING_FIELDS) - UNMATCHED_FIELDS, key=str)
    out = []
    for key in keys:
        out += _diff(key, a.get(key), b.get(key), a_name, b_name)
    return ", ".join(out) if out else None


def check_compatible(prefill: RankLayout, decode: RankLayout) -> None:
    """Refuse a pair of sides whose pages cannot correspond; the message names the differing field."""
    diff = fingerprint_diff(prefill.fingerprint(), decode.fingerprint())
    if diff:
        raise ValueError(f"prefill and decode configurations differ ({diff})")


def copied_tokens(tokens: int, prefill_block: int, decode_block: int) -> int:
    """Attention tokens moved: whole blocks when both block sizes agree, else up to the shorter padded end."""
    return min(cdiv(tokens, prefill_block) * prefill_block, cdiv(tokens, decode_block) * decode_block)


@dataclass
class TransferPlan:
    """All pieces of one request's transfer from `prefill` ranks to `decode` ranks."""

    prefill: list[RankLayout]
    decode: list[RankLayout]
    tokens: int
    max_unit_bytes: int = DEFAULT_MAX_UNIT_BYTES
    pieces: list[Piece] = field(init=False)

    def __post_init__(self) -> None:
        if not self.prefill or not self.decode:
            raise ValueError("a plan needs at least one prefill and one decode rank")
        if self.tokens < 0:
            raise ValueError(f"tokens={self.tokens} must be >= 0")
        if self.max_unit_bytes < STAGING_ALIGN:
            raise ValueError(f"max_unit_bytes={self.max_unit_bytes} must be >= {STAGING_ALIGN}")
        for side, layouts in (("prefill", self.prefill), ("decode", self.decode)):
            for r, lay in enumerate(layouts):
                if (lay.tp_size, lay.tp_rank) != (len(layouts), r):
                    raise ValueError(
                        f"{side} layout {r} has tp {lay.tp_rank}/{lay.tp_size}, expected {r}/{len(layouts)}"
                    )
        check_compatible(self.prefill[0], self.decode[0])
        self._check_size()
        self.pieces = [p for d in range(self.decode_tp) for p in self._pieces_for(d)]

    def _check_size(self) -> None:
        """Refuse, before allocating, a plan whose piece count would not fit in memory."""
        spec = self.prefill[0].spec
        n_state, n_attn = len(spec.state_layers), len(spec.attention_layers)
        bs = min(self.prefill[0].block_size, self.decode[0].block_size)
        blocks = cdiv(self.tokens, bs)
        ranks = max(self.prefill_tp, self.decode_tp)
        # per decode rank: each source rank's slices of every state layer and of every attention block
        per_block = self.decode_tp * ranks * n_attn
        est = self.decode_tp * ranks * 8 * n_state + per_block * (blocks + 1)
        if est > MAX_PIECES:
            most = max(0, (MAX_PIECES - self.decode_tp * ranks * 8 * n_state) // max(per_block, 1) - 1) * bs
            raise ValueError(
                f"tokens={self.tokens}: a plan for {spec.name} at TP {self.prefill_tp}->{self.decode_tp} would hold "
                f"about {est:,} pieces, over the limit of {MAX_PIECES:,}; at most about {most:,} tokens fit"
            )
        page = max(lay.page_bytes for lay in (*self.prefill, *self.decode))
        moved = self.decode_tp * (n_state + n_attn * blocks) * page  # an upper bound of the bytes moved
        if moved // self.max_unit_bytes > MAX_PIECES:
            raise ValueError(
                f"max_unit_bytes={self.max_unit_bytes} would cut this plan into about "
                f"{moved // self.max_unit_bytes:,} pieces, over the limit of {MAX_PIECES:,}; "
                f"use at least {cdiv(moved, MAX_PIECES):,} bytes"
            )

    @classmethod
    def build(
        cls,
        spec: ModelSpec,
        prefill_tp: int,
        decode_tp: int,
        tokens: int,
        *,
        conv_layout: str = "DS",
        kv_layout: str = "HND",
        prefill_block_size: int = 16,
        decode_block_size: int = 16,
        max_unit_bytes: int = DEFAULT_MAX_UNIT_BYTES,
    ) -> TransferPlan:
        for side, tp in (("prefill_tp", prefill_tp), ("decode_tp", decode_tp)):
            if not isinstance(tp, int) or tp < 1:
                raise ValueError(f"{side}={tp!r} must be a positive integer")
        pre = [RankLayout(spec, prefill_tp, r, conv_layout, kv_layout, prefill_block_size) for r in range(prefill_tp)]
        dec = [RankLayout(spec, decode_tp, r, conv_layout, kv_layout, decode_block_size) for r in range(decode_tp)]
        return cls(pre, dec, tokens, max_unit_bytes)

    def for_tokens(self, tokens: int) -> TransferPlan:
        """The same TP pair and layouts for a request of `tokens` tokens (memoised)."""
        if tokens == self.tokens:
            return self
        memo = self.__dict__.setdefault("_by_tokens", {})
        if tokens not in memo:
            memo[tokens] = TransferPlan(self.prefill, self.decode, tokens, self.max_unit_bytes)
        return memo[tokens]

    # ---- sizes ------------------------------------------------------------------------------------------

    @property
    def spec(self) -> ModelSpec:
        return self.prefill[0].spec

    @property
    def prefill_tp(self) -> int:
        return len(self.prefill)

    @property
    def decode_tp(self) -> int:
        return len(self.decode)

    @property
    def copied_tokens(self) -> int:
        return copied_tokens(self.tokens, self.prefill[0].block_size, self.decode[0].block_size)

    def num_kv_blocks(self, side: str) -> int:
        """Attention blocks a request of `tokens` tokens holds on `side` ("prefill" | "decode")."""
        lay = self.prefill[0] if side == "prefill" else self.decode[0]
        return cdiv(self.tokens, lay.block_size) if self.spec.attention else 0

    # ---- building ---------------------------------------------------------------------------------------

    def _pieces_for(self, d: int) -> list[Piece]:
        pref = preferred_sources(self.prefill_tp, self.decode_tp, d)
        dec = self.decode[d]
        out: list[Piece] = []
        for layer in self.spec.layers:
            if layer.kind is LayerKind.ATTENTION:
                out += self._kv_pieces(d, layer.index, pref)
                continue
            single = self.spec.state.kind is LayerKind.MAMBA1
            for j, dpart in enumerate(dec.conv_parts):
                comp = "conv" if single else f"conv.{dpart.sub.name}"
                held = [p.conv_parts[j].shard for p in self.prefill]
                for src, u0, u1 in assign_sources(dpart.shard, held, pref, d):
                    ppart = self.prefill[src].conv_parts[j]
                    s = self.prefill[src].conv_region(ppart, *_local_channels(ppart, u0, u1))
                    t = dec.conv_region(dpart, *_local_channels(dpart, u0, u1))
                    out.append(_piece(src, d, layer.index, comp, 0, 0, s, t))
            held = [p.ssm_shard for p in self.prefill]
            for src, u0, u1 in assign_sources(dec.ssm_shard, held, pref, d):
                s0 = self.prefill[src].ssm_shard.start
                s = self.prefill[src].ssm_region(u0 - s0, u1 - s0)
                t = dec.ssm_region(u0 - dec.ssm_shard.start, u1 - dec.ssm_shard.start)
                out.append(_piece(src, d, layer.index, "ssm", 0, 0, s, t))
        return out

    def _kv_pieces(self, d: int, layer: int, pref: list[int]) -> list[Piece]:
        dec = self.decode[d]
        bs_p, bs_d = self.prefill[0].block_size, dec.block_size
        end = self.copied_tokens
        cuts = sorted({0, end, *range(0, end, bs_p), *range(0, end, bs_d)})
        sources = assign_sources(dec.kv_shard, [p.kv_shard for p in self.prefill], pref, d)
        out = []
        for t0, t1 in pairwise(cuts):
            ib, jb = t0 // bs_p, t0 // bs_d
            for src, h0, h1 in sources:
                pl, ps = self.prefill[src], self.prefill[src].kv_shard.start
                s = pl.kv_region(h0 - ps, h1 - ps, t0 - ib * bs_p, t1 - ib * bs_p)
                ds = dec.kv_shard.start
                t = dec.kv_region(h0 - ds, h1 - ds, t0 - jb * bs_d, t1 - jb * bs_d)
                out.append(_piece(src, d, layer, "kv", ib, jb, s, t))
        return out

    # ---- derived views ----------------------------------------------------------------------------------

    @cached_property
    def pairs(self) -> dict[tuple[int, int], list[Piece]]:
        """(prefill rank, decode rank) -> its pieces, in plan order."""
        out: dict[tuple[int, int], list[Piece]] = defaultdict(list)
        for p in self.pieces:
            out[(p.src_rank, p.dst_rank)].append(p)
        return dict(out)

    @cached_property
    def staging(self) -> dict[tuple[int, int], PackedLayout]:
        """Packed staging layout of each (prefill rank, decode rank) pair."""
        return {pair: PackedLayout.of(ps, self.max_unit_bytes) for pair, ps in self.pairs.items()}

    def split(self, threshold: int | None) -> tuple[dict, dict]:
        """Per pair, (packed layout, direct layout) for a run-size `threshold` in bytes: pieces whose
        runs are shorter are packed into staging, the others read page to page. None packs all."""
        memo = self.__dict__.setdefault("_split", {})
        if threshold not in memo:
            packed, direct = {}, {}
            for pair, ps in self.pairs.items():
                small = [x for x in ps if threshold is None or x.src.row_bytes < threshold]
                large = [x for x in ps if threshold is not None and x.src.row_bytes >= threshold]
                packed[pair] = PackedLayout.of(small, self.max_unit_bytes)
                direct[pair] = PackedLayout.of(large, self.max_unit_bytes)
            memo[threshold] = (packed, direct)
        return memo[threshold]

    def sources_of(self, dst_rank: int) -> list[int]:
        return sorted(p for p, d in self.pairs if d == dst_rank)

    def strided_descriptors(self) -> int:
        """NIXL descriptors per request in strided mode (one per contiguous run), all decode ranks."""
        return sum(p.runs for p in self.pieces)

    def packed_descriptors(self) -> int:
        """NIXL descriptors per request in packed mode (one per transfer unit per pair)."""
        return sum(len(s.units) for s in self.staging.values())

    def bytes_moved(self) -> int:
        return sum(p.nbytes for p in self.pieces)


def _local_channels(part: ConvPart, u0: int, u1: int) -> tuple[int, int]:
    uc = part.sub.unit_channels
    return (u0 - part.shard.start) * uc, (u1 - part.shard.start) * uc


@dataclass(frozen=True)
class PackedLayout:
    """Pieces of one (prefill rank -> decode rank) pair laid end to end (16-byte aligned) in staging.

    `units` cut the staging bytes into transfer units (one descriptor each) of at most the unit budget;
    cuts fall only between pieces, except that a piece larger than the budget is first split by rows
    and, if a row is still too large, by bytes.
    """

    pieces: tuple[Piece, ...]
    offsets: tuple[int, ...]  # staging offset of each piece
    nbytes: int  # staging bytes, including alignment gaps
    units: tuple[tuple[int, int], ...]  # (start, stop) staging byte ranges

    @classmethod
    def of(cls, pieces: Sequence[Piece], max_unit_bytes: int) -> PackedLayout:
        flat = [q for p in pieces for q in split_piece(p, max_unit_bytes)]
        offsets, units, pos, unit_start = [], [], 0, 0
        for p in flat:
            start = _align(pos)
            if start + p.nbytes - unit_start > max_unit_bytes and pos > unit_start:
                units.append((unit_start, pos))
                unit_start = start
            offsets.append(start)
            pos = start + p.nbytes
        if pos > unit_start:
            units.append((unit_start, pos))
        return cls(tuple(flat), tuple(offsets), pos, tuple(units))


def _align(n: int) -> int:
    return cdiv(n, STAGING_ALIGN) * STAGING_ALIGN


def split_piece(p: Piece, max_bytes: int) -> list[Piece]:
    """Split `p` so that each part is at most `max_bytes` (a budget at least STAGING_ALIGN)."""
    if p.nbytes <= max_bytes:
        return [p]
    s, t = p.src, p.dst
    if s.rows > 1 and s.row_bytes <= max_bytes:
        per = max(1, max_bytes // s.row_bytes)
        return [
            replace(
                p,
                src=Region(s.offset + r * s.stride, min(per, s.rows - r), s.row_bytes, s.stride),
                dst=Region(t.offset + r * t.stride, min(per, s.rows - r), s.row_bytes, t.stride),
            )
            for r in range(0, s.rows, per)
        ]
    step = max_bytes - max_bytes % STAGING_ALIGN
    return [
        replace(
            p,
            src=Region(s.offset + r * s.stride + b, 1, min(step, s.row_bytes - b), min(step, s.row_bytes - b)),
            dst=Region(t.offset + r * t.stride + b, 1, min(step, s.row_bytes - b), min(step, s.row_bytes - b)),
        )
        for r in range(s.rows)
        for b in range(0, s.row_bytes, step)
    ]
