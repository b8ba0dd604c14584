"""A PROJECTION from measured inputs: per-request time of packed vs strided over a 400 Gb/s RDMA NIC.

Per request, for the busiest decode rank (descriptor counts and bytes exact, from the planner):

    t_strided = h_stock + n_strided * c_desc + bytes / link
    t_packed  = h_pack + h_scatter + n_packed * c_desc + bytes / link + bytes / pack_bw + bytes / scatter_bw

(pack and scatter counted in full, not overlapped with the wire: pessimistic for packed). Inputs:

* measured, from the GPU run's files (`--kernels`, `--host`; default: `bench/results/h200/`, NVIDIA H200):
  `pack_bw` / `scatter_bw` = the slot-copy kernel's bytes moved per second for one request (bench_repack's
  ``triton`` rows); `h_pack`, `h_scatter` = host time per request per side, block ids -> launch call, real
  launches (bench_host's ``transport`` rows), `h_stock` = the stock descriptor lists' host time of the
  same requests. A configuration the files lack takes the median of the measured ones (marked ``~k``
  for the kernel, ``~h`` for the host). `--host-us X` sets the packed host time per side to a target X.
* published: `c_desc`, the cost of one more descriptor in a transfer (NIXL/UCX figures, see `C_DESC`).
* assumed: the link, 400 Gb/s.

It prints, per configuration, the two times, the speed-up and `c_even`: the per-descriptor cost above which
packing wins. The wire's lower efficiency for 1.5-6 KiB messages is ignored (it would favour packed).

    python bench/project_rdma.py [--kernels CSV] [--host JSON] [--c-desc-us 1.5 3.1] [--link-gbps 400]
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
from pathlib import Path

from hybrid_kv.plan import TransferPlan
from hybrid_kv.spec_hf import load_spec

RESULTS = Path(__file__).resolve().parent / "results" / "h200"
CASES = [  # model, prefill TP, decode TP, tokens
    ("nemotron-h-8b", 1, 2, 8192),
    ("nemotron-h-8b", 2, 4, 8192),
    ("qwen3.5-27b", 2, 4, 8192),
    ("qwen3.5-27b", 1, 8, 8192),
    ("qwen3.5-27b", 2, 4, 1024),
    ("qwen3.5-397b-a17b", 8, 4, 8192),
    ("falcon-h1-0.5b", 2, 4, 8192),
]
# Published per-descriptor costs (us), each with where it was measured.
C_DESC = {
    1.5: "NIXL issue #1695 (github.com/ai-dynamo/nixl/issues/1695): nixlbench VRAM->VRAM, batch 1, 4 KiB: "
    "average post time 1.5 us (the host's posting cost alone: a lower bound)",
    3.1: "NIXL PR #115 (github.com/ai-dynamo/nixl/pull/115): nixlbench VRAM, 2 GPUs of one node, batch 64: "
    "3.11 us average latency per descriptor, flat from 4 KiB to 256 KiB",
}


def kernel_rates(path: Path) -> dict[tuple[str, int, int], dict[str, float]]:
    """(model, P, D) -> {'pack': B/s, 'unpack': B/s} of bytes moved (half of bytes read + written), one
    request, the Triton kernel."""
    out: dict = {}
    with open(path) as f:
        for r in csv.DictReader(f):
            if r["variant"] != "triton" or r["requests"] != "1":
                continue
            key = (r["model"], int(r["prefill_tp"]), int(r["decode_tp"]))
            out.setdefault(key, {})[r["stage"]] = int(r["bytes_rw"]) / 2 / (float(r["median_us"]) * 1e-6)
    return out


def host_times(path: Path) -> dict[tuple[str, int, int], tuple[float, float, float]]:
    """(model, P, D) -> (pack us, scatter us, stock us) per request, the transport shell's rows."""
    rows = json.loads(path.read_text())["rows"]
    return {
        (r["model"], r["prefill_tp"], r["decode_tp"]): (
            r["host_prep_us"]["prefill"],
            r["host_prep_us"]["decode"],
            r["stock_host_us"],
        )
        for r in rows
        if r.get("path") == "transport" and r.get("host_prep_us") and r.get("stock_host_us") is not None
    }


