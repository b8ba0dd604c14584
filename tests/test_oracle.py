"""`oracle.read_shards` (used by the in-engine byte checks) inverts `oracle.write_shards` on every family."""

import numpy as np
import pytest
import torch
from conftest import fits

from hybrid_kv.layout import RankLayout
from hybrid_kv.oracle.state import random_global_state, read_shards, write_shards
from hybrid_kv.spec import LayerKind
from hybrid_kv.spec_hf import load_spec

CASES = [
    ("qwen3-next-80b-a3b", 4, "DS", "HND"),  # GDN q|k|v
    ("nemotron-h-8b", 2, "SD", "NHD"),  # Mamba2 x|B|C, SD conv layout
    ("falcon-h1-0.5b", 2, "DS", "HND"),  # a single Mamba2 group, replicated on every rank
    ("jamba-v0.1", 2, "DS", "HND"),  # Mamba1
    ("qwen3.5-0.8b", 4, "DS", "HND"),  # 2 KV heads at TP 4: heads replicated
    ("kimi-linear-48b-a3b", 2, "SD", "NHD"),  # KDA q|k|v; MLA latent on every rank
]


def _trim(spec, n: int = 6):
    from dataclasses import replace

    layers = []
    for kind in (LayerKind.ATTENTION, spec.state.kind):  # keep both kinds
        layers += [x for x in spec.layers if x.kind is kind][: n // 2]
    layers = tuple(replace(x, index=i) for i, x in enumerate(sorted(layers, key=lambda x: x.index)))
    return replace(spec, layers=layers)


def _ranks(spec, tp, conv, kv, state, blocks=3):
    lays = [RankLayout(spec, tp, r, conv, kv, 16) for r in range(tp)]
    caches = [torch.zeros(len(spec.layers) * blocks * lay.page_bytes, dtype=torch.uint8) for lay in lays]
    state_block = {x.index: 1 for x in spec.layers if x.kind is not LayerKind.ATTENTION}
    kv_blocks = {x.index: [2, 0] for x in spec.layers if x.kind is LayerKind.ATTENTION}
    n_tok = 2 * lays[0].block_size
    for lay, c in zip(lays, caches):
        write_shards(c, lay, blocks, state, state_block, kv_blocks, n_tok)

    def page_of(c, lay):
        return lambda layer, b: c[(layer * blocks + b) * lay.page_bytes : (layer * blocks + b + 1) * lay.page_bytes]

    return lays, [page_of(c, lay) for c, lay in zip(caches, lays)], state_block, kv_blocks


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


@pytest.mark.parametrize("name,tp,conv,kv", CASES)
def test_read_shards_inverts_write_shards(name, tp, conv, kv):
    spec = _trim(load_spec(name))
    assert fits(spec, tp)
    lays = [RankLayout(spec, tp, 0, conv, kv, 16)]
    state = random_global_state(spec, 2 * lays[0].block_size, np.random.default_rng(7))
    lays, pages, sb, kb = _ranks(spec, tp, conv, kv, state)
    got = read_shards(lays, pages, sb, kb)
    for i in state.ssm:
        assert _same(got.ssm[i], state.ssm[i]), f"layer {i} SSM"
        for j, (g, w) in enumerate(zip(got.conv[i], state.conv[i])):
            assert _same(g, w), f"layer {i} conv part {j}"
    for i in state.kv:
        assert _same(got.kv[i], state.kv[i]), f"layer {i} KV"


def test_read_shards_refuses_ranks_that_disagree_on_replicated_rows():
    spec = _trim(load_spec("falcon-h1-0.5b"))
    lay0 = RankLayout(spec, 2, 0, "DS", "HND", 16)
    state = random_global_state(spec, 2 * lay0.block_size, np.random.default_rng(3))
    lays, pages, sb, kb = _ranks(spec, 2, "DS", "HND", state)
    layer = next(iter(sb))
    x = lays[1].conv_parts[0]  # rank 1's x channels come first; B (replicated) follows
    off = x.channels * lays[1].conv_rows * 2  # bf16: first byte of rank 1's B
    pages[1](layer, sb[layer])[off] ^= 0xFF
    with pytest.raises(ValueError, match="replicated rows"):
        read_shards(lays, pages, sb, kb)
