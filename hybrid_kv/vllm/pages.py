"""What vLLM allocated, in hybrid-kv's terms: the model spec with vLLM's cache dtypes (`model_spec`), and
one rank's full-attention pages, checked against hybrid-kv's KV page anatomy (`attention_pages`).

The attention pages are only needed where the packed worker moves attention KV itself: TP sizes that do
not divide each other, which vLLM's head mapping refuses (`hybrid_kv.vllm.anytp`). vLLM's per-layer view of
a full-attention cache under the NIXL layout (LBHNC, reference §2.4) is `[num_blocks, heads_local,
block_size, C]` with K||V packed per token in `C`: hybrid-kv's HND page. Anything else (MLA's latent cache,
kernel blocks smaller than the logical block, another layout) gets a reason instead of a map, and a pair
that would need it is refused at handshake with that reason.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from hybrid_kv.dtypes import TORCH_DTYPES
from hybrid_kv.layout import RankLayout
from hybrid_kv.mover.geometry import AttentionPages, StateLayer, layer_index
from hybrid_kv.spec import LayerKind, ModelSpec
from hybrid_kv.spec_hf import spec_from_config

_DTYPE_NAMES = {v: k for k, v in TORCH_DTYPES.items()}


def _dtype_name(dt: torch.dtype, what: str) -> str:
    if dt not in _DTYPE_NAMES:
        raise ValueError(f"{what} dtype {dt} is not supported by hybrid-kv (supported: {', '.join(TORCH_DTYPES)})")
    return _DTYPE_NAMES[dt]


def model_spec(hf_config: Mapping, mamba_spec, attn_spec, name: str) -> ModelSpec:
    """hybrid-kv's ModelSpec of a vLLM model: parsed from its HF config, with the cache dtypes and the
    speculative conv rows vLLM actually allocated (taken from its own MambaSpec / FullAttentionSpec)."""
    spec = spec_from_config(dict(hf_config), name=name)
    if spec.state is None:
        raise ValueError(f"{name}: hybrid-kv found no recurrent-state layers in this model")
    spec = spec.with_dtypes(
        conv_dtype=_dtype_name(mamba_spec.dtypes[0], "conv state"),
        ssm_dtype=_dtype_name(mamba_spec.dtypes[1], "SSM state"),
        kv_dtype=_dtype_name(attn_spec.dtype, "attention KV") if attn_spec is not None else None,
    )
    rows = min(mamba_spec.shapes[0])  # conv rows = kernel - 1 + num_spec in either conv layout
    extra = rows - spec.state.conv_rows
    if extra > 0:
        spec = spec.with_num_spec(extra)
    return spec


def attention_pages(
    layout: RankLayout,
    groups: Sequence[tuple[int, Sequence[str]]],
    kv_caches: Mapping[str, torch.Tensor],
    base: int,
    block_size: int,
    kernel_block_size: int,
    kv_layout_name: str,
) -> AttentionPages | str:
    """The attention page map of this rank, or why there is none (a sentence naming the value)."""
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
