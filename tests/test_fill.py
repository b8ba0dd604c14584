"""The CLI ranks' page-by-page oracle (`hybrid_kv.oracle.fill`): the bytes it writes equal the whole-cache
oracle's (`write_shards` on a flat cache), and its verifier names exactly the pages that differ."""

import numpy as np
import torch
from bytecheck import assert_same_bytes

from hybrid_kv.batch import CacheGeometry, RequestBlocks
from hybrid_kv.layout import RankLayout
from hybrid_kv.oracle import fill
from hybrid_kv.oracle.state import kv_tokens_written, random_global_state, write_shards
from hybrid_kv.spec_hf import load_spec

SEED = 4


def _setup():
    spec = load_spec("falcon-h1-0.5b").truncated(2, 1)
    lay = RankLayout(spec, 2, 1)
    geom = CacheGeometry.of(lay, 9)
    bs = lay.block_size
    reqs = [
        {"id": "a", "tokens": 3 * bs - 5, "decode_blocks": [4, [7, 0, 2]]},
        {"id": "b", "tokens": 1, "decode_blocks": [8, [5]]},
        {"id": "c", "tokens": bs + 1, "decode_blocks": [1, [3, 6]]},
    ]
    return lay, geom, reqs


def _whole_cache_oracle(lay, geom, reqs, ok):
    """The expected decode cache built the other way: background page by page into one flat buffer,
    then each received request's shards with the flat addressing of `write_shards`."""
    want = torch.empty(geom.nbytes, dtype=torch.uint8)
    for layer in range(geom.num_layers):
        for b in range(geom.num_blocks):
            off = geom.block_offset(layer, b)
            want[off : off + geom.page_bytes] = fill.background_page(SEED, 1, lay.tp_rank, layer, b, geom.page_bytes)
    for r in reqs:
        if r["id"] in ok:
            _, moved = kv_tokens_written(r["tokens"], lay.block_size, lay.block_size)
            g = random_global_state(lay.spec, moved, fill._rng(SEED, 1_000_003, r["id"]))
            state, kv = r["decode_blocks"]
            write_shards(want, lay, geom.num_blocks, g, state, kv, moved)
    return want


def test_page_by_page_equals_the_whole_cache_oracle():
    lay, geom, reqs = _setup()
    cache = torch.zeros(geom.nbytes, dtype=torch.uint8)
    fill.fill_background(cache, geom, SEED, 1, lay.tp_rank)
    for r in reqs[:2]:
        state, kv = r["decode_blocks"]
        blocks = RequestBlocks(state, tuple(kv))
        bs = lay.block_size
        fill.write_request(cache, geom, lay, SEED, r["id"], blocks, r["tokens"], bs, bs, "decode")
    assert_same_bytes(cache, _whole_cache_oracle(lay, geom, reqs, {"a", "b"}), "decode cache")
    assert fill.verify_cache(cache, lay, geom.num_blocks, lay.block_size, SEED, reqs, {"a", "b"}) == []


def test_verifier_names_each_differing_page_and_skips_failed_requests():
    lay, geom, reqs = _setup()
    good = _whole_cache_oracle(lay, geom, reqs, {"a", "b"})

    def verify(cache):
        return fill.verify_cache(cache, lay, geom.num_blocks, lay.block_size, SEED, reqs, {"a", "b"})

    rng = np.random.default_rng(0)
    for layer, block, why in [
        (0, 4, "a's state page"),
        (2, 8, "b's state page, second Mamba layer"),
        (1, 0, "a's second KV block"),
        (1, 5, "b's KV block (its one token: the rest of the block is background)"),
        (2, 6, "a state page of no request (6 is one of c's KV ids, not a state id)"),
        (0, 0, "a state page of no request"),
    ]:
        cache = good.clone()
        off = geom.block_offset(layer, block) + int(rng.integers(geom.page_bytes))
        cache[off] ^= 0x01
        assert verify(cache) == [f"decode rank 1: layer {layer} block {block} differs from the oracle"], why
    for layer, block in [(0, 1), (2, 1), (1, 3), (1, 6)]:  # pages of c, which failed: not compared
        cache = good.clone()
        cache[geom.block_offset(layer, block)] ^= 0xFF
        assert verify(cache) == []
