"""Host time per request of today's packed path, next to the strided path's, on the real device.

For one request (block ids drawn at random in caches on `--device`), per (prefill rank 0 -> decode rank 0):
  packed  : block ids -> segment table (`request_tables` + `pack`) -> `Prepared` (validation, tiling,
            table upload) -> the launch call; the copy itself is excluded (synchronized before timing stops
            only on the launch, which is asynchronous on CUDA)
  strided : block ids -> the list of (address, bytes) descriptors the strided path posts, one per run
            (what vLLM's stock worker builds per request; NIXL's own posting cost is not included)
Thread CPU time (time.thread_time_ns), median and spread over --repeats. Prints / writes one JSON object.

    python bench/gpu/host_time.py [--device cuda] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import torch

from hybrid_kv.batch import request_tables
from hybrid_kv.ops import Prepared
from hybrid_kv.plan import TransferPlan
from hybrid_kv.spec_hf import load_spec
from hybrid_kv.testing.harness import random_batch

CASES = [("qwen3.5-27b", 2, 4, 8192), ("qwen3.5-397b-a17b", 8, 4, 8192), ("nemotron-h-8b", 1, 2, 8192)]


def _stats(ns: list[int]) -> dict:
    us = sorted(x / 1e3 for x in ns)
    return {"median": statistics.median(us), "min": us[0], "max": us[-1], "n": len(us)}


def measure(model: str, p: int, d: int, tokens: int, device: str, repeats: int) -> dict:
    plan = TransferPlan.build(load_spec(model), p, d, tokens)
    batch = random_batch(plan, [tokens], np.random.default_rng(0), spare_blocks=2)
    gp, gd = batch.prefill_geom, batch.decode_geom
    cache = torch.zeros(gp.nbytes, dtype=torch.uint8, device=device)
    staging = torch.zeros(max(batch.stage_bytes), dtype=torch.uint8, device=device)
    backend = "triton" if device.startswith("cuda") else "torch"
    rng = np.random.default_rng(1)
    packed, strided = [], []
    for _ in range(repeats + 1):  # the first round warms up (kernel compile, allocator)
        batch = random_batch(plan, [tokens], rng, spare_blocks=2)  # fresh block ids: nothing cached per request
        pb, db = batch.prefill_blocks[0], batch.decode_blocks[0]
        t0 = time.thread_time_ns()
        t = request_tables(plan, pb, db, gp, gd, src_rank=0, dst_rank=0)[(0, 0)]
        run = Prepared(cache, staging, t.pack(), backend=backend)
        run(cache, staging)
        packed.append(time.thread_time_ns() - t0)
        t0 = time.thread_time_ns()
        t = request_tables(plan, pb, db, gp, gd, src_rank=0, dst_rank=0)[(0, 0)]
        s = t.strided()
        base_s, base_d = cache.data_ptr(), cache.data_ptr()
        descs = [(base_s + int(a), base_d + int(b), int(n)) for a, b, n in zip(s[:, 0], s[:, 1], s[:, 3])]
        strided.append(time.thread_time_ns() - t0)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return {
        "model": model,
        "prefill_tp": p,
        "decode_tp": d,
        "tokens": tokens,
        "device": device,
        "packed_host_us": _stats(packed[1:]),
        "strided_host_us": _stats(strided[1:]),
        "strided_descriptors": len(descs),
        "packed_segments": run.segments,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--json", default="")
    a = ap.parse_args(argv)
    rows = [measure(m, p, d, t, a.device, a.repeats) for m, p, d, t in CASES]
    out = {
        "rows": rows,
        "torch": torch.__version__,
        "device_name": torch.cuda.get_device_name(0) if a.device.startswith("cuda") else "cpu",
    }
    text = json.dumps(out, indent=1)
    print(text)
    if a.json:
        with open(a.json, "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
