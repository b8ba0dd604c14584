"""Plots of pages and plans (matplotlib, headless). Each function returns `(figure, data)`: `data` holds
exactly the numbers drawn, so tests can compare them with the layout / plan they came from."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

# The object-oriented Figure API: no pyplot global state and no GUI backend (headless CI), while the
# figures still display inline in notebooks.
from matplotlib.figure import Figure
from matplotlib.patches import Patch, Polygon, Rectangle

from hybrid_kv.layout import RankLayout
from hybrid_kv.plan import TransferPlan
from hybrid_kv.spec import ModelSpec

COLORS = {
    "conv.x": "#4e79a7",
    "conv.q": "#4e79a7",
    "conv": "#4e79a7",
    "conv.B": "#f28e2b",
    "conv.k": "#f28e2b",
    "conv.C": "#59a14f",
    "conv.v": "#59a14f",
    "ssm": "#b07aa1",
    "padding": "#d9d9d9",
    "kv": "#e15759",
}


def _fmt_bytes(n: float) -> str:
    for unit, div in (("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(n) >= div:
            return f"{n / div:.1f} {unit}"
    return f"{int(n)} B"


def _save(fig, path: str | Path | None):
    if path is not None:
        fig.savefig(path, dpi=120, bbox_inches="tight")
    return fig


def page_segments(layout: RankLayout) -> dict[str, list[tuple[str, int, int]]]:
    """(label, offset, nbytes) of every part of a state page and an attention page (rank `layout`)."""
    out: dict[str, list[tuple[str, int, int]]] = {}
    if layout.spec.state is not None:
        segs = []
        for p in layout.conv_parts:
            r = layout.conv_region(p, 0, p.channels)
            segs.append((f"conv.{p.sub.name}" if len(layout.conv_parts) > 1 else "conv", r.offset, r.nbytes))
        segs.append(("ssm", layout.ssm_offset, layout.ssm_bytes))
        segs.append(("padding", layout.state_bytes, layout.padding_bytes))
        out["state"] = segs
    if layout.spec.attention is not None:
        per_head = layout.page_bytes // max(1, layout.kv_heads_local)
        first = layout.kv_shard.start
        out["attention"] = [(f"kv head {first + h}", h * per_head, per_head) for h in range(layout.kv_heads_local)]
    return out


def plot_page_map(layout: RankLayout, path: str | Path | None = None):
    """One rank's pages drawn to byte scale: state page (with a zoom on the conv state) and attention page."""
    segs = page_segments(layout)
    rows = [("state page", segs["state"], layout.page_bytes)] if "state" in segs else []
    if "state" in segs:
        rows.append(("conv state (zoom)", [s for s in segs["state"] if s[0].startswith("conv")], layout.conv_bytes))
    if "attention" in segs:
        rows.append(("attention page", segs["attention"], layout.page_bytes))
    fig = Figure(figsize=(11, 1.5 * len(rows) + 0.9))
    axes = fig.subplots(len(rows), 1, squeeze=False)
    spec = layout.spec
    fig.suptitle(
        f"{spec.name}: TP {layout.tp_size} rank {layout.tp_rank}, conv {layout.conv_layout}, block "
        f"{layout.block_size} tokens, page {_fmt_bytes(layout.page_bytes)}",
        fontsize=11,
    )
    for ax, (title, parts, total) in zip(axes[:, 0], rows):
        for label, off, n in parts:
            color = COLORS.get(label, COLORS["kv"] if label.startswith("kv") else "#999999")
            ax.add_patch(Rectangle((off, 0), n, 1, facecolor=color, edgecolor="white", linewidth=1))
            if n / max(total, 1) > 0.06:
                ax.text(off + n / 2, 0.5, f"{label}\n{_fmt_bytes(n)}", ha="center", va="center", fontsize=8)
        ax.set_xlim(0, max(total, 1))
        ax.set_ylim(0, 1)
        ax.set_yticks([])
        ax.set_title(f"{title} ({_fmt_bytes(total)})", fontsize=9, loc="left")
        ax.set_xlabel("byte offset in page", fontsize=8)
        ax.tick_params(labelsize=7)
    used = {lbl for _, parts, _ in rows for lbl, _, _ in parts}
    handles = [Patch(color=c, label=k) for k, c in COLORS.items() if k in used]
    if "attention" in segs:
        handles.append(Patch(color=COLORS["kv"], label="kv (K||V per token)"))
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.08, 1, 0.95))
    return _save(fig, path), segs


