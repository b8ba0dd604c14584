"""Packed vs strided over NIXL (UCX), same run, same bytes, plus a contiguous-read reference.

For each (model, P TP -> D TP, prompt tokens, concurrency): start P and D rank processes once, then run
`contiguous` (one READ per unit of the same bytes from contiguous memory: the NIXL floor), `packed`
and `strided`, each `--repeats` times; report request latency p50/p99, throughput, descriptors per
request, NIXL post+transfer time, and the pack / read / scatter phase split.

    python bench/bench_transfer.py [--device cpu] [--layers 8,2] [--csv bench/results/transfer_cpu.csv]

The rank processes inherit the environment: `UCX_TLS=tcp python bench/bench_transfer.py ...` makes every
descriptor a network message over loopback TCP (recorded per row as `ucx_tls`).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_repack import environment, write_csv

from hybrid_kv.transport.common import SideConfig
from hybrid_kv.transport.decode import DecodeOptions
from hybrid_kv.transport.launch import Cluster, TransferJob
from hybrid_kv.transport.prefill import PrefillOptions

DEFAULT_CASES = [
    # model, P, D, tokens, concurrency
    ("qwen3.5-27b", 1, 8, 512, 1),
    ("qwen3.5-27b", 8, 1, 512, 1),
    ("qwen3.5-27b", 2, 4, 512, 1),
    ("qwen3.5-27b", 4, 2, 512, 1),
    ("qwen3.5-27b", 2, 2, 512, 1),
    ("qwen3.5-27b", 2, 4, 512, 8),
    ("qwen3.5-27b", 2, 4, 512, 64),
    ("qwen3.5-27b", 2, 4, 8192, 1),
    ("nemotron-h-8b", 1, 8, 512, 1),
    ("nemotron-h-8b", 8, 1, 512, 1),
    ("nemotron-h-8b", 2, 4, 512, 1),
    ("nemotron-h-8b", 4, 2, 512, 1),
    ("nemotron-h-8b", 2, 2, 512, 1),
    ("nemotron-h-8b", 2, 4, 512, 8),
    ("nemotron-h-8b", 2, 4, 8192, 1),
]


def truncated_config(model: str, layers: tuple[int, int], out: Path) -> str:
    """A copy of the preset keeping its real dims but only `layers` = (state, attention) cache layers."""
    import json

    from hybrid_kv.spec_hf import load_config, load_spec

    spec = load_spec(model).truncated(*layers)
    _, cfg = load_config(model)
    cfg = json.loads(json.dumps(cfg))
    kinds = [x.kind.value for x in spec.layers]
    if "text_config" in cfg or "layer_types" in cfg:
        tc = cfg.get("text_config", cfg)
        tc["layer_types"] = ["full_attention" if k == "attention" else "linear_attention" for k in kinds]
        tc["num_hidden_layers"] = len(kinds)
    elif "hybrid_override_pattern" in cfg:
        cfg["hybrid_override_pattern"] = "".join("*" if k == "attention" else "M" for k in kinds)
    elif cfg.get("model_type") == "falcon_h1":
        # every Falcon-H1 layer holds both a Mamba2 mixer and attention: keep the first `state` layers
        cfg["num_hidden_layers"] = layers[0]
        layers = (layers[0], layers[0])
    else:
        raise ValueError(f"no truncation rule for {model}")
    path = out / f"{model}-{layers[0]}s{layers[1]}a"
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(cfg))
    return str(path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--layers", default="8,2", help="state,attention layers kept (real dims); '' for all")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--cases", default="", help="model:P:D:tokens:concurrency,... (default: the standard set)")
    ap.add_argument("--csv", default="")
    ap.add_argument("--workdir", default="/tmp/hybrid-kv-bench")
    ap.add_argument("--modes", default="contiguous,packed,strided,auto", help="comma list, in this order")
    ap.add_argument(
        "--verify", action="store_true", help="check every decode byte of every timed run against the oracle"
    )
    args = ap.parse_args(argv)
    cases = (
        [(m, int(p), int(d), int(t), int(c)) for m, p, d, t, c in (x.split(":") for x in args.cases.split(","))]
        if args.cases
        else DEFAULT_CASES
    )
    layers = tuple(int(x) for x in args.layers.split(",")) if args.layers else None
    env = environment(args.device)
    print(f"# {env}", file=sys.stderr)
    rows, bad = [], []
    print(
        f"{'model':<15} {'P>D':>4} {'tok':>5} {'C':>3} {'mode':<10} {'desc/req':>8} {'MB/req':>7} {'p50 ms':>8} "
        f"{'p99 ms':>8} {'GB/s':>6} {'nixl ms/req':>11} {'ready/read/scatter ms':>22}"
    )
    for model, p, d, tokens, conc in cases:
        cfg = truncated_config(model, layers, Path(args.workdir)) if layers else model
        side = SideConfig(cfg, p, 1, device=args.device)
        n = max(conc, 4) if conc > 1 else 4
        job = TransferJob(
            side,
            replace(side, tp_size=d),
            requests=n,
            tokens=tokens,
            concurrency=conc,
            verify=args.verify,
            prefill_opts=PrefillOptions(pool_bytes=1 << 30),
            decode_opts=DecodeOptions(pool_bytes=1 << 30),
        )
        with Cluster(job) as cl:
            for mode in args.modes.split(","):
                # contiguous reads stand-in bytes (the NIXL floor): nothing of it to verify
                cl.job = replace(job, verify=args.verify and mode != "contiguous")
                reps = [cl.run(mode) for _ in range(args.repeats + 1)][1:]  # first run: warm-up
                verified = cl.job.verify and all(r["verified"] for r in reps)
                if cl.job.verify and not verified:
                    bad.append(
                        f"{model} {p}->{d} c={conc} {mode}: {[r['mismatches'][:3] or r['failures'][:1] for r in reps]}"
                    )
                p50 = statistics.median(r["p50_ms"] for r in reps)
                p99 = statistics.median(r["p99_ms"] for r in reps)
                gbps = statistics.median(r["gbps"] for r in reps)
                nixl = statistics.median((r["nixl_post_us"] + r["nixl_xfer_us"]) / 1e3 / r["requests"] for r in reps)
                ph = {k: statistics.median(r["phases_ms"][k] for r in reps) for k in ("ready_s", "read_s", "scatter_s")}
                r0 = reps[0]
                row = {
                    "model": model,
                    "layers": args.layers or "all",
                    "prefill_tp": p,
                    "decode_tp": d,
                    "tokens": tokens,
                    "concurrency": conc,
                    "requests": n,
                    "mode": mode,
                    "descriptors_per_request": r0["descriptors_per_request"],
                    "bytes_per_request": r0["bytes"] / n,
                    "p50_ms": p50,
                    "p99_ms": p99,
                    "p50_spread_ms": f"{min(r['p50_ms'] for r in reps):.1f}-{max(r['p50_ms'] for r in reps):.1f}",
                    "gbps": gbps,
                    "nixl_ms_per_request": nixl,
                    "ready_ms": ph["ready_s"],
                    "read_ms": ph["read_s"],
                    "scatter_ms": ph["scatter_s"],
                    "verified": verified,
                    "ucx_tls": os.environ.get("UCX_TLS", "default"),
                    **env,
                }
                rows.append(row)
                print(
                    f"{model:<15} {p}>{d:<2} {tokens:>5} {conc:>3} {mode:<10} {row['descriptors_per_request']:>8.0f} "
                    f"{row['bytes_per_request'] / 1e6:>7.1f} {p50:>8.1f} {p99:>8.1f} {gbps:>6.2f} {nixl:>11.1f} "
                    f"{ph['ready_s']:>7.1f}/{ph['read_s']:>6.1f}/{ph['scatter_s']:>6.1f}",
                    flush=True,
                )
        write_csv(args.csv, rows)  # after every case: a run stopped at a time limit keeps what it measured
    for b in bad:
        print(f"NOT VERIFIED: {b}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
