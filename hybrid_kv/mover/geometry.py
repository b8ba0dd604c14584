"""One serving rank's recurrent state as the mover sees it: which engine layer is which hybrid-kv layer,
where each Mamba layer's pages sit in the engine's single backing allocation (a `PageMap` for the copier),
and the order of a request's slots, which both sides compute from the same layer names (`slots`, which
`hybrid_kv.staging.chunk.state_chunk` uses to turn a request's block ids per group into its chunk).

vLLM aliases its KV cache groups from byte 0 of one buffer (reference §2.3): the page of Mamba layer `n`
for block `b` sits at `offset(n) + b * stride(n)`, where `offset`/`stride` are read from the layer's own
tensor view, so nothing here re-derives vLLM's allocator. Every Mamba layer of a model shares one state
geometry, so a (prefill rank -> decode rank) pair needs one state template (`hybrid_kv.staging`); a
request's chunk is that template repeated for each (group, block, layer).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from hybrid_kv.layout import RankLayout
from hybrid_kv.spec import LayerKind, ModelSpec
from hybrid_kv.staging.chunk import Blocks
from hybrid_kv.staging.pagemap import PageMap


def layer_index(name: str) -> int:
    for part in name.split("."):
        if part.isdigit():
            return int(part)
    raise ValueError(f"vLLM layer name {name!r} carries no layer index")


def flat_storage(t: torch.Tensor) -> torch.Tensor:
    """The whole storage behind `t` as one flat uint8 tensor (vLLM views one backing buffer per rank)."""
    st = t.untyped_storage()
    return torch.empty(0, dtype=torch.uint8, device=t.device).set_(st, 0, (st.nbytes(),), (1,))


@dataclass(frozen=True)
class StateLayer:
    name: str  # vLLM layer name
    index: int  # hybrid-kv layer index
    group: int  # vLLM transfer group
    offset: int  # byte offset of block 0's page in the rank's backing storage
    stride: int  # bytes between consecutive blocks' pages


@dataclass(frozen=True)
class AttentionPages:
    """One rank's full-attention pages (where the mover carries attention KV: TP sizes that do not divide)."""

    groups: tuple[int, ...]  # the engine's transfer groups of the full-attention layers
    layers: tuple[StateLayer, ...]  # one per attention layer (its hybrid-kv index, group, offset, stride)
    block_size: int  # tokens per page (the engine's logical block = its kernel block)
    page_bytes: int


