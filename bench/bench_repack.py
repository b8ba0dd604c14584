"""Pack / unpack bandwidth on one prefill rank and one decode rank, against baselines measured in the
same run on the same device:

* roofline   - torch `copy_` of the same number of contiguous bytes;
* torch      - hybrid-kv's reference backend (one strided copy per segment);
* per-run    - one `copy_` per contiguous run (what one-descriptor-per-run costs as local copies);
* triton     - the segment-copy kernel (one launch per rank), where it runs natively (CUDA).

Bandwidth = (bytes read + bytes written) / median time, after warm-up; on CUDA the L2 is flushed
before each timed run. Prints a table and writes CSV rows (device, versions, date, git sha each).

    python bench/bench_repack.py [--device cuda] [--requests 1 8 64] [--layers 8,2] [--csv out.csv]
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import platform
import statistics
import subprocess
import sys
import time

import numpy as np
import torch

from hybrid_kv import ops
from hybrid_kv.batch import expand_rows
from hybrid_kv.plan import TransferPlan
from hybrid_kv.spec_hf import load_spec
from hybrid_kv.testing.harness import random_batch

CASES = [
    ("qwen3.5-27b", 1, 8),
    ("qwen3.5-27b", 8, 1),
    ("qwen3.5-27b", 2, 4),
    ("qwen3.5-397b-a17b", 4, 8),
    ("nemotron-h-8b", 2, 4),
    ("nemotron-h-8b", 4, 2),
    ("falcon-h1-0.5b", 1, 2),
]


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timeit(fn, device: str, repeats: int, warmup: int = 2) -> list[float]:
    flush = torch.empty(256 << 20, dtype=torch.uint8, device=device) if device.startswith("cuda") else None
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeats):
        if flush is not None:
            flush.zero_()  # evict L2 (50 MB on H100) so every run reads from HBM
        _sync(device)
        t = time.perf_counter()
        fn()
        _sync(device)
        out.append(time.perf_counter() - t)
    return out


def environment(device: str) -> dict:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        sha = ""
    try:
        import triton

        tv = triton.__version__
    except ImportError:
        tv = "-"
    name = torch.cuda.get_device_name() if device.startswith("cuda") else platform.processor() or platform.machine()
    return {
        "device": name,
        "torch": torch.__version__,
        "triton": tv,
        "date": dt.date.today().isoformat(),
        "git": sha,
    }


def bench_buffers(plan: TransferPlan, requests: int, device: str):
    """A random batch of `requests` requests and the buffers of prefill rank 0 and decode rank 0:
    (batch, prefill cache, decode cache, prefill staging, decode receive staging)."""
    batch = random_batch(plan, [plan.tokens] * requests, np.random.default_rng(0), spare_blocks=1)
    cache_p = torch.randint(0, 256, (batch.prefill_geom.nbytes,), dtype=torch.uint8, device=device)
    cache_d = torch.zeros(batch.decode_geom.nbytes, dtype=torch.uint8, device=device)
    staging = torch.empty(batch.stage_bytes[0], dtype=torch.uint8, device=device)
    recv = torch.empty(batch.recv_bytes[0], dtype=torch.uint8, device=device)
    return batch, cache_p, cache_d, staging, recv


def bench_case(model, p, d, requests, tokens, layers, device, repeats, backends) -> list[dict]:
    spec = load_spec(model)
    if layers:
        spec = spec.truncated(*layers)
    plan = TransferPlan.build(spec, p, d, tokens)
    batch, cache_p, cache_d, staging, recv = bench_buffers(plan, requests, device)
    pack_t, unpack_t = batch.pack_table(0), batch.unpack_table(0)
    rows = []
    for stage, src, dst, table in (("pack", cache_p, staging, pack_t), ("unpack", recv, cache_d, unpack_t)):
        nbytes = int(expand_rows(table)[2].sum())
        base = {
            "model": model,
            "prefill_tp": p,
            "decode_tp": d,
            "requests": requests,
            "tokens": tokens,
            "layers": len(spec.layers),
            "stage": stage,
            "bytes_rw": 2 * nbytes,
            "segments": len(table),
        }
        # Own buffers: replicated KV heads are read once per decode rank, so the bytes moved can exceed
        # the cache.
        flat_s = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, device=device)
        flat_d = torch.empty_like(flat_s)
        variants = {"roofline": lambda s=flat_s, t=flat_d: t.copy_(s)}
        for be in backends:
            launch = ops.Prepared(src, dst, table, backend=be)
            variants[be] = lambda f=launch, s=src, t=dst: f(s, t)
        runs = expand_rows(table)
        per_run = list(zip(*(x.tolist() for x in runs)))

        def one_copy_per_run(s=src, t=dst, per_run=per_run):
            for a, b, n in per_run:
                t[b : b + n].copy_(s[a : a + n])

        variants["per-run"] = one_copy_per_run
        for name, fn in variants.items():
            reps = repeats if name != "per-run" or len(per_run) < 20000 else max(1, repeats // 3)
            ts = timeit(fn, device, reps, warmup=1)
            med = statistics.median(ts)
            rows.append(
                {
                    **base,
                    "variant": name,
                    "median_us": med * 1e6,
                    "min_us": min(ts) * 1e6,
                    "max_us": max(ts) * 1e6,
                    "gbps": 2 * nbytes / med / 1e9,
                    "descriptors": len(per_run) if name == "per-run" else (1 if name == "roofline" else len(table)),
                }
            )
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--requests", type=int, nargs="+", default=[1, 8, 64])
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--layers", default="", help="state,attention layers to keep (e.g. 8,2); default all")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--cases", default="", help="comma list of model:P:D (default: the standard set)")
    ap.add_argument("--backends", default="", help="comma list (default: triton,torch on CUDA; torch on CPU)")
    ap.add_argument("--csv", default="")
    args = ap.parse_args(argv)
    cases = [(m, int(p), int(d)) for m, p, d in (c.split(":") for c in args.cases.split(","))] if args.cases else CASES
    layers = tuple(int(x) for x in args.layers.split(",")) if args.layers else None
    backends = (
        args.backends.split(",")
        if args.backends
        else (["triton", "torch"] if args.device.startswith("cuda") else ["torch"])
    )
    env = environment(args.device)
    print(f"# {env}", file=sys.stderr)
    out = []
    hdr = (
        f"{'model':<18} {'P>D':>4} {'req':>4} {'stage':<7} {'variant':<9} {'MB r+w':>9} {'desc':>7} "
        f"{'median us':>10} {'spread us':>17} {'GB/s':>7}"
    )
    print(hdr)
    for model, p, d in cases:
        for n in args.requests:
            for r in bench_case(model, p, d, n, args.tokens, layers, args.device, args.repeats, backends):
                r.update(env)
                out.append(r)
                print(
                    f"{model:<18} {p}>{d:<2} {n:>4} {r['stage']:<7} {r['variant']:<9} {r['bytes_rw'] / 1e6:>9.1f} "
                    f"{r['descriptors']:>7} {r['median_us']:>10.1f} {r['min_us']:>8.1f}-{r['max_us']:<8.1f} "
                    f"{r['gbps']:>7.2f}",
                    flush=True,
                )
    write_csv(args.csv, out)
    return 0


def write_csv(path: str, rows: list[dict]) -> None:
    if path and rows:
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)


if __name__ == "__main__":
    raise SystemExit(main())
