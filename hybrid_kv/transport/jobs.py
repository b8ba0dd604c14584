"""A transfer job: its sides and options, its requests (block ids, waves) and the memory its ranks need."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from hybrid_kv.plan import TransferPlan
from hybrid_kv.transport.common import SideConfig
from hybrid_kv.transport.decode import DecodeOptions
from hybrid_kv.transport.prefill import PrefillOptions


@dataclass
class TransferJob:
    prefill: SideConfig
    decode: SideConfig
    requests: int = 8
    tokens: int = 1024
    lengths: tuple[int, ...] = ()  # if given, request i has lengths[i % len(lengths)] tokens (else `tokens`)
    concurrency: int = 4
    in_flight: int | None = None  # requests whose blocks the caches hold at once (None: all of them)
    seed: int = 0
    verify: bool = True
    prefill_opts: PrefillOptions = field(default_factory=PrefillOptions)
    decode_opts: DecodeOptions = field(default_factory=DecodeOptions)
    start_timeout_s: float = 120.0
    run_timeout_s: float = 600.0


def lanes_of(job: TransferJob) -> int:
    """How many requests' blocks each rank's cache holds: `in_flight` (at most `requests`), else all."""
    if job.in_flight is None:
        return job.requests
    if job.in_flight < 1:
        raise ValueError(f"in_flight={job.in_flight} (accepted: an integer >= 1, or None for every request)")
    return min(job.in_flight, job.requests)


def plan_requests(job: TransferJob) -> tuple[TransferPlan, list[dict], int, int]:
    """The template plan, the request list (random interleaved block ids) and each side's block count.

    With `in_flight` = L < requests the run goes in waves of L requests ("wave" in each request): request i
    takes lane i % L's blocks (as many as it needs), so the caches are sized for L requests, whatever the
    number of requests; the requests of one wave never share a block."""
    from hybrid_kv.batch import RequestBlocks
    from hybrid_kv.harness import random_batch

    spec = job.prefill.spec()
    plan = TransferPlan(job.prefill.layouts(spec), job.decode.layouts(spec), job.tokens)
    tokens = [job.lengths[i % len(job.lengths)] if job.lengths else job.tokens for i in range(job.requests)]
    lanes = lanes_of(job)
    longest = [max(tokens[lane::lanes]) for lane in range(lanes)]  # a lane's blocks fit its longest request
    batch = random_batch(plan, longest, np.random.default_rng(job.seed), spare_blocks=2)
    nbp, nbd = batch.prefill_geom.num_blocks, batch.decode_geom.num_blocks
    reqs = []
    for i, t in enumerate(tokens):
        per = plan.for_tokens(t)
        b, d = batch.prefill_blocks[i % lanes], batch.decode_blocks[i % lanes]
        b = RequestBlocks(b.state, b.kv[: per.num_kv_blocks("prefill")])
        d = RequestBlocks(d.state, d.kv[: per.num_kv_blocks("decode")])
        reqs.append(
            {
                "id": f"req-{i}",
                "tokens": t,
                "wave": i // lanes,
                "prefill_blocks": [b.state, list(b.kv)],
                "decode_blocks": [d.state, list(d.kv)],
            }
        )
    return plan, reqs, nbp, nbd


ORACLE_WORKING_SET = 1.5  # times one request's bytes: its whole state, this rank's pages and temporaries


def memory_estimate(job: TransferJob) -> dict:
    """Bytes the rank processes will hold: caches for the blocks of the requests in flight (`in_flight`,
    else all of them), staging pools, a fixed cost per process (Python, torch, UCX) and the oracle's
    working set (it writes, and verifies, one request at a time: that request's unsharded state and this
    rank's pages of it; measured at about 1.5x the request's bytes, the factor used here). Per rank: its
    peak; in total: what is held at once. Each run reports its ranks' peak resident sets beside this."""
    plan, reqs, nbp, nbd = plan_requests(job)
    n_layers = len(plan.spec.layers)
    per_process = 400 << 20
    oracle = int(ORACLE_WORKING_SET * max(plan.for_tokens(t).bytes_moved() for t in {r["tokens"] for r in reqs}))
    prefill = n_layers * max(job.prefill.num_blocks, nbp) * plan.prefill[0].page_bytes + job.prefill_opts.pool_bytes
    decode = n_layers * max(job.decode.num_blocks, nbd) * plan.decode[0].page_bytes
    decode = decode + job.decode_opts.pool_bytes
    o_p, o_d = oracle, (oracle if job.verify else 0)
    total = plan.prefill_tp * (prefill + per_process) + plan.decode_tp * (decode + per_process)
    # The prefill ranks fill before a wave runs and the decode ranks verify after it (the driver waits for
    # every decode rank before the next fill): the two sides' working sets are never held at once.
    total += max(plan.prefill_tp * o_p, plan.decode_tp * o_d)
    return {
        "total": total,
        "prefill_rank": prefill + o_p + per_process,
        "decode_rank": decode + o_d + per_process,
        "processes": plan.prefill_tp + plan.decode_tp,
    }


def available_memory() -> int | None:
    """MemAvailable of this machine (Linux), or None where it cannot be read."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None
