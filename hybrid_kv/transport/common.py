"""What both endpoints share: the side configuration (picklable, sent to rank processes), the
deterministic oracle fill / verification run inside rank processes, and handshake checks."""

from __future__ import annotations

import time
import zlib
from dataclasses import asdict, dataclass

import numpy as np
import torch

from hybrid_kv.batch import CacheGeometry, RequestBlocks
from hybrid_kv.layout import RankLayout
from hybrid_kv.oracle import kv_tokens_written, random_bytes, random_global_state, write_shards
from hybrid_kv.plan import fingerprint_diff
from hybrid_kv.spec import ModelSpec
from hybrid_kv.spec_hf import load_spec

DEFAULT_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class SideConfig:
    """One side (prefill or decode) of a deployment: model, TP, cache shape, device."""

    model: str
    tp_size: int
    num_blocks: int
    conv_layout: str = "DS"
    kv_layout: str = "HND"
    block_size: int = 16  # the user's --block-size
    conv_dtype: str | None = None
    ssm_dtype: str | None = None
    kv_dtype: str | None = None
    num_spec: int = 0
    device: str = "cpu"

    def spec(self) -> ModelSpec:
        return load_spec(
            self.model,
            conv_dtype=self.conv_dtype,
            ssm_dtype=self.ssm_dtype,
            kv_dtype=self.kv_dtype,
            num_spec=self.num_spec,
        )

    def layouts(self, spec: ModelSpec | None = None) -> list[RankLayout]:
        spec = spec or self.spec()
        return [
            RankLayout(spec, self.tp_size, r, self.conv_layout, self.kv_layout, self.block_size)
            for r in range(self.tp_size)
        ]

    def geometry(self, layout: RankLayout) -> CacheGeometry:
        return CacheGeometry.of(layout, self.num_blocks)

    def as_dict(self) -> dict:
        return asdict(self)


def hello_fields(layout: RankLayout, cfg: SideConfig) -> dict:
    """What a rank tells its peer about its pages (checked on the other side)."""
    return {
        "fingerprint": layout.fingerprint(),
        "tp_size": cfg.tp_size,
        "tp_rank": layout.tp_rank,
        "cache_block_size": cfg.block_size,
        "block_size": layout.block_size,
        "page_bytes": layout.page_bytes,
        "num_blocks": cfg.num_blocks,
    }


def check_peer(local: RankLayout, peer: dict, local_side: str, peer_side: str) -> RankLayout:
    """Validate a peer's hello against our own spec: same model and dtypes, and page anatomy consistent
    with its TP. Returns the peer's layout as we compute it. Raises ValueError naming the field."""
    for key in ("fingerprint", "tp_size", "tp_rank", "cache_block_size", "block_size", "page_bytes", "num_blocks"):
        if key not in peer:
            raise ValueError(f"{peer_side} hello lacks field {key!r}")
    a, b = (
        (local.fingerprint(), peer["fingerprint"])
        if local_side == "prefill"
        else (peer["fingerprint"], local.fingerprint())
    )
    diff = fingerprint_diff(a, b)
    if diff:
        raise ValueError(f"prefill and decode configurations differ ({diff})")
    try:
        theirs = RankLayout(
            local.spec,
            int(peer["tp_size"]),
            int(peer["tp_rank"]),
            local.conv_layout,
            local.kv_layout,
            int(peer["cache_block_size"]),
        )
    except (TypeError, ValueError) as e:
        raise ValueError(f"{peer_side} tp_size={peer.get('tp_size')} / tp_rank={peer.get('tp_rank')}: {e}") from e
    for key in ("block_size", "page_bytes"):
        if getattr(theirs, key) != peer[key]:
            raise ValueError(
                f"{peer_side} {key}={peer[key]} but the model at TP {peer['tp_size']} gives {getattr(theirs, key)}"
            )
    return theirs


# ---- deterministic oracle, per rank process ---------------------------------------------------------------


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


def blocks_from(obj) -> RequestBlocks:
    state, kv = obj
    return RequestBlocks(None if state is None else int(state), tuple(int(b) for b in kv))


def monotonic() -> float:
    return time.monotonic()


def init_rank_process() -> None:
    """Per-process set-up of a rank: one intra-op thread. Several rank processes share the host's
    cores; torch's default (one OpenMP thread per core, spinning between regions) oversubscribes them
    and turns each pack / scatter copy into a contention storm."""
    torch.set_num_threads(1)


class RankMemory:
    """One rank's registered memory: its flat cache and its staging pool (zeroed, not empty: registered
    memory should be resident, with no first-touch faults mid-transfer), on one NIXL agent."""

    def __init__(self, cfg: SideConfig, rank: int, pool_bytes: int, role: str) -> None:
        from hybrid_kv.transport.agent import Agent
        from hybrid_kv.transport.pool import StagingPool

        self.spec = cfg.spec()
        self.layouts = cfg.layouts(self.spec)
        self.layout = self.layouts[rank]
        self.geom = cfg.geometry(self.layout)
        self.cache = torch.empty(self.geom.nbytes, dtype=torch.uint8, device=cfg.device)
        self.staging = torch.zeros(pool_bytes, dtype=torch.uint8, device=cfg.device)
        self.pool = StagingPool(pool_bytes)
        self.agent = Agent(f"{role}-{rank}-{id(self):x}")
        self.cache_reg = self.agent.register(self.cache)
        self.staging_reg = self.agent.register(self.staging)


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
