"""The correctness oracle of DESIGN.md, independent of `plan`, `batch` and `ops`.

Draw random *global* tensors per request and layer (conv sub-projections `[channels, rows]`, SSM
`[heads, *head_shape]`, KV `[kv_heads, tokens, 2*head_dim]`, MLA `[1, tokens, latent]`), and shard them
into one rank's pages by vLLM's sharding rules restated here from the model dims (not from `RankLayout`'s
shards). Only the page size and block size are taken from the layout, whose values are tested against vLLM
separately.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from hybrid_kv.dtypes import TORCH_DTYPES
from hybrid_kv.layout import RankLayout, cdiv
from hybrid_kv.spec import LayerKind, ModelSpec


def random_bytes(n: int, gen: np.random.Generator) -> torch.Tensor:
    """`n` random bytes: the bit generator's raw 64-bit words (~10x faster than `gen.bytes`, which the
    oracle's gigabyte-scale backgrounds made the largest cost of the round-trip tests)."""
    if not n:
        return torch.empty(0, dtype=torch.uint8)
    return torch.from_numpy(gen.bit_generator.random_raw(-(-n // 8)).view(np.uint8)[:n])


def random_tensor(shape: tuple[int, ...], dtype: str, gen: np.random.Generator) -> torch.Tensor:
    """Random bit patterns (NaNs included: comparisons are done on bytes)."""
    td = TORCH_DTYPES[dtype]
    n = 1
    for s in shape:
        n *= s
    return random_bytes(n * td.itemsize, gen).view(td).view(shape)


@dataclass
class GlobalState:
    """One request's unsharded state: per state layer conv sub-projections and SSM; per attention layer KV."""

    conv: dict[int, list[torch.Tensor]]
    ssm: dict[int, torch.Tensor]
    kv: dict[int, torch.Tensor]


def random_global_state(spec: ModelSpec, kv_tokens: int, gen: np.random.Generator) -> GlobalState:
    conv, ssm, kv = {}, {}, {}
    st, at = spec.state, spec.attention
    for layer in spec.layers:
        if layer.kind is LayerKind.ATTENTION:
            kv[layer.index] = random_tensor((at.num_kv_heads, kv_tokens, at.token_elems), at.dtype, gen)
        else:
            conv[layer.index] = [
                random_tensor((s.channels, st.conv_rows), st.conv_dtype, gen) for s in st.subprojections
            ]
            ssm[layer.index] = random_tensor((st.heads, *st.head_shape), st.ssm_dtype, gen)
    return GlobalState(conv, ssm, kv)


def _rank_rows(units: int, unit_len: int, tp: int, rank: int, replicate_single: bool) -> slice:
    """Rows of a global tensor (units x unit_len rows) held by `rank` (vLLM's weight-loader rules)."""
    if replicate_single and units == 1 and tp > 1:
        return slice(0, unit_len)  # duplicate_groups: every rank loads group 0
    per = units // tp
    return slice(rank * per * unit_len, (rank + 1) * per * unit_len)


def _kv_heads(num_kv_heads: int, tp: int, rank: int) -> slice:
    if tp <= num_kv_heads:
        per = num_kv_heads // tp
        return slice(rank * per, (rank + 1) * per)
    h = rank * num_kv_heads // tp
    return slice(h, h + 1)


def write_shards(
    cache: torch.Tensor,
    layout: RankLayout,
    num_blocks: int,
    state: GlobalState,
    state_block: int | Mapping[int, int] | None,
    kv_blocks: Sequence[int] | Mapping[int, Sequence[int]],
    kv_tokens: int,
    page_of: Callable[[int, int], torch.Tensor] | None = None,
) -> None:
    """Write rank `layout.tp_rank`'s shard of `state` into its flat byte `cache`.

    KV tokens [0, kv_tokens) go into `kv_blocks` in order; later token slots are not touched. Both block
    arguments may instead map layer index -> block(s) (vLLM gives each cache group its own blocks), and
    `page_of(layer, block)` may replace hybrid-kv's flat addressing (e.g. with vLLM's aliased regions).
    """
    spec, tp, r = layout.spec, layout.tp_size, layout.tp_rank
    page = layout.page_bytes
    st, at = spec.state, spec.attention

    def flat_page(layer: int, block: int) -> torch.Tensor:
        base = (layer * num_blocks + block) * page
        return cache[base : base + page]

    page_of = page_of or flat_page

    for layer in spec.layers:
        if layer.kind is LayerKind.ATTENTION:
            heads = _kv_heads(at.num_kv_heads, tp, r)
            bs = layout.block_size
            g = state.kv[layer.index][heads]  # [h, tokens, 2*hd]
            blocks = kv_blocks[layer.index] if isinstance(kv_blocks, Mapping) else kv_blocks
            for j, b in enumerate(blocks):
                t0, t1 = j * bs, min((j + 1) * bs, kv_tokens)
                if t1 <= t0:
                    break
                pg = page_of(layer.index, b).view(TORCH_DTYPES[at.dtype])
                if layout.kv_layout == "HND":
                    pg.view(g.shape[0], bs, g.shape[2])[:, : t1 - t0] = g[:, t0:t1]
                else:
                    pg.view(bs, g.shape[0], g.shape[2])[: t1 - t0] = g[:, t0:t1].transpose(0, 1)
            continue
        # State layer: [conv | ssm | pad]
        local = []
        for sub, glob in zip(st.subprojections, state.conv[layer.index]):
            rows = _rank_rows(sub.units, sub.unit_channels, tp, r, sub.replicate_single_unit)
            local.append(glob[rows])
        conv = torch.cat(local)  # [channels_local, rows]  (DS)
        if layout.conv_layout == "SD":
            conv = conv.t().contiguous()
        ssm = state.ssm[layer.index][_rank_rows(st.heads, 1, tp, r, False)].contiguous()
        # flatten first: a size-1 dim can leave a "contiguous" tensor with a non-unit last stride
        cb = conv.reshape(-1).contiguous().view(torch.uint8)
        sb = ssm.reshape(-1).contiguous().view(torch.uint8)
        block = state_block[layer.index] if isinstance(state_block, Mapping) else state_block
        pg = page_of(layer.index, block)
        pg[: cb.numel()] = cb
        pg[cb.numel() : cb.numel() + sb.numel()] = sb


def kv_tokens_written(tokens: int, prefill_block: int, decode_block: int) -> tuple[int, int]:
    """(tokens filled on prefill, tokens expected on decode): whole prefill blocks are filled; decode
    receives whole blocks when the sizes agree, else up to the shorter padded end."""
    filled = cdiv(tokens, prefill_block) * prefill_block
    return filled, min(filled, cdiv(tokens, decode_block) * decode_block)


def read_shards(
    layouts: Sequence[RankLayout],
    page_of: Sequence[Callable[[int, int], torch.Tensor]],
    state_block: Mapping[int, int],
    kv_blocks: Mapping[int, Sequence[int]],
) -> GlobalState:
    """The global state held by all ranks of one TP group: the inverse of `write_shards`, by the same rules.

    `page_of[r](layer, block)` gives rank r's page bytes. KV is read from every token slot of `kv_blocks`
    (whole blocks, as they are transferred). A row held by several ranks (replicated KV heads, a single
    replicated Mamba2 group) must hold the same bytes on each: a difference raises.
    """
    spec = layouts[0].spec
    tp = layouts[0].tp_size
    st, at = spec.state, spec.attention
    conv: dict[int, list[torch.Tensor]] = {}
    ssm: dict[int, torch.Tensor] = {}
    kv: dict[int, torch.Tensor] = {}

    def put(dst: torch.Tensor, seen: torch.Tensor, rows: slice, src: torch.Tensor, what: str) -> None:
        old = seen[rows]
        if old.any() and not torch.equal(dst[rows][old].view(torch.uint8), src[old].view(torch.uint8)):
            raise ValueError(f"{what}: ranks hold different bytes for replicated rows {rows.start}:{rows.stop}")
        dst[rows] = src
        seen[rows] = True

    for layer in spec.layers:
        if layer.kind is LayerKind.ATTENTION:
            bs = layouts[0].block_size
            blocks = kv_blocks[layer.index]
            dt = TORCH_DTYPES[at.dtype]
            g = torch.empty((at.num_kv_heads, len(blocks) * bs, at.token_elems), dtype=dt)
            seen = torch.zeros((at.num_kv_heads, 1, 1), dtype=torch.bool).expand(-1, g.shape[1], g.shape[2])
            seen = seen.contiguous()
            for lay, pf in zip(layouts, page_of):
                heads = _kv_heads(at.num_kv_heads, tp, lay.tp_rank)
                h = heads.stop - heads.start
                parts = []
                for b in blocks:
                    pg = pf(layer.index, b).view(dt)
                    if lay.kv_layout == "HND":
                        parts.append(pg[: h * bs * at.token_elems].view(h, bs, at.token_elems))
                    else:
                        parts.append(pg[: bs * h * at.token_elems].view(bs, h, at.token_elems).transpose(0, 1))
                put(g, seen, heads, torch.cat(parts, dim=1), f"layer {layer.index} KV")
            kv[layer.index] = g
            continue
        subs, seen_subs = [], []
        for s in st.subprojections:
            subs.append(torch.empty((s.channels, st.conv_rows), dtype=TORCH_DTYPES[st.conv_dtype]))
            seen_subs.append(torch.zeros((s.channels, st.conv_rows), dtype=torch.bool))
        glob_ssm = torch.empty((st.heads, *st.head_shape), dtype=TORCH_DTYPES[st.ssm_dtype])
        seen_ssm = torch.zeros(glob_ssm.shape, dtype=torch.bool)
        for lay, pf in zip(layouts, page_of):
            r = lay.tp_rank
            pg = pf(layer.index, state_block[layer.index])
            rows = [_rank_rows(s.units, s.unit_channels, tp, r, s.replicate_single_unit) for s in st.subprojections]
            n_ch = sum(x.stop - x.start for x in rows)
            cdt = TORCH_DTYPES[st.conv_dtype]
            cb = n_ch * st.conv_rows * cdt.itemsize
            local = pg[:cb].view(cdt)
            local = local.view(n_ch, st.conv_rows) if lay.conv_layout == "DS" else local.view(st.conv_rows, n_ch).t()
            c0 = 0
            for i, x in enumerate(rows):
                n = x.stop - x.start
                put(subs[i], seen_subs[i], x, local[c0 : c0 + n], f"layer {layer.index} conv part {i}")
                c0 += n
            heads = _rank_rows(st.heads, 1, tp, r, False)
            sdt = TORCH_DTYPES[st.ssm_dtype]
            n_h = heads.stop - heads.start
            sb = pg[cb : cb + n_h * int(np.prod(st.head_shape)) * sdt.itemsize].view(sdt)
            put(glob_ssm, seen_ssm, heads, sb.view(n_h, *st.head_shape), f"layer {layer.index} SSM")
        conv[layer.index], ssm[layer.index] = subs, glob_ssm
    return GlobalState(conv, ssm, kv)
