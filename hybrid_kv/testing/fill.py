"""The deterministic oracle fill and verification run inside the CLI's rank processes on the driver's
request (`transfer --verify`): every process derives the same global tensors from (seed, request id)."""

from __future__ import annotations

import zlib

import numpy as np
import torch

from hybrid_kv.batch import CacheGeometry, RequestBlocks
from hybrid_kv.layout import RankLayout
from hybrid_kv.testing.oracle import kv_tokens_written, random_bytes, random_global_state, write_shards
from hybrid_kv.transport.common import blocks_from


def _rng(*key: int | str) -> np.random.Generator:
    """A generator keyed by ints and strings (request ids), the same in every process."""
    return np.random.default_rng([k if isinstance(k, int) else zlib.crc32(str(k).encode()) for k in key])


def background(geom: CacheGeometry, seed: int, side: int, rank: int) -> torch.Tensor:
    """The random bytes a rank's cache starts with (side 0 = prefill, 1 = decode)."""
    return random_bytes(geom.nbytes, _rng(seed, side, rank))


def write_request(
    cache: torch.Tensor,
    layout: RankLayout,
    num_blocks: int,
    seed: int,
    req: int,
    blocks: RequestBlocks,
    tokens: int,
    prefill_block: int,
    decode_block: int,
    side: str,
) -> None:
    """Write request `req`'s oracle shards for this rank: prefill fills whole prefill blocks; decode
    expects the tokens a transfer moves."""
    filled, moved = kv_tokens_written(tokens, prefill_block, decode_block)
    g = random_global_state(layout.spec, filled, _rng(seed, 1_000_003, req))
    write_shards(cache, layout, num_blocks, g, blocks.state, list(blocks.kv), filled if side == "prefill" else moved)


def verify_cache(
    cache: torch.Tensor,
    layout: RankLayout,
    num_blocks: int,
    prefill_block: int,
    seed: int,
    requests: list[dict],
    ok_ids: set[str],
) -> list[str]:
    """A decode rank's cache against the oracle: its background plus the shards of every received
    request. Pages of failed requests are not compared: they may hold part of a request that was never
    reported as received."""
    geom = CacheGeometry.of(layout, num_blocks)
    want = background(geom, seed, 1, layout.tp_rank)
    skip = torch.zeros(geom.num_layers * geom.num_blocks, dtype=torch.bool)
    for r in requests:
        blocks = blocks_from(r["decode_blocks"])
        if r["id"] in ok_ids:
            write_request(
                want, layout, num_blocks, seed, r["id"], blocks, r["tokens"], prefill_block, layout.block_size, "decode"
            )
            continue
        for layer in layout.spec.layers:
            for b in list(blocks.kv) if layer.kind.value == "attention" else [blocks.state]:
                skip[layer.index * geom.num_blocks + b] = True
    diff = (cache.cpu().view(-1, geom.page_bytes) != want.view(-1, geom.page_bytes)).any(dim=1) & ~skip
    out = []
    for i in torch.nonzero(diff).flatten().tolist()[:5]:
        layer, block = divmod(i, geom.num_blocks)
        out.append(f"decode rank {layout.tp_rank}: layer {layer} block {block} differs from the oracle")
    return out
