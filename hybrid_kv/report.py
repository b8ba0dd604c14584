"""Plain-data reports of layouts and plans (the `--json` contract) and their rich-table renderings."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

from hybrid_kv.layout import RankLayout, Region
from hybrid_kv.plan import TransferPlan
from hybrid_kv.spec import LayerKind


def _region(r: Region) -> dict:
    return {"offset": r.offset, "rows": r.rows, "row_bytes": r.row_bytes, "stride": r.stride, "nbytes": r.nbytes}


def _shard(s) -> list[int] | None:
    return None if s is None else [s.start, s.stop]


def layout_report(layouts: Sequence[RankLayout]) -> dict:
    lay = layouts[0]
    spec = lay.spec
    out: dict = {
        "model": spec.name,
        "architecture": spec.architecture,
        "tp": lay.tp_size,
        "conv_layout": lay.conv_layout,
        "kv_layout": lay.kv_layout,
        "block_size": lay.block_size,
        "page_bytes": lay.page_bytes,
        "layer_counts": dict(Counter(layer.kind.value for layer in spec.layers)),
        "state": None,
        "attention": None,
    }
    if spec.state is not None:
        st = spec.state
        out["state"] = {
            "kind": st.kind.value,
            "conv_rows": lay.conv_rows,
            "conv_dtype": st.conv_dtype,
            "ssm_dtype": st.ssm_dtype,
            "conv_parts": [
                {
                    "component": f"conv.{p.sub.name}",
                    "channels": p.channels,
                    "replicated": p.shard.replicated,
                    **_region(lay.conv_region(p, 0, p.channels)),
                }
                for p in lay.conv_parts
            ],
            "conv_bytes": lay.conv_bytes,
            "ssm_offset": lay.ssm_offset,
            "ssm_shape": [lay.ssm_shard.size, *st.head_shape],
            "ssm_bytes": lay.ssm_bytes,
            "state_bytes": lay.state_bytes,
            "padding_bytes": lay.padding_bytes,
        }
    if spec.attention is not None:
        at = spec.attention
        out["attention"] = {
            "kv_heads_local": lay.kv_heads_local,
            "head_dim": at.head_dim,
            "latent": at.latent,
            "dtype": at.dtype,
            "replicated": lay.kv_shard.replicated,
            "token_bytes": lay.attn_token_bytes,
            "page_bytes": lay.page_bytes,
        }
    out["ranks"] = [
        {
            "rank": r.tp_rank,
            "conv_units": {p.sub.name: _shard(p.shard) for p in r.conv_parts},
            "ssm_heads": _shard(r.ssm_shard),
            "kv_heads": _shard(r.kv_shard),
        }
        for r in layouts
    ]
    return out


def plan_report(plan: TransferPlan, model: str | None = None) -> dict:
    """The `hybrid-kv plan --json` contract; `reads` lists every state piece and attention block 0."""
    p0, d0 = plan.prefill[0], plan.decode[0]
    reads = []
    for pc in plan.pieces:
        if pc.component == "kv" and pc.dst_block != 0:
            continue
        for src, dst, n in pc.run_offsets():
            reads.append(
                {
                    "decode_rank": pc.dst_rank,
                    "prefill_rank": pc.src_rank,
                    "layer": pc.layer,
                    "component": pc.component,
                    "src_block": pc.src_block,
                    "dst_block": pc.dst_block,
                    "src_offset": src,
                    "dst_offset": dst,
                    "nbytes": n,
                }
            )
    return {
        "model": model or plan.spec.name,
        "prefill_tp": plan.prefill_tp,
        "decode_tp": plan.decode_tp,
        "conv_layout": p0.conv_layout,
        "kv_layout": p0.kv_layout,
        "tokens": plan.tokens,
        "block_size": {"prefill": p0.block_size, "decode": d0.block_size},
        "layers": [
            {
                "index": layer.index,
                "name": layer.name,
                "kind": layer.kind.value,
                "page_bytes": {"prefill": p0.page_bytes, "decode": d0.page_bytes},
            }
            for layer in plan.spec.layers
        ],
        "reads": reads,
        "pairs": [
            {
                "prefill_rank": p,
                "decode_rank": d,
                "bytes": sum(x.nbytes for x in plan.pairs[(p, d)]),
                "staging_bytes": lay.nbytes,
                "units": len(lay.units),
            }
            for (p, d), lay in sorted(plan.staging.items())
        ],
        "bytes_per_request": plan.bytes_moved(),
        "descriptors_per_request": {"strided": plan.strided_descriptors(), "packed": plan.packed_descriptors()},
    }


# ---- rich renderings --------------------------------------------------------------------------------------


def _fmt(n: int) -> str:
    return f"{n:,}"


def _span(x) -> str:
    """A [start, stop) shard as printed; "-" where the rank holds none of that kind."""
    return "-" if x is None else f"[{x[0]}, {x[1]})"


def _n(count: int, noun: str) -> str:
    return f"{count} {noun}" + ("" if count == 1 else "s")


def print_layout(rep: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    con = Console()
    con.print(
        f"[bold]{rep['model']}[/] ({rep['architecture']}) TP {rep['tp']}: "
        f"{', '.join(f'{n} {k}' for k, n in rep['layer_counts'].items())} layers; "
        f"block {rep['block_size']} tokens, page {_fmt(rep['page_bytes'])} B"
    )
    t = Table(title=f"page anatomy (rank 0, conv {rep['conv_layout']}, kv {rep['kv_layout']})")
    for col in ("part", "offset", "bytes", "runs x bytes", "detail"):
        t.add_column(col, justify="right" if col != "part" and col != "detail" else "left")
    st = rep["state"]
    if st:
        for p in st["conv_parts"]:
            t.add_row(
                p["component"],
                _fmt(p["offset"]),
                _fmt(p["nbytes"]),
                f"{p['rows']} x {_fmt(p['row_bytes'])}",
                f"{p['channels']} ch x {st['conv_rows']} rows {st['conv_dtype']}"
                + (" (replicated)" if p["replicated"] else ""),
            )
        t.add_row(
            "ssm",
            _fmt(st["ssm_offset"]),
            _fmt(st["ssm_bytes"]),
            f"1 x {_fmt(st['ssm_bytes'])}",
            f"{tuple(st['ssm_shape'])} {st['ssm_dtype']}",
        )
        t.add_row("padding", _fmt(st["state_bytes"]), _fmt(st["padding_bytes"]), "", "never transferred")
    at = rep["attention"]
    if at:
        t.add_section()
        t.add_row(
            "kv",
            "0",
            _fmt(at["page_bytes"]),
            "",
            f"{at['kv_heads_local']} heads x {rep['block_size']} tok x "
            + (f"latent {at['head_dim']}" if at.get("latent") else f"K||V {2 * at['head_dim']}")
            + f" {at['dtype']}"
            + (" (replicated)" if at["replicated"] else ""),
        )
    con.print(t)
    r = Table(title="shards per rank (global units [start, stop))")
    r.add_column("rank", justify="right")
    names = list(rep["ranks"][0]["conv_units"])
    for n in names:
        r.add_column(f"conv.{n}")
    r.add_column("ssm heads")
    r.add_column("kv heads")
    for row in rep["ranks"]:
        r.add_row(
            str(row["rank"]),
            *(_span(row["conv_units"][n]) for n in names),
            _span(row["ssm_heads"]),
            _span(row["kv_heads"]),
        )
    con.print(r)


def print_plan(rep: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    con = Console()
    kinds = Counter(layer["kind"] for layer in rep["layers"])
    con.print(
        f"[bold]{rep['model']}[/]: prefill TP {rep['prefill_tp']} -> decode TP {rep['decode_tp']}, "
        f"{rep['tokens']} tokens, conv {rep['conv_layout']}; "
        f"{', '.join(f'{n} {k}' for k, n in kinds.items())} layers; "
        f"block {rep['block_size']['prefill']} -> {rep['block_size']['decode']} tokens"
    )
    first = {}
    for layer in rep["layers"]:
        first.setdefault("attention" if layer["kind"] == LayerKind.ATTENTION.value else "state", layer["index"])
    t = Table(title="reads of the first state layer and attention block 0 of the first attention layer")
    for col in ("decode", "prefill", "layer", "component", "src offset", "dst offset", "bytes"):
        t.add_column(col, justify="right")
    for rd in rep["reads"]:
        if rd["layer"] in first.values():
            t.add_row(
                str(rd["decode_rank"]),
                str(rd["prefill_rank"]),
                str(rd["layer"]),
                rd["component"],
                _fmt(rd["src_offset"]),
                _fmt(rd["dst_offset"]),
                _fmt(rd["nbytes"]),
            )
    con.print(t)
    s = Table(title="per request")
    s.add_column("prefill -> decode")
    s.add_column("bytes", justify="right")
    s.add_column("staging bytes", justify="right")
    s.add_column("packed descriptors", justify="right")
    for pr in rep["pairs"]:
        s.add_row(
            f"{pr['prefill_rank']} -> {pr['decode_rank']}",
            _fmt(pr["bytes"]),
            _fmt(pr["staging_bytes"]),
            str(pr["units"]),
        )
    con.print(s)
    dpr = rep["descriptors_per_request"]
    ratio = dpr["strided"] / max(1, dpr["packed"])
    con.print(
        f"bytes per request: {_fmt(rep['bytes_per_request'])}; descriptors per request: "
        f"strided {_fmt(dpr['strided'])}, packed {_fmt(dpr['packed'])} ({ratio:.0f}x fewer)"
    )


def print_repack(rep: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(
        title=f"repack {rep['model']} TP {rep['prefill_tp']} -> {rep['decode_tp']}, {_n(rep['requests'], 'request')}, "
        f"backend {rep['backend']} on {rep['device']}"
    )
    for col in ("stage", "bytes (read+written)", "slots", "tiles", "launches", "median ms", "min ms", "max ms", "GB/s"):
        t.add_column(col, justify="right")
    for name in ("pack", "unpack"):
        s = rep[name]
        t.add_row(
            name,
            _fmt(s["bytes"]),
            _fmt(s["slots"]),
            "-" if s["tiles"] is None else _fmt(s["tiles"]),
            str(s["launches"]),
            f"{s['median_ms']:.3f}",
            f"{s['min_ms']:.3f}",
            f"{s['max_ms']:.3f}",
            f"{s['gbps']:.2f}",
        )
    con = Console()
    con.print(t)
    if not rep["checked"]:
        con.print("verification not requested (add --verify to check every decode byte against the oracle)")
    else:
        con.print("verified: " + ("[green]byte-exact[/]" if rep["verified"] else "[red]MISMATCH[/]"))
    for m in rep.get("mismatches", []):
        con.print(f"  {m}")
