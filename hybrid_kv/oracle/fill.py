"""The deterministic oracle fill and verification run inside the CLI's rank processes on the driver's
request (`transfer --verify`): every process derives the same bytes from (seed, side, rank, page) and
(seed, request id), page by page, so neither side ever holds a second copy of its cache: the prefill
writes straight into its pages, the decode compares one request's pages (or one background page) at a
time."""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterator

import numpy as np
import torch

from hybrid_kv.batch import CacheGeometry, RequestBlocks, blocks_from
from hybrid_kv.layout import RankLayout
from hybrid_kv.oracle.state import kv_tokens_written, random_bytes, random_global_state, write_shards


def _rng(*key: int | str) -> np.random.Generator:
    """A generator keyed by ints and strings (request ids), the same in every process."""
    return np.random.default_rng([k if isinstance(k, int) else zlib.crc32(str(k).encode()) for k in key])


def background_page(seed: int, side: int, rank: int, layer: int, block: int, page_bytes: int) -> torch.Tensor:
    """The random bytes page (layer, block) of a rank's cache starts with (side 0 = prefill, 1 = decode)."""
    return random_bytes(page_bytes, _rng(seed, side, rank, layer, block))


def fill_background(cache: torch.Tensor, geom: CacheGeometry, seed: int, side: int, rank: int) -> None:
    """Every page of `cache` (any device) set to its background, one page at a time."""
    for layer in range(geom.num_layers):
        for block in range(geom.num_blocks):
            off = geom.block_offset(layer, block)
            cache[off : off + geom.page_bytes].copy_(background_page(seed, side, rank, layer, block, geom.page_bytes))


def request_pages(blocks: RequestBlocks, layout: RankLayout) -> Iterator[tuple[int, int]]:
    """The (layer, block) pages a request's blocks name on this rank."""
    for layer in layout.spec.layers:
        ids = list(blocks.kv) if layer.kind.value == "attention" else [blocks.state]
        yield from ((layer.index, b) for b in ids if b is not None)


def oracle_pages(
    layout: RankLayout,
    seed: int,
    req: str,
    blocks: RequestBlocks,
    tokens: int,
    prefill_block: int,
    decode_block: int,
    side: str,
    base: Callable[[int, int], torch.Tensor],
) -> dict[tuple[int, int], torch.Tensor]:
    """Request `req`'s pages on this rank as the oracle has them: each page starts as `base(layer, block)`
    (a host copy) with the request's shards written in (prefill fills whole prefill blocks; decode expects
    the tokens a transfer moves)."""
    filled, moved = kv_tokens_written(tokens, prefill_block, decode_block)
    g = random_global_state(layout.spec, filled, _rng(seed, 1_000_003, req))
    pages = {key: base(*key).cpu().clone() for key in request_pages(blocks, layout)}
    write_shards(
        torch.empty(0, dtype=torch.uint8),
        layout,
        1,
        g,
        blocks.state,
        list(blocks.kv),
        filled if side == "prefill" else moved,
        page_of=lambda layer, block: pages[(layer, block)],
    )
    return pages


def write_request(
    cache: torch.Tensor,
    geom: CacheGeometry,
    layout: RankLayout,
    seed: int,
    req: str,
    blocks: RequestBlocks,
    tokens: int,
    prefill_block: int,
    decode_block: int,
    side: str,
) -> None:
    """Write request `req`'s oracle shards into this rank's pages (any device)."""

    def page(layer: int, block: int) -> torch.Tensor:
        off = geom.block_offset(layer, block)
        return cache[off : off + geom.page_bytes]

    for (layer, block), want in oracle_pages(
        layout, seed, req, blocks, tokens, prefill_block, decode_block, side, page
    ).items():
        page(layer, block).copy_(want)


def verify_cache(
    cache: torch.Tensor,
    layout: RankLayout,
    num_blocks: int,
    prefill_block: int,
    seed: int,
    requests: list[dict],
    ok_ids: set[str],
) -> list[str]:
    """A decode rank's cache against the oracle: the pages of every received request hold its shards on
    the background, every page of no request holds the background. Pages of failed requests are not
    compared: they may hold part of a request that was never reported as received. Holds one request's
    pages at a time, never a copy of the cache."""
    geom = CacheGeometry.of(layout, num_blocks)
    rank, page_bytes = layout.tp_rank, geom.page_bytes

    def got(layer: int, block: int) -> torch.Tensor:
        off = geom.block_offset(layer, block)
        return cache[off : off + page_bytes].cpu()

    def bg(layer: int, block: int) -> torch.Tensor:
        return background_page(seed, 1, rank, layer, block, page_bytes)

    bad: list[tuple[int, int]] = []
    owned: set[tuple[int, int]] = set()
    for r in requests:
        blocks = blocks_from(r["decode_blocks"])
        owned.update(request_pages(blocks, layout))
        if r["id"] not in ok_ids:
            continue
        want = oracle_pages(layout, seed, r["id"], blocks, r["tokens"], prefill_block, layout.block_size, "decode", bg)
        bad += [key for key, page in want.items() if not torch.equal(got(*key), page)]
    for layer in range(geom.num_layers):
        for block in range(geom.num_blocks):
            if (layer, block) not in owned and not torch.equal(got(layer, block), bg(layer, block)):
                bad.append((layer, block))
    return [
        f"decode rank {rank}: layer {layer} block {block} differs from the oracle" for layer, block in sorted(bad)[:5]
    ]
