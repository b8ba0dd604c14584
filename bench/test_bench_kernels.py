"""pytest-benchmark view of pack / unpack (run: `pytest bench --benchmark-only`; not part of CI).

Backends: torch everywhere; triton where it runs natively (CUDA). The table script `bench_repack.py`
adds the copy_ roofline and one-copy-per-run baselines; this file gives pytest-benchmark's statistics
(and its --benchmark-compare history) for the same cases.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hybrid_kv import ops
from hybrid_kv.batch import BatchPlan
from hybrid_kv.harness import random_blocks
from hybrid_kv.plan import TransferPlan
from hybrid_kv.spec_hf import load_spec

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = ["torch", "triton"] if DEVICE == "cuda" else ["torch"]
CASES = [("qwen3.5-27b", 1, 8), ("qwen3.5-27b", 2, 4), ("nemotron-h-8b", 2, 4), ("falcon-h1-0.5b", 1, 2)]


def _setup(model: str, p: int, d: int, requests: int):
    spec = load_spec(model).truncated(8, 2)
    plan = TransferPlan.build(spec, p, d, 512)
    plans = [plan] * requests
    rng = np.random.default_rng(0)
    nbp = max(requests, requests * plan.num_kv_blocks("prefill")) + 1
    nbd = max(requests, requests * plan.num_kv_blocks("decode")) + 1
    b = BatchPlan(
        plans,
        random_blocks(plans, "prefill", nbp, rng),
        random_blocks(plans, "decode", nbd, rng),
        nbp,
        nbd,
        template=plan,
    )
    cache_p = torch.randint(0, 256, (b.prefill_geom.nbytes,), dtype=torch.uint8, device=DEVICE)
    cache_d = torch.zeros(b.decode_geom.nbytes, dtype=torch.uint8, device=DEVICE)
    staging = torch.empty(b.stage_bytes[0], dtype=torch.uint8, device=DEVICE)
    recv = torch.empty(b.recv_bytes[0], dtype=torch.uint8, device=DEVICE)
    return b, cache_p, cache_d, staging, recv


def _run(fn):
    fn()
    if DEVICE == "cuda":
        torch.cuda.synchronize()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("requests", [1, 8])
@pytest.mark.parametrize("model,p,d", CASES, ids=[f"{m}-{p}to{d}" for m, p, d in CASES])
def test_pack(benchmark, model, p, d, requests, backend):
    b, cache_p, _, staging, _ = _setup(model, p, d, requests)
    launch = ops.Prepared(cache_p, staging, b.pack_table(0), backend=backend)
    benchmark.extra_info.update(
        bytes_rw=2 * int(launch.table[:, 2:4].prod(axis=1).sum()), segments=launch.segments, device=DEVICE
    )
    benchmark(_run, lambda: launch(cache_p, staging))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("requests", [1, 8])
@pytest.mark.parametrize("model,p,d", CASES, ids=[f"{m}-{p}to{d}" for m, p, d in CASES])
def test_unpack(benchmark, model, p, d, requests, backend):
    b, _, cache_d, _, recv = _setup(model, p, d, requests)
    launch = ops.Prepared(recv, cache_d, b.unpack_table(0), backend=backend)
    benchmark.extra_info.update(
        bytes_rw=2 * int(launch.table[:, 2:4].prod(axis=1).sum()), segments=launch.segments, device=DEVICE
    )
    benchmark(_run, lambda: launch(recv, cache_d))
