"""The CLI's calibration for the auto mode (the formula is `hybrid_kv.staging.cost`'s, shared with the
vLLM connector), measured by each decode rank at start-up.

Packing a run of b bytes costs two copies of b (pack on the source, scatter here); reading it directly
costs one more NIXL descriptor. So runs shorter than `desc_cost * copy_bw / 2` are candidates for
packing, and a pair packs them only if the descriptors saved also pay for one side-channel round trip
plus those copies at the source packer's load (it serves every decode rank reading from it, each with
`concurrency` requests in flight).
"""

from __future__ import annotations

import time

import numpy as np

from hybrid_kv.plan import TransferPlan
from hybrid_kv.staging import messages as M
from hybrid_kv.staging.cost import CAL_DESCS, CAL_REPEATS, CAL_SIZE, packing_pays
from hybrid_kv.staging.cost import copy_gbps as measure_copy_gbps
from hybrid_kv.staging.cost import desc_cost_us as measure_desc_cost_us
from hybrid_kv.staging.cost import median as _median
from hybrid_kv.staging.wire import expect, send_msg


def calibrate(ep, src) -> dict:
    """Measure (unless configured) copy bandwidth, per-descriptor cost and round trip against `src`."""
    opts = ep.opts
    copy_gbps, desc_us, rtt_us = opts.copy_gbps, opts.desc_cost_us, 0.0
    if copy_gbps is None:
        half = min(32 << 20, ep.pool.capacity // 2)
        copy_gbps = measure_copy_gbps(ep.recv[:half], ep.recv[half : 2 * half])
    span = CAL_DESCS * CAL_SIZE
    if desc_us is None and src is not None and min(ep.pool.capacity, src.info["staging"]["nbytes"]) >= span:
        rb, sb = ep.recv_reg["addr"], src.info["staging"]["addr"]

        def timed(n: int, size: int) -> float:
            offs = np.arange(n, dtype=np.int64) * size
            local, remote = np.stack([rb + offs, np.full(n, size)], 1), np.stack([sb + offs, np.full(n, size)], 1)
            return ep.timed_read(src, local, remote)

        desc_us = measure_desc_cost_us(timed)
    if src is not None:
        ts = []
        for _ in range(CAL_REPEATS):
            t = time.monotonic()
            send_msg(src.sock, {"type": M.PING})
            msgs = src.reader.wait(time.monotonic() + opts.handshake_timeout_s, f"prefill rank {src.rank}: ping")
            expect(msgs[0][0], M.PONG)
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
    return packing_pays(runs, nbytes, cost, load, round_trips=1)
