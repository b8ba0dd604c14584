"""A MODEL, not a measurement: per-request transfer time of packed vs strided on a 400 Gb/s RDMA NIC.

    t_strided = n_strided * c_desc + bytes / link
    t_packed  = n_packed  * c_desc + bytes / link + 2 * bytes / gpu_copy      (pack on P + scatter on D,
                                                                             not overlapped: pessimistic)

Descriptor counts and bytes come from the planner (exact, per decode rank: the busiest one). `c_desc`
(the per-descriptor cost of a READ work request: posting, NIC processing, completion) and `gpu_copy`
(the pack/scatter kernels' bandwidth on the GPU) are scenario parameters, printed with every row; they
are not measured in this repository's runs (no GPU or NIC was available for them).

    python bench/project_rdma.py [--c-desc-us 0.5 1 2] [--gpu-copy-tbps 2.0]
"""

from __future__ import annotations

import argparse

from hybrid_kv.plan import TransferPlan
from hybrid_kv.spec_hf import load_spec

CASES = [
    ("qwen3.5-27b", 1, 8, 1024),
    ("qwen3.5-27b", 2, 4, 1024),
    ("qwen3.5-27b", 8, 1, 1024),
    ("qwen3.5-397b-a17b", 4, 8, 1024),
    ("nemotron-h-8b", 2, 4, 1024),
    ("nemotron-h-8b", 4, 2, 1024),
    ("qwen3.5-27b", 2, 4, 8192),
]
LINK_GBPS = 400


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--c-desc-us", type=float, nargs="+", default=[0.5, 1.0, 2.0])
    ap.add_argument("--gpu-copy-tbps", type=float, default=2.0)
    args = ap.parse_args(argv)
    link = LINK_GBPS / 8 * 1e9
    gpu = args.gpu_copy_tbps * 1e12
    print(
        f"link {LINK_GBPS} Gb/s = {link / 1e9:.0f} GB/s; gpu copy {args.gpu_copy_tbps} TB/s (assumed); "
        f"block sizes by vLLM's rule, block ids 1 state + KV blocks"
    )
    print(
        "| model | P→D | tokens | MB / D rank | desc strided | desc packed | c_desc µs | strided ms | packed ms | "
        "speed-up |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for model, p, d, tokens in CASES:
        plan = TransferPlan.build(load_spec(model), p, d, tokens, prefill_block_size=1024, decode_block_size=1024)
        per_rank = []
        for r in range(d):
            ps = [x for x in plan.pieces if x.dst_rank == r]
            units = sum(len(lay.units) for (_, dd), lay in plan.staging.items() if dd == r)
            per_rank.append((sum(x.nbytes for x in ps), sum(x.runs for x in ps), units))
        nbytes, n_s, n_p = max(per_rank)
        for c in args.c_desc_us:
            ts = n_s * c * 1e-6 + nbytes / link
            tp = n_p * c * 1e-6 + nbytes / link + 2 * nbytes / gpu
            print(
                f"| {model} | {p}→{d} | {tokens} | {nbytes / 1e6:.1f} | {n_s} | {n_p} | {c} | {ts * 1e3:.2f} | "
                f"{tp * 1e3:.2f} | {ts / tp:.2f}x |"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
