"""Markdown tables from the benchmark CSVs (bench/results/*.csv) for RESULTS.md.

python bench/summarize.py repack bench/results/repack_cpu.csv
python bench/summarize.py transfer bench/results/transfer_cpu.csv
"""

from __future__ import annotations

import csv
import sys
from collections import defaultdict


def repack(rows: list[dict]) -> str:
    out = [
        "| model | P→D | requests | stage | MB r+w | segments | roofline GB/s | torch GB/s | per-run GB/s | "
        "per-run copies |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    groups: dict[tuple, dict] = defaultdict(dict)
    for r in rows:
        groups[(r["model"], r["prefill_tp"], r["decode_tp"], r["requests"], r["stage"])][r["variant"]] = r
    for (m, p, d, n, stage), v in groups.items():
        base = next(iter(v.values()))
        cells = [
            f"{float(v[k]['gbps']):.1f} ({float(v[k]['min_us']) / 1e3:.2f}-{float(v[k]['max_us']) / 1e3:.2f} ms)"
            if k in v
            else "—"
            for k in ("roofline", "torch", "per-run")
        ]
        out.append(
            f"| {m} | {p}→{d} | {n} | {stage} | {float(base['bytes_rw']) / 1e6:.1f} | {base['segments']} | "
            f"{' | '.join(cells)} | {v.get('per-run', {}).get('descriptors', '—')} |"
        )
    return "\n".join(out)


def transfer(rows: list[dict]) -> str:
    out = [
        "| model | P→D | tokens | conc. | mode | desc/req | MB/req | p50 ms (spread) | p99 ms | GB/s | "
        "NIXL ms/req | pack-wait / read / scatter ms |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        out.append(
            f"| {r['model']} | {r['prefill_tp']}→{r['decode_tp']} | {r['tokens']} | {r['concurrency']} | {r['mode']} | "
            f"{float(r['descriptors_per_request']):.0f} | {float(r['bytes_per_request']) / 1e6:.1f} | "
            f"{float(r['p50_ms']):.1f} ({r['p50_spread_ms']}) | {float(r['p99_ms']):.1f} | {float(r['gbps']):.2f} | "
            f"{float(r['nixl_ms_per_request']):.1f} | {float(r['ready_ms']):.1f} / {float(r['read_ms']):.1f} / "
            f"{float(r['scatter_ms']):.1f} |"
        )
    return "\n".join(out)


if __name__ == "__main__":
    kind, path = sys.argv[1], sys.argv[2]
    with open(path) as f:
        data = list(csv.DictReader(f))
    print({"repack": repack, "transfer": transfer}[kind](data))
