"""Per-rank page anatomy, byte-identical to vLLM 0.32's hybrid pages.

State page (one per layer per block)::

    0                  conv_bytes                       state_bytes           page_bytes
    | conv state        | ssm state                      | padding             |
    | x|B|C  or  q|k|v  | heads_local x head_shape       | (never transferred) |

    conv, DS layout: (conv_channels_local, rows) row-major -> a channel range is one byte range
    conv, SD layout: (rows, conv_channels_local)           -> a channel range is `rows` runs

Attention page (one per layer per block, K and V packed per token)::

    HND: [kv_heads_local, block_size, K||V]     NHD: [block_size, kv_heads_local, K||V]

The hybrid page size follows vLLM's rule: the attention block size is raised in multiples of the
alignment until one attention page holds the state page; the state page is padded up to it.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

from hybrid_kv.spec import DTYPE_SIZES, LayerKind, ModelSpec, SubProjection

CONV_LAYOUTS = ("DS", "SD")
KV_LAYOUTS = ("HND", "NHD")
KERNEL_BLOCK_ALIGN = 16  # FlashAttention's MultipleOf(16): vLLM's min kernel block size
DEFAULT_BLOCK_SIZE = 16  # vLLM's default --block-size


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class Shard:
    """Global units [start, stop) held by one rank; `replicated` if other ranks hold them too."""

    start: int
    stop: int
    replicated: bool = False

    @property
    def size(self) -> int:
        return self.stop - self.start


def shard_even(units: int, tp: int, rank: int, what: str, *, replicate_single: bool = False) -> Shard:
    """Even split of `units` over `tp` ranks; a single unit may be replicated (Mamba2 n_groups == 1)."""
    if replicate_single and units == 1 and tp > 1:
        return Shard(0, 1, replicated=True)
    if units % tp:
        accepted = f"{what} % tp == 0" + (f", or {what} == 1" if replicate_single else "")
        raise ValueError(f"tp={tp} does not divide {what}={units} (supported: {accepted})")
    per = units // tp
    return Shard(rank * per, (rank + 1) * per)


def _family(st) -> str:
    return {LayerKind.MAMBA2: "Mamba2", LayerKind.GDN: "GDN", LayerKind.KDA: "KDA", LayerKind.MAMBA1: "Mamba1"}[st.kind]


def _unit_name(st, sub) -> str:
    if st.kind is LayerKind.KDA:  # q, k and v all shard by the one head count
        return "KDA num_heads"
    names = {"B": "n_groups", "C": "n_groups", "q": "num_k_heads", "k": "num_k_heads", "v": "num_v_heads"}
    return f"{_family(st)} " + names.get(sub.name, "num_heads" if st.kind is LayerKind.MAMBA2 else "intermediate_size")


def _heads_name(st) -> str:
    names = {LayerKind.MAMBA2: "Mamba2 num_heads", LayerKind.GDN: "GDN num_v_heads", LayerKind.KDA: "KDA num_heads"}
    return names.get(st.kind, "Mamba1 intermediate_size")


def tp_problem(spec, tp: int) -> str | None:
    """Why `spec` cannot be sharded over `tp` ranks (vLLM's divisibility rules), or None."""
    if tp < 1:
        return f"tp={tp} must be >= 1"
    try:
        st = spec.state
        if st is not None:
            for sub in st.subprojections:
                shard_even(sub.units, tp, 0, _unit_name(st, sub), replicate_single=sub.replicate_single_unit)
            shard_even(st.heads, tp, 0, _heads_name(st))
        if spec.attention is not None:
            shard_kv_heads(spec.attention.num_kv_heads, tp, 0)
    except ValueError as e:
        return str(e)
    for key, value in spec.sharded:
        if value % tp:
            return f"tp={tp} does not divide {key}={value}"
    return None


def tp_hint(spec, limit: int = 64) -> str:
    ok = [t for t in range(1, limit + 1) if tp_problem(spec, t) is None]
    return f"TP sizes that work for {spec.name}: {', '.join(map(str, ok))}" if ok else "no TP size works"


def shard_kv_heads(num_kv_heads: int, tp: int, rank: int) -> Shard:
    """vLLM: max(1, K // tp) heads per rank; with tp > K, rank r holds head r*K//tp (replicated)."""
    if tp <= num_kv_heads:
        return shard_even(num_kv_heads, tp, rank, "attention num_kv_heads")
    if tp % num_kv_heads:
        raise ValueError(
            f"attention num_kv_heads={num_kv_heads} cannot be replicated over tp={tp} "
            f"(supported: num_kv_heads % tp == 0, or tp % num_kv_heads == 0)"
        )
    head = rank * num_kv_heads // tp
    return Shard(head, head + 1, replicated=True)


@dataclass(frozen=True)
class Region:
    """`rows` runs of `row_bytes` bytes, `stride` apart, starting `offset` bytes into a page."""

    offset: int
    rows: int
    row_bytes: int
    stride: int

    @property
    def nbytes(self) -> int:
        return self.rows * self.row_bytes


@dataclass(frozen=True)
class ConvPart:
    """One sub-projection as held by a rank: its global shard and where it sits in the local conv."""

    sub: SubProjection
    shard: Shard  # in units of sub.unit_channels channels
    channel_offset: int  # first local conv channel of this part

    @property
    def channels(self) -> int:
        return self.shard.size * self.sub.unit_channels


@dataclass(frozen=True)
class RankLayout:
    """Page anatomy of every cache layer on one TP rank."""

    spec: ModelSpec
    tp_size: int
    tp_rank: int
    conv_layout: str = "DS"
    kv_layout: str = "HND"
    cache_block_size: int = DEFAULT_BLOCK_SIZE  # the user's --block-size (vLLM may raise it)

    def __post_init__(self) -> None:
        if self.tp_size < 1 or not 0 <= self.tp_rank < self.tp_size:
            raise ValueError(f"tp_rank={self.tp_rank} is not in [0, tp_size={self.tp_size})")
        if self.conv_layout not in CONV_LAYOUTS:
            raise ValueError(f"conv_layout={self.conv_layout!r} (supported: {', '.join(CONV_LAYOUTS)})")
        if self.kv_layout not in KV_LAYOUTS:
            raise ValueError(f"kv_layout={self.kv_layout!r} (supported: {', '.join(KV_LAYOUTS)})")
        if self.cache_block_size < 1:
            raise ValueError(f"cache_block_size={self.cache_block_size} must be >= 1")
        # Shard eagerly so that a TP that does not fit the model fails at construction.
        problem = tp_problem(self.spec, self.tp_size)
        if problem is not None:
            raise ValueError(f"{self.spec.name} cannot run at TP {self.tp_size}: {problem}; {tp_hint(self.spec)}")
        _ = self.conv_parts, self.ssm_shard, self.kv_shard

    # ---- recurrent state ------------------------------------------------------------------------------

    @cached_property
    def conv_parts(self) -> tuple[ConvPart, ...]:
        st = self.spec.state
        if st is None:
            return ()
        parts, offset = [], 0
        for sub in st.subprojections:
            shard = shard_even(
                sub.units, self.tp_size, self.tp_rank, _unit_name(st, sub), replicate_single=sub.replicate_single_unit
            )
            part = ConvPart(sub, shard, offset)
            parts.append(part)
            offset += part.channels
        return tuple(parts)

    @cached_property
    def ssm_shard(self) -> Shard | None:
        st = self.spec.state
        if st is None:
            return None
        return shard_even(st.heads, self.tp_size, self.tp_rank, _heads_name(st))

    @property
    def conv_rows(self) -> int:
        return self.spec.state.conv_rows if self.spec.state else 0

    @property
    def conv_channels(self) -> int:
        return sum(p.channels for p in self.conv_parts)

    @property
    def conv_itemsize(self) -> int:
        return DTYPE_SIZES[self.spec.state.conv_dtype] if self.spec.state else 0

    @property
    def conv_bytes(self) -> int:
        return self.conv_channels * self.conv_rows * self.conv_itemsize

    @property
    def ssm_offset(self) -> int:
        return self.conv_bytes

    @property
    def ssm_head_bytes(self) -> int:
        st = self.spec.state
        return st.head_elems * DTYPE_SIZES[st.ssm_dtype] if st else 0

    @property
    def ssm_bytes(self) -> int:
        return self.ssm_shard.size * self.ssm_head_bytes if self.ssm_shard else 0

    @property
    def state_bytes(self) -> int:
        """vLLM's real (unpadded) Mamba page size."""
        return self.conv_bytes + self.ssm_bytes

    def conv_region(self, part: ConvPart, c0: int, c1: int) -> Region:
        """Bytes of local channels [c0, c1) of `part` (channels counted from the part's start)."""
        if not 0 <= c0 <= c1 <= part.channels:
            raise ValueError(f"channel range [{c0}, {c1}) outside part {part.sub.name} of {part.channels}")
        dt, rows = self.conv_itemsize, self.conv_rows
        first = part.channel_offset + c0
        if self.conv_layout == "DS":
            return Region(first * rows * dt, 1, (c1 - c0) * rows * dt, (c1 - c0) * rows * dt)
        return Region(first * dt, rows, (c1 - c0) * dt, self.conv_channels * dt)

    def ssm_region(self, h0: int, h1: int) -> Region:
        """Bytes of local SSM heads [h0, h1)."""
        n = self.ssm_shard.size if self.ssm_shard else 0
        if not 0 <= h0 <= h1 <= n:
            raise ValueError(f"ssm head range [{h0}, {h1}) outside the {n} local heads")
        nbytes = (h1 - h0) * self.ssm_head_bytes
        return Region(self.ssm_offset + h0 * self.ssm_head_bytes, 1, nbytes, nbytes)

    # ---- attention ------------------------------------------------------------------------------------

    @cached_property
    def kv_shard(self) -> Shard | None:
        attn = self.spec.attention
        return None if attn is None else shard_kv_heads(attn.num_kv_heads, self.tp_size, self.tp_rank)

    @property
    def kv_heads_local(self) -> int:
        return self.kv_shard.size if self.kv_shard else 0

    @property
    def kv_token_head_bytes(self) -> int:
        """Bytes of one token of one head (K||V): vLLM's `C`."""
        return self.spec.attention.token_head_bytes if self.spec.attention else 0

    @property
    def attn_token_bytes(self) -> int:
        """Bytes of one token across the local heads: the attention page per token."""
        return self.kv_heads_local * self.kv_token_head_bytes

    def kv_region(self, h0: int, h1: int, t0: int, t1: int) -> Region:
        """Bytes of local heads [h0, h1) x in-block tokens [t0, t1) of one attention block."""
        if not (0 <= h0 <= h1 <= self.kv_heads_local and 0 <= t0 <= t1 <= self.block_size):
            raise ValueError(f"kv range heads [{h0},{h1}) tokens [{t0},{t1}) outside the block")
        c, bs, nh = self.kv_token_head_bytes, self.block_size, self.kv_heads_local
        if self.kv_layout == "HND":
            return Region(h0 * bs * c + t0 * c, h1 - h0, (t1 - t0) * c, bs * c)
        return Region(t0 * nh * c + h0 * c, t1 - t0, (h1 - h0) * c, nh * c)

    # ---- the hybrid page ------------------------------------------------------------------------------

    @cached_property
    def block_size(self) -> int:
        """Tokens per attention block, raised by vLLM's hybrid rule so a page holds the state."""
        if self.spec.attention is None:
            return self.cache_block_size
        align = max(KERNEL_BLOCK_ALIGN, self.cache_block_size)
        bs = align * max(1, cdiv(self.state_bytes, align * self.attn_token_bytes))
        return cdiv(bs, KERNEL_BLOCK_ALIGN) * KERNEL_BLOCK_ALIGN

    @property
    def page_bytes(self) -> int:
        """Bytes of one block of one layer (the same for attention and state layers)."""
        if self.spec.attention is None:
            return self.state_bytes
        return self.block_size * self.attn_token_bytes

    @property
    def padding_bytes(self) -> int:
        return self.page_bytes - self.state_bytes if self.spec.state else 0

    def fingerprint(self) -> dict:
        """What must agree between peers beyond the TP size (see `hybrid_kv.plan.check_compatible`)."""
        return {
            **self.spec.fingerprint(),
            "conv_layout": self.conv_layout,
            "kv_layout": self.kv_layout,
            "tp_size": self.tp_size,
            "block_size": self.block_size,
            "page_bytes": self.page_bytes,
        }