def plot_plan(plan: TransferPlan, path: str | Path | None = None, layer: int | None = None):
    """Which byte ranges of which prefill rank land where in which decode rank, for one state layer
    (conv and SSM panels) and attention block 0, coloured by component."""
    spec = plan.spec
    state_layer = layer if layer is not None else next((x.index for x in spec.state_layers), None)
    attn_layer = next((x.index for x in spec.attention_layers), None)
    panels = []
    if state_layer is not None:
        panels += [
            ("conv state", lambda pc: pc.component.startswith("conv"), lambda lay: (0, lay.conv_bytes)),
            ("ssm state", lambda pc: pc.component == "ssm", lambda lay: (lay.ssm_offset, lay.ssm_bytes)),
        ]
    if attn_layer is not None:
        panels.append(("attention block 0", lambda pc: pc.component == "kv", lambda lay: (0, lay.page_bytes)))
    fig = Figure(figsize=(5 * len(panels), 1.0 + 0.55 * (plan.prefill_tp + plan.decode_tp)))
    axes = fig.subplots(1, len(panels), squeeze=False)
    fig.suptitle(
        f"{spec.name}: prefill TP {plan.prefill_tp} -> decode TP {plan.decode_tp} (conv {plan.prefill[0].conv_layout})",
        fontsize=11,
    )
    data = []
    n_rows = plan.prefill_tp + plan.decode_tp + 1
    for ax, (title, keep, region) in zip(axes[0], panels):
        target = state_layer if title != "attention block 0" else attn_layer
        y_p = {r: n_rows - 1 - r for r in range(plan.prefill_tp)}
        y_d = {r: plan.decode_tp - 1 - r for r in range(plan.decode_tp)}
        for side, lays, ys in (("P", plan.prefill, y_p), ("D", plan.decode, y_d)):
            for r in range(len(lays)):
                ax.add_patch(Rectangle((0, ys[r]), 1, 0.6, facecolor="#f4f4f4", edgecolor="#888888"))
                ax.text(-0.02, ys[r] + 0.3, f"{side}{r}", ha="right", va="center", fontsize=8)
        for pc in plan.pieces:
            if pc.layer != target or not keep(pc) or (pc.component == "kv" and pc.dst_block != 0):
                continue
            s0, sn = region(plan.prefill[pc.src_rank])
            d0, dn = region(plan.decode[pc.dst_rank])
            for src_off, dst_off, n in pc.run_offsets():
                a, b = (src_off - s0) / sn, (dst_off - d0) / dn
                wa, wb = n / sn, n / dn
                color = COLORS.get(pc.component, "#999999")
                ys, yd = y_p[pc.src_rank], y_d[pc.dst_rank]
                ax.add_patch(Rectangle((a, ys), wa, 0.6, facecolor=color, edgecolor="white", linewidth=0.8))
                ax.add_patch(Rectangle((b, yd), wb, 0.6, facecolor=color, edgecolor="white", linewidth=0.8))
                quad = [(a, ys), (a + wa, ys), (b + wb, yd + 0.6), (b, yd + 0.6)]
                ax.add_patch(Polygon(quad, closed=True, facecolor=color, alpha=0.15, edgecolor=color, linewidth=0.4))
                if pc.src.rows == 1:  # label the slices wide enough to hold text
                    if wa > 0.07:
                        ax.text(a + wa / 2, ys + 0.3, f"→D{pc.dst_rank}", ha="center", va="center", fontsize=7)
                    if wb > 0.07:
                        ax.text(b + wb / 2, yd + 0.3, f"P{pc.src_rank}", ha="center", va="center", fontsize=7)
                data.append(
                    {
                        "panel": title,
                        "prefill_rank": pc.src_rank,
                        "decode_rank": pc.dst_rank,
                        "component": pc.component,
                        "layer": pc.layer,
                        "src_offset": src_off,
                        "dst_offset": dst_off,
                        "nbytes": n,
                    }
                )
        p_size, d_size = region(plan.prefill[0])[1], region(plan.decode[0])[1]
        ax.set_title(f"{title} (layer {target}): P {_fmt_bytes(p_size)} -> D {_fmt_bytes(d_size)}", fontsize=9)
        ax.set_xlim(-0.08, 1.0)
        ax.set_ylim(-0.2, n_rows)
        ax.set_yticks([])
        ax.set_xlabel("position in region (fraction of that rank's bytes)", fontsize=8)
        ax.tick_params(labelsize=7)
    used = sorted({d["component"] for d in data})
    fig.legend(
        handles=[Patch(color=COLORS.get(c, "#999999"), label=c) for c in used],
        loc="lower center",
        ncol=max(1, len(used)),
        fontsize=8,
        frameon=False,
    )
    fig.tight_layout(rect=(0, 0.1, 1, 0.93))
    return _save(fig, path), data


