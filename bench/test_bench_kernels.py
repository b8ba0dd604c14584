"""pytest-benchmark view of pack / unpack (run: `pytest bench --benchmark-only`; not part of CI).

The shipped copier (`hybrid_kv.staging.copier`): torch everywhere; triton (the slot-copy kernel) where it
runs natively (CUDA). The table script `bench_repack.py` adds the copy_ and SM-copy baselines; this file
gives pytest-benchmark's statistics (and its --benchmark-compare history) for the same cases.
"""

from __future__ import annotations

import pytest
import torch
from bench_repack import bench_buffers

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
    copier, jobs = bench_buffers(plan, requests, DEVICE, backend)[stage]
    benchmark.extra_info.update(
        bytes_rw=2 * sum(sum(c.unit_bytes) for c, _ in jobs), slots=sum(len(c.tpl) for c, _ in jobs), device=DEVICE
    )
    benchmark(_run, lambda: copier.run(jobs).wait())
