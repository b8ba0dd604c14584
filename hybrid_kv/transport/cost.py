"""The auto mode's cost model, measured by each decode rank at start-up.

Packing a run of b bytes costs two copies of b (pack on the source, scatter here); reading it directly
costs one more NIXL descriptor. So runs shorter than `desc_cost * copy_bw / 2` are candidates for
packing, and a pair packs them only if the descriptors saved also pay for one side-channel round trip
plus those copies at the source packer's load (it serves every decode rank reading from it, each with
`concurrency` requests in flight).
"""

from __future__ import annotations

import time

import numpy as np
import torch

from hybrid_kv.plan import TransferPlan
from hybrid_kv.transport.wire import expect, recv_msg, send_msg

CAL_DESCS, CAL_SIZE, CAL_REPEATS = 256, 4096, 5


def _median(xs: list[float]) -> float:
    return sorted(xs)[len(xs) // 2]


def calibrate(ep, src) -> dict:
    """Measure (unless configured) copy bandwidth, per-descriptor cost and round trip against `src`."""
    opts = ep.opts
    copy_gbps, desc_us, rtt_us = opts.copy_gbps, opts.desc_cost_us, 0.0
    if copy_gbps is None:
        half = min(32 << 20, ep.pool.capacity // 2)
        a, b = ep.recv[:half], ep.recv[half : 2 * half]

        def copy_once() -> float:
            t = time.monotonic()
            b.copy_(a)
            if ep.cfg.device.startswith("cuda"):
                torch.cuda.synchronize()
            return time.monotonic() - t

        copy_gbps = half / _median([copy_once() for _ in range(CAL_REPEATS)]) / 1e9
    n, size = CAL_DESCS, CAL_SIZE
    if desc_us is None and src is not None and min(ep.pool.capacity, src.info["staging"]["nbytes"]) >= n * size:
        rb, sb = ep.recv_reg["addr"], src.info["staging"]["addr"]
        offs = np.arange(n, dtype=np.int64) * size
        many = (np.stack([rb + offs, np.full(n, size)], 1), np.stack([sb + offs, np.full(n, size)], 1))
        one = (np.array([[rb, n * size]], dtype=np.int64), np.array([[sb, n * size]], dtype=np.int64))
        t_many = _median([ep.timed_read(src, *many) for _ in range(CAL_REPEATS)])
        t_one = _median([ep.timed_read(src, *one) for _ in range(CAL_REPEATS)])
        desc_us = max(0.0, t_many - t_one) / (n - 1) * 1e6
    if src is not None:
        ts = []
        for _ in range(CAL_REPEATS):
            t = time.monotonic()
            send_msg(src.sock, {"type": "ping"})
            expect(recv_msg(src.sock, opts.handshake_timeout_s)[0], "pong")
            ts.append(time.monotonic() - t)
        rtt_us = _median(ts) * 1e6
    desc_us = desc_us or 0.0
    return {
        "desc_cost_us": desc_us,
        "copy_gbps": copy_gbps,
        "rtt_us": rtt_us,
        "threshold_bytes": int(desc_us * 1e-6 * copy_gbps * 1e9 / 2),
    }


def pack_pays(plan: TransferPlan, src_rank: int, dst_rank: int, packed: dict, cost: dict, concurrency: int) -> bool:
    """Whether pair (src_rank -> dst_rank) should pack the pieces `packed` holds for it."""
    lay = packed.get((src_rank, dst_rank))
    if lay is None or not lay.pieces:
        return False
    runs = sum(x.runs for x in lay.pieces)
    nbytes = sum(x.nbytes for x in lay.pieces)
    load = sum(1 for (q, _) in plan.pairs if q == src_rank) * concurrency
    saved = runs * cost["desc_cost_us"]
    spent = cost["rtt_us"] + 2 * nbytes / (cost["copy_gbps"] * 1e3) * load
    return saved > spent
