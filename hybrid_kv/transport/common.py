"""What both endpoints share: the side configuration (picklable, sent to rank processes), handshake
checks and registered memory. The oracle fill / verification the driver can ask for lives in
`hybrid_kv.oracle.fill`."""

from __future__ import annotations

import resource
import time
import uuid
from dataclasses import asdict, dataclass

import torch

from hybrid_kv.batch import CacheGeometry
from hybrid_kv.layout import RankLayout
from hybrid_kv.spec import ModelSpec
from hybrid_kv.spec_hf import load_spec
from hybrid_kv.staging.handshake import peer_layout

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


check_peer = peer_layout  # the CLI's hello check (hybrid_kv.staging.handshake)


def monotonic() -> float:
    return time.monotonic()


def peak_rss() -> int:
    """This process's peak resident set, bytes (Linux reports KiB): each rank's counts carry it, so a
    run shows its real memory beside the driver's estimate."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def init_rank_process() -> None:
    """Per-process set-up of a rank: one intra-op thread. Several rank processes share the host's
    cores; torch's default (one OpenMP thread per core, spinning between regions) oversubscribes them
    and turns each pack / scatter copy into a contention storm."""
    torch.set_num_threads(1)


class RankMemory:
    """One rank's registered memory: its flat cache and its staging pool (zeroed, not empty: registered
    memory should be resident, with no first-touch faults mid-transfer), on one NIXL agent."""

    def __init__(self, cfg: SideConfig, rank: int, pool_bytes: int, role: str) -> None:
        from hybrid_kv.staging.pool import LeasedPool
        from hybrid_kv.transport.agent import Agent

        self.spec = cfg.spec()
        self.layouts = cfg.layouts(self.spec)
        self.layout = self.layouts[rank]
        self.geom = cfg.geometry(self.layout)
        self.cache = torch.empty(self.geom.nbytes, dtype=torch.uint8, device=cfg.device)
        self.staging = torch.zeros(pool_bytes, dtype=torch.uint8, device=cfg.device)
        self.pool = LeasedPool(pool_bytes)
        # unique for the process's life: an id() is reused once its object is freed, and a prefill rank
        # still holding a closed decode rank's agent refuses a new one of that name
        self.agent = Agent(f"{role}-{rank}-{uuid.uuid4().hex[:16]}")
        self.cache_reg = self.agent.register(self.cache)
        self.staging_reg = self.agent.register(self.staging)
