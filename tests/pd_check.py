"""Byte check of one P/D request from the pages `pd_probe` recorded inside the engines, by the oracle.

Expected decode pages = the decode rank's pages before the load, with the request's global state (read
back from every prefill rank's pages by `oracle.read_shards`) written in by `oracle.write_shards`: both
are restated from the model dims, independent of `plan`, `batch`, `ops` and vLLM's descriptors. Every
byte of those pages is compared (so bytes the transfer must not write, too); with `whole_rank`, every
other page of the decode rank must also be unchanged between the start of the load and its completion.
"""

from __future__ import annotations

import glob
import json
import os

import torch

from hybrid_kv.layout import RankLayout
from hybrid_kv.oracle.state import read_shards, write_shards
from hybrid_kv.spec import LayerKind, ModelSpec
from hybrid_kv.spec_hf import spec_from_config

DTYPES = {"torch.bfloat16": "bfloat16", "torch.float16": "float16", "torch.float32": "float32"}


def model_spec(model_dir: str, rec: dict) -> ModelSpec:
    """The model's spec with the dtypes and the conv rows (speculative tokens) the engine allocated."""
    with open(os.path.join(model_dir, "config.json")) as f:
        spec = spec_from_config(json.load(f), name=os.path.basename(model_dir))
    dtypes = rec["dtypes"]
    spec = spec.with_dtypes(
        conv_dtype=DTYPES[dtypes["conv"]], ssm_dtype=DTYPES[dtypes["ssm"]], kv_dtype=DTYPES[dtypes["kv"]]
    )
    return spec.with_num_spec(rec["conv_rows"] - spec.state.conv_rows)


def _index(spec: ModelSpec, name: str, kind: str) -> int:
    """hybrid-kv layer index of a vLLM layer name (decoder layer number + kind)."""
    n = next(int(p) for p in name.split(".") if p.isdigit())
    attn = kind == "attn"
    for layer in spec.layers:
        if layer.decoder_layer == n and (layer.kind is LayerKind.ATTENTION) == attn:
            return layer.index
    raise KeyError(f"{name}: no {kind} layer {n} in {spec.name}")


def group_ids(ids, g: int) -> list[int]:
    """Group `g`'s block ids from a load's per-group lists; vLLM binds a load with no groups at all (`()`)
    when the decode side's prefix cache holds every block."""
    return list(ids[g]) if g < len(ids) else []


def _blocks(spec: ModelSpec, rec: dict, ids: list[list[int]]) -> tuple[dict[int, int], dict[int, list[int]]]:
    state, kv = {}, {}
    for name, g in rec["group"].items():
        kind = rec["kind"][name]
        i = _index(spec, name, kind)
        got = group_ids(ids, g)
        if kind == "attn":
            kv[i] = got
        elif got:
            state[i] = got[-1]
    return state, kv


def _pages(spec: ModelSpec, rec: dict, pages: dict) -> dict[tuple[int, int], torch.Tensor]:
    return {(_index(spec, n, rec["kind"][n]), b): t for (n, b), t in pages.items()}


def load(probe_dir: str, request_id: str) -> tuple[list[dict], list[dict]]:
    """(prefill rank records, decode rank records) of one request, in rank order."""

    def recs(side: str) -> list[dict]:
        paths = glob.glob(os.path.join(probe_dir, f"{side}*-{request_id}.pt"))
        out = [torch.load(p, weights_only=False) for p in paths]
        return sorted(out, key=lambda r: r["tp_rank"])

    return recs("P"), recs("D")


def check_request(
    model_dir: str, probe_dir: str, request_id: str, whole_rank: bool, prefix_hits: bool = False
) -> list[str]:
    """Problems found for one request (empty: byte-exact). Raises when a record is missing. `prefix_hits`:
    the decode engine may hold the request's first KV blocks already (prefix caching), so it receives fewer."""
    p_recs, d_recs = load(probe_dir, request_id)
    if not p_recs or len(p_recs) != p_recs[0]["tp_size"]:
        raise AssertionError(f"{request_id}: prefill page dumps of {len(p_recs)} rank(s) in {probe_dir}")
    if not d_recs or len(d_recs) != d_recs[0]["tp_size"]:
        raise AssertionError(f"{request_id}: decode probe records of {len(d_recs)} rank(s) in {probe_dir}")
    problems = []
    spec = model_spec(model_dir, p_recs[0])
    if any(r["conv_rows"] != spec.state.conv_rows for r in p_recs + d_recs):
        raise AssertionError(
            f"{request_id}: conv rows differ between ranks: {[r['conv_rows'] for r in p_recs + d_recs]}"
        )
    conv = p_recs[0]["conv_layout"]

    def layout(rec: dict) -> RankLayout:
        lay = RankLayout(spec, rec["tp_size"], rec["tp_rank"], conv, "HND", rec["block_size"])
        if lay.block_size != rec["block_size"]:
            raise AssertionError(f"hybrid-kv block size {lay.block_size} != the engine's {rec['block_size']}")
        return lay

    p_state, p_kv = _blocks(spec, p_recs[0], p_recs[0]["block_ids"])
    p_pages = [_pages(spec, r, r["pages"]) for r in p_recs]
    glob_state = read_shards(
        [layout(r) for r in p_recs], [lambda i, b, pg=pg: pg[(i, b)] for pg in p_pages], p_state, p_kv
    )
    for d in d_recs:
        if d["failed"]:
            problems.append(f"decode rank {d['tp_rank']}: the load failed")
            continue
        d_state, d_kv = _blocks(spec, d, d["local_block_ids"])
        want = {k: v.clone() for k, v in _pages(spec, d, d["before"]).items()}
        for i, ids in d_kv.items():
            held = len(p_kv[i]) - len(ids)  # blocks a decode-side prefix-cache hit already holds
            if held < 0 or (held and not prefix_hits):
                problems.append(f"layer {i}: {len(ids)} decode KV blocks for {len(p_kv[i])} prefill blocks")
            elif held:
                # they pair with the prefill's first blocks (vLLM trims the prefill list's front): the oracle
                # writes those into scratch pages, so that only the blocks the receive moved are compared
                d_kv[i] = [-1 - k for k in range(held)] + ids
        page = max(want.values(), key=lambda t: t.numel(), default=torch.empty(0, dtype=torch.uint8))
        lay = layout(d)
        write_shards(
            torch.empty(0, dtype=torch.uint8),
            lay,
            0,
            glob_state,
            d_state,
            d_kv,
            len(next(iter(p_kv.values()), [])) * lay.block_size,
            page_of=lambda i, b, w=want, pg=page: w[(i, b)] if b >= 0 else torch.empty_like(pg),
        )
        got = _pages(spec, d, d["after"])
        for key in sorted(want):
            if not torch.equal(want[key], got[key]):
                bad = (want[key] != got[key]).nonzero()
                problems.append(
                    f"decode rank {d['tp_rank']} layer {key[0]} block {key[1]}: {bad.numel()} byte(s) differ "
                    f"from the oracle, first at page offset {int(bad[0])}"
                )
        if whole_rank:
            mine = set(d["write_offsets"])
            changed = [k for k, v in d["digests_after"].items() if d["digests_before"][k] != v and k not in mine]
            if changed:
                problems.append(
                    f"decode rank {d['tp_rank']}: {len(changed)} page(s) outside the request changed, "
                    f"at storage offsets {changed[:8]}"
                )
    return problems