class StateGeometry:
    """One rank's Mamba layers in vLLM's memory, checked against hybrid-kv's page anatomy."""

    def __init__(
        self,
        spec: ModelSpec,
        layout: RankLayout,
        groups: Sequence[tuple[int, Sequence[str]]],
        kv_caches: Mapping[str, torch.Tensor],
        layer_specs: Mapping[str, object],
        num_blocks: int,
        attention: AttentionPages | None = None,
    ) -> None:
        self.spec, self.layout, self.num_blocks = spec, layout, num_blocks
        state_idx = [layer.index for layer in spec.layers if layer.kind is not LayerKind.ATTENTION]
        names = sorted((n for _, ns in groups for n in ns), key=lambda n: (layer_index(n), n))
        if len(names) != len(state_idx):
            raise ValueError(
                f"vLLM has {len(names)} Mamba layers but {spec.name} has {len(state_idx)} state layers "
                "in hybrid-kv's spec"
            )
        index_of = dict(zip(names, state_idx))
        storage = {t.untyped_storage().data_ptr() for n, t in kv_caches.items() if n in index_of}
        if len(storage) != 1:
            raise ValueError(f"Mamba layers live in {len(storage)} allocations; vLLM's layout has exactly one")
        self.storage = flat_storage(kv_caches[names[0]])
        base = self.storage.data_ptr()
        want_conv = (
            (layout.conv_channels, layout.conv_rows)
            if layout.conv_layout == "DS"
            else (layout.conv_rows, layout.conv_channels)
        )
        want_ssm = (layout.ssm_shard.size, *spec.state.head_shape)
        self.layers: list[StateLayer] = []
        for g, ns in groups:
            for n in ns:
                vs = layer_specs[n]
                if len(vs.shapes) != 2:
                    raise ValueError(f"{n}: {len(vs.shapes)} state tensors; hybrid-kv moves conv + SSM only")
                got = (tuple(vs.shapes[0]), tuple(vs.shapes[1]))
                if got != (want_conv, want_ssm):
                    raise ValueError(
                        f"{n}: vLLM's state shapes {got} differ from hybrid-kv's {(want_conv, want_ssm)} "
                        f"for {spec.name} at TP {layout.tp_size} ({layout.conv_layout})"
                    )
                t = kv_caches[n]
                stride = t.stride(0) * t.element_size()
                if stride < layout.state_bytes:
                    raise ValueError(f"{n}: page stride {stride} B < state bytes {layout.state_bytes}")
                self.layers.append(StateLayer(n, index_of[n], g, t.data_ptr() - base, stride))
        self.groups = [g for g, _ in groups]  # the Mamba groups
        # attention layers follow the state layers in the page map (their KV moves only where vLLM's own
        # head mapping cannot: TP sizes that do not divide each other)
        self.attn_groups = list(attention.groups) if attention is not None else []
        self.attn_layers = list(attention.layers) if attention is not None else []
        self.kv_block_size = attention.block_size if attention is not None else None
        page = max(layout.state_bytes, attention.page_bytes if attention is not None else 0)
        views = [(s.offset, s.stride) for s in self.layers + self.attn_layers]
        self.pages = PageMap.of_views(views, page, num_blocks, self.storage.numel())
        self.kind = np.array([0] * len(self.layers) + [1] * len(self.attn_layers), dtype=np.int64)  # 1: attention
        self._group_layers = {
            g: np.array([i for i, s in enumerate(self.layers + self.attn_layers) if s.group == g], dtype=np.int64)
            for g in self.groups + self.attn_groups
        }

    def fingerprint(self) -> dict:
        return {
            **self.layout.fingerprint(),
            "block_size": None,  # vLLM's, checked by its own handshake
            "page_bytes": None,
            "state_layers": [[s.group, s.name] for s in self.layers],
        }

    def slots(self, blocks: Mapping[int, Sequence[int]], groups: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """(page-map layer, block id) of each slot of a request's chunk, in the order both sides use:
        per group (Mamba groups, then attention groups where the pair moves KV), per block, every layer
        of the group."""
        layer, block = [], []
        for g in groups:
            ids = np.asarray(blocks.get(g, ()), dtype=np.int64)
            pos = self._group_layers[g]
            layer.append(np.tile(pos, len(ids)))
            block.append(np.repeat(ids, len(pos)))
        return np.concatenate(layer), np.concatenate(block)

    def check_blocks(self, blocks: Mapping[int, Sequence[int]], side: str) -> None:
        known = self.groups + self.attn_groups
        for g, ids in blocks.items():
            if g not in known:
                raise ValueError(f"{side} group {g} is not a Mamba or mapped attention group (those: {known})")
            for b in ids:
                if not isinstance(b, int) or isinstance(b, bool) or not 0 <= b < self.num_blocks:
                    raise ValueError(f"{side} block id {b!r} of group {g} out of range [0, {self.num_blocks})")


def attention_pages(
    layout: RankLayout,
    groups: Sequence[tuple[int, Sequence[str]]],
    kv_caches: Mapping[str, torch.Tensor],
    base: int,
    block_size: int,
    kernel_block_size: int,
    kv_layout_name: str,
) -> AttentionPages | str:
    """This rank's full-attention page map, checked against hybrid-kv's KV page anatomy, or why there is none
    (a sentence naming the value; a pair that would need the map is refused at handshake with it).

    Needed only where the mover carries attention KV: TP sizes that do not divide each other, which vLLM's head
    mapping refuses. vLLM's per-layer view of a full-attention cache under the NIXL layout (LBHNC, reference
    §2.4) is `[num_blocks, heads_local, block_size, C]` with K||V packed per token in `C`: hybrid-kv's HND page.
    MLA's latent cache, kernel blocks smaller than the logical block and other layouts get a reason."""
    spec = layout.spec
    attn = spec.attention
    if attn is None or not groups:
        return "the model has no full-attention layers"
    if attn.latent:
        return "MLA's latent KV cache is not head-sharded (vLLM's own transfer moves it)"
    if kernel_block_size != block_size:
        return f"attention kernel blocks of {kernel_block_size} tokens in {block_size}-token blocks"
    if kv_layout_name not in ("HND", "LBHNC"):
        return f"kv cache layout {kv_layout_name!r} (hybrid-kv maps LBHNC, which the NIXL connector requires)"
    lay = RankLayout(spec, layout.tp_size, layout.tp_rank, layout.conv_layout, "HND", block_size)
    if lay.block_size != block_size:
        return f"vLLM's {block_size}-token block; hybrid-kv's rule gives {lay.block_size} for --block-size {block_size}"
    want = (lay.kv_heads_local, block_size, lay.kv_token_head_bytes)
    idx = [layer.index for layer in spec.layers if layer.kind is LayerKind.ATTENTION]
    names = sorted((n for _, ns in groups for n in ns), key=lambda n: (layer_index(n), n))
    if len(names) != len(idx):
        return f"vLLM has {len(names)} attention layers, hybrid-kv's spec {len(idx)}"
    index_of = dict(zip(names, idx))
    page = lay.block_size * lay.attn_token_bytes
    layers = []
    for g, ns in groups:
        for n in ns:
            t = kv_caches[n]
            es = t.element_size()
            got = (*t.shape[1:3], t.shape[3] * es) if t.dim() == 4 else tuple(t.shape)
            inner = (t.stride(1), t.stride(2), t.stride(3)) if t.dim() == 4 else None
            if got != want or inner != (block_size * t.shape[3], t.shape[3], 1):
                return (
                    f"{n}: vLLM's attention cache {tuple(t.shape)} (strides {t.stride()}) is not "
                    f"[blocks, heads, tokens, K||V] with {want} per page"
                )
            stride = t.stride(0) * es
            if stride < page:
                return f"{n}: page stride {stride} B < KV page {page} B"
            layers.append(StateLayer(n, index_of[n], g, t.data_ptr() - base, stride))
    return AttentionPages(tuple(g for g, _ in groups), tuple(layers), block_size, page)


Paired = tuple[Blocks, Blocks]


def _paired(local: list, remote: list, groups, cut) -> Paired:
    """Per group with ids on both sides, `cut(this side's ids, the other's, n = the shorter count)`."""
    mine, theirs = {}, {}
    for g in groups:
        lo = list(local[g]) if g < len(local) else []
        re = list(remote[g]) if g < len(remote) else []
        n = min(len(lo), len(re))
        if n:
            mine[g], theirs[g] = cut(lo, re, n)
    return mine, theirs


def pair_tail(local: list, remote: list, groups) -> Paired:
    """Per Mamba group, (this side's ids, the other side's ids) paired from the tail like vLLM (the running
    state is the last block); groups without a pair are left out (vLLM binds a load with no groups at all,
    `()`, when the decode side's prefix cache holds every block)."""
    return _paired(local, remote, groups, lambda lo, re, n: (lo[len(lo) - n :], re[len(re) - n :]))


def pair_attention(local: list, remote: list, groups) -> Paired:
    """Per attention group, (decode ids, prefill ids) paired as vLLM pairs full-attention blocks of one size:
    a shorter decode list is the uncomputed suffix (a local prefix hit: the prefill's tail), a longer one
    is cut to the prefill's count."""
    return _paired(
        local, remote, groups, lambda lo, re, n: (lo, re[len(re) - n :]) if len(lo) <= len(re) else (lo[:n], re)
    )
