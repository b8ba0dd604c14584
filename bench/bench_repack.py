"""Pack / unpack bandwidth of the kernel both shells launch (the staging copier's slot copy) on one prefill
rank and one decode rank, against baselines measured in the same run on the same device:

* copy_      - torch `copy_` of the same number of contiguous bytes;
* sm-copy    - the same slot-copy kernel on one contiguous run of those bytes (an SM copy: the copy
               engine's `copy_` is not necessarily the higher roofline);
* triton     - the copier (`hybrid_kv.staging.copier`, `kernels/slot_copy.py`): one launch per rank and
               side, where it runs natively (CUDA), host-side rows and launch included;
* torch      - the copier's reference backend (one strided copy per piece per slot).

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

from hybrid_kv.harness import random_batch, staged_jobs
from hybrid_kv.plan import TransferPlan
from hybrid_kv.spec_hf import load_spec
from hybrid_kv.staging.copier import Copier

CASES = [  # #30's set: integer ratios both ways, a whole-model MoE, Mamba2, replicated B/C (Falcon-H1)
    ("qwen3.5-27b", 2, 4),
    ("qwen3.5-27b", 1, 8),
    ("qwen3.5-397b-a17b", 8, 4),
    ("nemotron-h-8b", 2, 4),
    ("falcon-h1-0.5b", 2, 4),
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


def bench_buffers(plan: TransferPlan, requests: int, device: str, backend: str) -> dict:
    """A random batch of `requests` requests through the shipped copier on prefill rank 0 (pack) and decode
    rank 0 (unpack): random page bytes (no oracle: nothing here is verified, `tests/test_kernels.py` is)."""
    tokens = [plan.tokens] * requests
    batch = random_batch(plan, tokens, np.random.default_rng(0), spare_blocks=1)
    j = staged_jobs(plan, batch, tokens)
    rnd = lambda n: torch.randint(0, 256, (max(n, 16),), dtype=torch.uint8, device=device)
    cache_p, cache_d = rnd(batch.prefill_geom.nbytes), rnd(batch.decode_geom.nbytes)
    staging, recv = rnd(j["stage_end"][0]), rnd(j["recv_end"][0])
    return {
        "pack": (Copier(cache_p, j["pmap"], staging, "prefill", backend), j["jobs_p"][0]),
        "unpack": (Copier(cache_d, j["dmap"], recv, "decode", backend), j["jobs_d"][0]),
    }


def sm_copy(n: int, device: str):
    """The slot-copy kernel on one contiguous run of `n` bytes (one slot, 32 KiB tiles)."""
    from hybrid_kv.kernels.slot_copy import launch
    from hybrid_kv.kernels.tiles import TileTable, cut_tiles, element_size, with_first

    src = torch.randint(0, 256, (n,), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    table = TileTable(src.device)
    lo, k = table.add("run", cut_tiles(np.zeros(1, np.int64), np.zeros(1, np.int64), np.array([n], np.int64)))
    rows, programs = with_first(np.array([[0, 0, lo, k]], dtype=np.int64))
    rows_d = torch.from_numpy(rows).to(device)
    elem, align = element_size(table.offset_gcd, table.length_gcd, n, 16)
    return lambda: launch(src, dst, table, rows_d, programs, pack=True, elem=elem, align=align)


def bench_case(model, p, d, requests, tokens, layers, device, repeats, backends) -> list[dict]:
    spec = load_spec(model)
    if layers:
        spec = spec.truncated(*layers)
    plan = TransferPlan.build(spec, p, d, tokens)
    per_backend = {be: bench_buffers(plan, requests, device, be) for be in backends}
    rows = []
    for stage in ("pack", "unpack"):
        jobs = per_backend[backends[0]][stage][1]
        nbytes = sum(sum(c.unit_bytes) for c, _ in jobs)
        base = {
            "model": model,
            "prefill_tp": p,
            "decode_tp": d,
            "requests": requests,
            "tokens": tokens,
            "layers": len(spec.layers),
            "stage": stage,
            "bytes_rw": 2 * nbytes,
            "slots": sum(len(c.tpl) for c, _ in jobs),
        }
        flat_s = torch.randint(0, 256, (max(nbytes, 16),), dtype=torch.uint8, device=device)
        flat_d = torch.empty_like(flat_s)
        variants = {"copy_": lambda s=flat_s, t=flat_d: t.copy_(s)}
        if "triton" in backends:
            variants["sm-copy"] = sm_copy(max(nbytes, 16), device)
        for be in backends:
            cp, js = per_backend[be][stage]
            variants[be] = lambda cp=cp, js=js: cp.run(js).wait()
        times = {name: timeit(fn, device, repeats, warmup=1) for name, fn in variants.items()}
        ref = statistics.median(times["copy_"])
        for name, ts in times.items():
            med = statistics.median(ts)
            rows.append(
                {
                    **base,
                    "variant": name,
                    "median_us": med * 1e6,
                    "min_us": min(ts) * 1e6,
                    "max_us": max(ts) * 1e6,
                    "gbps": 2 * nbytes / med / 1e9,
                    "of_copy": ref / med,  # this variant's bandwidth as a fraction of copy_'s
                    "launches": 1,
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
        f"{'model':<18} {'P>D':>4} {'req':>4} {'stage':<7} {'variant':<9} {'MB r+w':>9} {'slots':>7} "
        f"{'median us':>10} {'spread us':>17} {'GB/s':>7} {'of copy_':>8}"
    )
    print(hdr)
    for model, p, d in cases:
        for n in args.requests:
            for r in bench_case(model, p, d, n, args.tokens, layers, args.device, args.repeats, backends):
                r.update(env)
                out.append(r)
                print(
                    f"{model:<18} {p}>{d:<2} {n:>4} {r['stage']:<7} {r['variant']:<9} {r['bytes_rw'] / 1e6:>9.1f} "
                    f"{r['slots']:>7} {r['median_us']:>10.1f} {r['min_us']:>8.1f}-{r['max_us']:<8.1f} "
                    f"{r['gbps']:>7.2f} {r['of_copy']:>8.0%}",
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
