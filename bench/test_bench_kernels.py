"""pytest-benchmark view of pack / unpack (run: `pytest bench --benchmark-only`; not part of CI).

Backends: torch everywhere; triton where it runs natively (CUDA). The table script `bench_repack.py`
adds the copy_ roofline and one-copy-per-run baselines; this file gives pytest-benchmark's statistics
(and its --benchmark-compare history) for the same cases.
"""

from __future__ import annotations

import pytest
import torch
from bench_repack import bench_buffers

from hybrid_kv import ops
from hybrid_kv.plan import TransferPlan
from hybrid_kv.spec_hf import load_spec

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = ["torch", "triton"] if DEVICE == "cuda" else ["torch"]
CASES = [("qwen3.5-27b", 1, 8), ("qwen3.5-27b", 2, 4), ("nemotron-h-8b", 2, 4), ("falcon-h1-0.5b", 1, 2)]


def _run(fn):
    fn()
    if DEVICE == "cuda":
        torch.cuda.synchronize()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("stage", ["pack", "unpack"])
@pytest.mark.parametrize("requests", [1, 8])
@pytest.mark.parametrize("model,p,d", CASES, ids=[f"{m}-{p}to{d}" for m, p, d in CASES])
def test_repack(benchmark, model, p, d, requests, stage, backend):
    plan = TransferPlan.build(load_spec(model).truncated(8, 2), p, d, 512)
    batch, cache_p, cache_d, staging, recv = bench_buffers(plan, requests, DEVICE)
    src, dst, table = (
        (cache_p, staging, batch.pack_table(0)) if stage == "pack" else (recv, cache_d, batch.unpack_table(0))
    )
    launch = ops.Prepared(src, dst, table, backend=backend)
    benchmark.extra_info.update(
        bytes_rw=2 * int(launch.table[:, 2:4].prod(axis=1).sum()), segments=launch.segments, device=DEVICE
    )
    benchmark(_run, lambda: launch(src, dst))