def _lookup(table: dict, key, combine):
    """The measured entry of `key`, else the median of every measured entry (flagged)."""
    if key in table:
        return table[key], False
    if not table:
        raise ValueError("no measured rows in the input file")
    return combine(list(table.values())), True


def busiest(model: str, p: int, d: int, tokens: int) -> tuple[int, int, int]:
    """(bytes, strided descriptors, packed descriptors) of the decode rank that receives the most bytes."""
    plan = TransferPlan.build(load_spec(model), p, d, tokens, prefill_block_size=1024, decode_block_size=1024)
    per_rank = []
    for r in range(d):
        ps = [x for x in plan.pieces if x.dst_rank == r]
        units = sum(len(lay.units) for (_, dd), lay in plan.staging.items() if dd == r)
        per_rank.append((sum(x.nbytes for x in ps), sum(x.runs for x in ps), units))
    return max(per_rank)


def project(
    kernels: Path, host: Path, c_descs: list[float], link_gbps: float, host_us: float | None = None
) -> list[dict]:
    """The rows; `host_us`: the packed path's host time per side set to this (a target, not measured)."""
    rates, hosts = kernel_rates(kernels), host_times(host)
    link = link_gbps / 8 * 1e9
    rows = []
    for model, p, d, tokens in CASES:
        nbytes, n_s, n_p = busiest(model, p, d, tokens)
        bw, bw_guess = _lookup(rates, (model, p, d), lambda v: {s: statistics.median(x[s] for x in v) for s in v[0]})
        h, h_guess = _lookup(
            hosts, (model, p, d), lambda v: tuple(statistics.median(x[i] for x in v) for i in range(3))
        )
        if host_us is not None:
            h = (host_us, host_us, h[2])
        copy_s = nbytes / bw["pack"] + nbytes / bw["unpack"]
        extra_us = h[0] + h[1] - h[2] + copy_s * 1e6  # what packing adds, descriptors aside
        for c in c_descs:
            ts = h[2] * 1e-6 + n_s * c * 1e-6 + nbytes / link
            tp = (h[0] + h[1]) * 1e-6 + n_p * c * 1e-6 + nbytes / link + copy_s
            rows.append(
                dict(
                    model=model,
                    p=p,
                    d=d,
                    tokens=tokens,
                    mb=nbytes / 1e6,
                    n_strided=n_s,
                    n_packed=n_p,
                    c_desc_us=c,
                    strided_ms=ts * 1e3,
                    packed_ms=tp * 1e3,
                    speedup=ts / tp,
                    c_even_us=extra_us / (n_s - n_p) if n_s > n_p else float("inf"),
                    measured=("~k" if bw_guess else "") + ("~h" if h_guess and host_us is None else ""),
                )
            )
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kernels", type=Path, default=RESULTS / "kernels.csv", help="bench_repack CSV (GPU)")
    ap.add_argument("--host", type=Path, default=RESULTS / "host.json", help="bench_host JSON (GPU, real launches)")
    ap.add_argument("--c-desc-us", type=float, nargs="+", default=sorted(C_DESC))
    ap.add_argument("--link-gbps", type=float, default=400)
    ap.add_argument("--host-us", type=float, help="the packed path's host time per side, a target (not measured)")
    a = ap.parse_args(argv)
    rows = project(a.kernels, a.host, a.c_desc_us, a.link_gbps, a.host_us)
    print(f"PROJECTION. link {a.link_gbps:g} Gb/s (assumed); kernel and host inputs measured: {a.kernels}, {a.host}")
    if a.host_us is not None:
        print(f"packed host time per side: {a.host_us:g} us, a TARGET, not the measured one")
    for c in a.c_desc_us:
        print(f"c_desc {c} us: {C_DESC.get(c, 'given on the command line')}")
    print("| model | P→D | tokens | MB / D rank | desc strided | desc packed | c_desc µs | strided ms | packed ms "
          "| speed-up | packing wins above c_desc |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['model']}{r['measured']} | {r['p']}→{r['d']} | {r['tokens']} | {r['mb']:.1f} | {r['n_strided']} | "
            f"{r['n_packed']} | {r['c_desc_us']} | {r['strided_ms']:.3f} | {r['packed_ms']:.3f} | "
            f"{r['speedup']:.2f}x | {r['c_even_us']:.2f} µs |"
        )
    print("~k / ~h: no kernel / host row of this configuration in the GPU files: the median of the measured ones")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
