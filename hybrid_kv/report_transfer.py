"""`hybrid-kv transfer`'s report: the JSON object and the table a person reads."""

from __future__ import annotations

from hybrid_kv.report import _n


def transfer_report(out: dict, args) -> dict:
    """The `hybrid-kv transfer --json` object: per mode descriptors, bytes, p50/p99, GB/s, verification."""
    plan = out["plan"]
    modes = {}
    for m, r in out["modes"].items():
        modes[m] = {
            k: r[k]
            for k in (
                "requests",
                "completed",
                "descriptors",
                "descriptors_per_request",
                "bytes",
                "p50_ms",
                "p99_ms",
                "gbps",
                "wall_s",
                "waves",
                "nixl_post_us",
                "nixl_xfer_us",
                "nixl_descs",
                "phases_ms",
                "verified",
                "failures",
                "mismatches",
            )
        }
    leaks = {
        k: {
            f: v for f, v in c.items() if f in ("registrations", "remote_agents", "xfer_handles", "staging_slots") and v
        }
        for k, c in out["closed_counts"].items()
    }
    return {
        "model": plan.spec.name,
        "prefill_tp": plan.prefill_tp,
        "decode_tp": plan.decode_tp,
        "tokens": plan.tokens,
        "requests": args.requests,
        "concurrency": args.concurrency,
        "in_flight": out["in_flight"],
        "device": args.device,
        "planned_descriptors_per_request": {"strided": plan.strided_descriptors(), "packed": plan.packed_descriptors()},
        "modes": modes,
        **{m: modes[m] for m in modes},
        "cost_model": out.get("cost_model", []),
        "checked": bool(args.verify),
        "verified": bool(args.verify) and all(v["verified"] for v in modes.values()),
        "failed_requests": sum(len(v["failures"]) for v in modes.values()),
        "leaks": {k: v for k, v in leaks.items() if v},
        "peak_rss": {k: c["peak_rss"] for k, c in out["closed_counts"].items() if "peak_rss" in c},
        "memory_estimate": out.get("memory_estimate"),
    }


def memory_line(rep: dict) -> str | None:
    """Each side's largest peak resident set against the estimate the run was admitted with."""
    peak, est = rep.get("peak_rss") or {}, rep.get("memory_estimate")
    parts = []
    for side in ("prefill", "decode"):
        got = [v for k, v in peak.items() if k.startswith(side + "-")]
        if got:
            want = f" (estimated {est[side + '_rank'] / 2**30:.2f})" if est else ""
            parts.append(f"{max(got) / 2**30:.2f} GiB a {side} rank{want}")
    return "memory: peak resident " + ", ".join(parts) if parts else None


def auto_summary(c: dict) -> str:
    """What auto decided on decode rank 0, and why, in words."""
    measured = (
        f"one extra NIXL descriptor costs {c['desc_cost_us']:.2f} us, a local copy runs at {c['copy_gbps']:.1f} GB/s, "
        f"a side-channel round trip takes {c['rtt_us']:.0f} us"
    )
    if c["threshold_bytes"] <= 0:
        return f"auto (decode rank 0): {measured}; packing never pays here, so every run is read directly (as strided)"
    return (
        f"auto (decode rank 0): {measured}; runs shorter than {c['threshold_bytes']:,} B are packed where the "
        "descriptors saved pay for the round trip and both copies at the packer's load; longer runs are read directly"
    )


def print_transfer(rep: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(
        title=f"{rep['model']}: prefill TP {rep['prefill_tp']} -> decode TP {rep['decode_tp']}, "
        f"{_n(rep['requests'], 'request')} x {rep['tokens']} tokens, concurrency {rep['concurrency']}, "
        f"caches for {_n(rep['in_flight'], 'request')} in flight, "
        f"{rep['device']} memory over NIXL/UCX"
    )
    for col in ("mode", "ok", "MB moved", "descriptors/req", "p50 ms", "p99 ms", "GB/s", "NIXL post+xfer ms"):
        t.add_column(col, justify="right")
    for m, r in rep["modes"].items():
        t.add_row(
            m,
            f"{r['completed']}/{r['requests']}",
            f"{r['bytes'] / 1e6:,.1f}",
            f"{r['descriptors_per_request']:,.0f}",
            "-" if r["p50_ms"] is None else f"{r['p50_ms']:.1f}",
            "-" if r["p99_ms"] is None else f"{r['p99_ms']:.1f}",
            f"{r['gbps']:.2f}",
            f"{(r['nixl_post_us'] + r['nixl_xfer_us']) / 1e3:,.1f}",
        )
    con = Console()
    con.print(t)
    if rep.get("cost_model") and "auto" in rep["modes"]:
        con.print(auto_summary(rep["cost_model"][0]))
    if not rep["checked"]:
        con.print("verification not requested (add --verify to check every decode byte against the oracle)")
    elif rep["verified"]:
        con.print("verified: [green]every decode byte matches the oracle[/]")
    else:
        con.print("verified: [red]MISMATCH or failed requests: see below[/]")
    for r in rep["modes"].values():
        for f in r["failures"][:5]:
            con.print(f"  [red]failed[/] {f['id']}: {f['errors'][0]}")
        for m in r["mismatches"][:5]:
            con.print(f"  [red]{m}[/]")
    if line := memory_line(rep):
        con.print(line)
    if rep["leaks"]:
        con.print(f"[red]leaked handles after shutdown: {rep['leaks']}[/]")