def descriptor_table(spec: ModelSpec, pairs: Sequence[tuple[int, int]], tokens: int, **kw) -> list[dict]:
    out = []
    for p, d in pairs:
        plan = TransferPlan.build(spec, p, d, tokens, **kw)
        out.append(
            {
                "pair": f"{p}->{d}",
                "strided": plan.strided_descriptors(),
                "packed": plan.packed_descriptors(),
                "bytes": plan.bytes_moved(),
            }
        )
    return out


def plot_descriptors(
    spec: ModelSpec, pairs: Sequence[tuple[int, int]], tokens: int = 1024, path: str | Path | None = None, **kw
):
    """Descriptors and bytes per request, strided vs packed, across TP pairs."""
    rows = descriptor_table(spec, pairs, tokens, **kw)
    fig = Figure(figsize=(11, 3.8))
    a1, a2 = fig.subplots(1, 2)
    x = range(len(rows))
    w = 0.38
    a1.bar([i - w / 2 for i in x], [r["strided"] for r in rows], w, label="strided (1 per run)", color="#9c9c9c")
    a1.bar([i + w / 2 for i in x], [r["packed"] for r in rows], w, label="packed (1 per unit)", color="#4e79a7")
    for i, r in zip(x, rows):
        a1.text(i - w / 2, r["strided"], str(r["strided"]), ha="center", va="bottom", fontsize=7)
        a1.text(i + w / 2, r["packed"], str(r["packed"]), ha="center", va="bottom", fontsize=7)
    a1.set_yscale("log")
    a1.set_ylabel("NIXL descriptors per request (log)")
    a1.set_title(f"{spec.name}, {tokens} tokens: descriptors", fontsize=10)
    a2.bar(list(x), [r["bytes"] / (1 << 20) for r in rows], 0.6, color="#b07aa1")
    a2.set_ylabel("MiB moved per request (same in both modes)")
    a2.set_title("bytes per request", fontsize=10)
    for a in (a1, a2):
        a.set_xticks(list(x), [r["pair"] for r in rows])
        a.set_xlabel("prefill TP -> decode TP")
    a1.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path), rows


def padding_table(spec: ModelSpec, tps: Sequence[int], **kw) -> list[dict]:
    out = []
    for tp in tps:
        lay = RankLayout(spec, tp, 0, **kw)
        out.append(
            {
                "tp": tp,
                "page_bytes": lay.page_bytes,
                "state_bytes": lay.state_bytes,
                "padding_bytes": lay.padding_bytes,
                "padding_pct": 100 * lay.padding_bytes / lay.page_bytes,
            }
        )
    return out


def plot_padding(specs: Sequence[ModelSpec], tps: Sequence[int] = (1, 2, 4, 8), path: str | Path | None = None, **kw):
    """Padding waste of the state page per TP (vLLM's hybrid page rule), one bar group per model."""
    data = {}
    fig = Figure(figsize=(9, 3.6))
    ax = fig.subplots()
    w = 0.8 / max(1, len(specs))
    for k, spec in enumerate(specs):
        ok = []
        for tp in tps:
            try:
                RankLayout(spec, tp, 0, **kw)
                ok.append(tp)
            except ValueError:
                continue
        rows = padding_table(spec, ok, **kw)
        data[spec.name] = rows
        xs = [tps.index(r["tp"]) + (k - (len(specs) - 1) / 2) * w for r in rows]
        bars = ax.bar(xs, [r["padding_pct"] for r in rows], w, label=spec.name)
        for b, r in zip(bars, rows):
            ax.text(
                b.get_x() + b.get_width() / 2,
                b.get_height(),
                f"{r['padding_pct']:.1f}%",
                ha="center",
                va="bottom",
                fontsize=7,
            )
    ax.set_xticks(range(len(tps)), [f"TP {t}" for t in tps])
    ax.set_ylabel("padding, % of the hybrid page")
    ax.set_title("state-page padding per TP (never transferred)", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path), data
