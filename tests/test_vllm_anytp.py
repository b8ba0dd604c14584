"""Prefill and decode TP sizes that do not divide each other (#15 item 2), on vLLM's own objects and real
NIXL agents: the packed pull worker moves the attention KV head slices with the state (vLLM's head mapping
asserts that one size divides the other); `strided` (vLLM's worker) and push refuse such pairs, naming
both sizes.

The model is Qwen3-Next's real config with its head counts set so that TP 2, 3, 4 and 6 all shard it
(12 KV heads: 4 -> 6 is the "12 heads shard at 6 but not at 8" case), trimmed to 4 layers (3 GDN, 1
attention)."""

from __future__ import annotations

import logging

import pytest
import vllm_util as U
from bytecheck import assert_same_bytes
from vllm_pair import assert_exact
from vllm_steps import recv_meta, run_until, send_meta, step

MODEL = "qwen3-next-80b-a3b"
pytestmark = pytest.mark.usefixtures("ds_layout")


def sixes(c: dict) -> None:
    U.heads12(c)
    c.update(num_hidden_layers=4)


def sources_of(p_tp: int, d_tp: int, d: int) -> list[int]:
    """By hand: the prefill ranks whose KV heads (12) or GDN key heads (12; value heads follow them)
    overlap decode rank d's. Both split evenly, so one interval rule covers both."""
    lo, hi = d * 12 // d_tp, (d + 1) * 12 // d_tp
    return [p for p in range(p_tp) if p * 12 // p_tp < hi and lo < (p + 1) * 12 // p_tp]


CASES = [(2, 3), (3, 2), (4, 6)]


@pytest.mark.parametrize(("ptp", "dtp"), CASES, ids=[f"{p}to{d}" for p, d in CASES])
def test_packed_moves_pairs_that_do_not_divide(pairs, caplog, ptp, dtp):
    """Every decode byte equals the oracle's (state and attention KV, and everything else untouched); the
    prefill ranks report each request sent, which vLLM does only once as many decode ranks as read from
    that rank have notified it; one descriptor per (unit, source rank), nothing of vLLM's own.

    Bug caught: a consumer count one too high in the notifications (the prefill would then wait for a
    decode rank that never reads from it, and free the blocks only when vLLM's lease expires): the count is
    compared with the hand-built source table, and no prefill rank may have released a request by expiry."""
    pair = pairs(MODEL, ptp, dtp, "packed", edit=sixes, n=3)
    _, failed, _ = pair.run()
    assert not any(failed)
    assert_exact(pair)
    pair.wait_no_leaks()
    for r, c in enumerate(pair.d.conns):
        w = c.connector_worker
        src = sources_of(ptp, dtp, r)
        assert sorted(w._remote_agents["prefill"]) == [(0, p) for p in src]
        assert w.hkv.descriptors == {q.req_id: len(src) for q in pair.reqs}
        assert sum(w.xfer_stats.data["num_descriptors"]) == len(pair.reqs) * len(src)
    readers = {p: sum(p in sources_of(ptp, dtp, d) for d in range(dtp)) for p in range(ptp)}
    plans = pair.d.conns[0].connector_worker.hkv.plans
    assert {p: plans.consumers(ptp, dtp, p) for p in range(ptp)} == readers
    for c in pair.p.conns:  # every consumer notification arrived, and no request is still held
        w = c.connector_worker
        assert not w._reqs_to_send and not w.consumer_notification_counts_by_req
        expired = len(w.xfer_stats.data["num_kv_expired_reqs"])
        assert expired == 0, f"prefill rank {w.tp_rank}: {expired} requests freed by lease expiry, not notified"
    # a count below the true number of readers frees a request on its first notification: the next is late
    assert "unrecognized request" not in caplog.text


def test_partial_prefix_hit_moves_only_the_missing_blocks(pairs):
    """A decode rank that holds a request's first attention block already (a local prefix hit) gets the
    others and the state; its cached block keeps its bytes (vLLM pairs the prefill's tail)."""
    pair = pairs(MODEL, 2, 3, "packed", edit=sixes, n=3)
    q = pair.reqs[2]  # 1490 tokens: 2 attention blocks
    attn = [g for g, _, kind in pair.d.groups() if kind == "attn"]
    assert len(q.d_blocks[attn[0]]) == 2
    held = q.d_blocks[attn[0]][0]
    for c in pair.p.conns:
        step(c, send_meta(pair.reqs))
    meta = recv_meta(pair.reqs, pair.p)
    m = meta.reqs_to_recv[q.req_id]
    ids = [list(g) for g in q.d_blocks]  # (a copy: the oracle's expectation keeps both blocks)
    ids[attn[0]] = [q.d_blocks[attn[0]][1]]
    m.local_block_ids = m.local_physical_block_ids = ids
    for c in pair.d.conns:
        step(c, meta)
    ids = {r.req_id for r in pair.reqs}
    _, failed, _ = run_until(pair.p.conns, pair.d.conns, ids, {f"{i}-0000beef" for i in ids})
    assert not any(failed)
    want = pair.expected()
    for r in range(pair.d.tp):
        got = pair.d.storage(r).clone()
        lay_page = pair.d.caches[r][pair.d.kcc.transfer_groups[attn[0]].layer_names[0]]
        page = lay_page.stride(0) * lay_page.element_size()
        off = lay_page.data_ptr() - pair.d.storage(r).data_ptr() + held * page
        assert_same_bytes(got[off : off + page], pair.background[r][off : off + page], "the cached block")
        got[off : off + page] = want[r][off : off + page]
        assert_same_bytes(got, want[r], f"decode rank {r} outside the cached block, against the oracle")
    pair.wait_no_leaks()


@pytest.mark.parametrize("push", [False, True], ids=["strided-pull", "packed-push"])
def test_refused_naming_both_sizes(pairs, caplog, push):
    """vLLM's own worker (strided) and the push connector cannot map such a pair: every request fails,
    and the log names both TP sizes; no decode page is written."""
    mode = "packed" if push else "strided"
    pair = pairs(MODEL, 2, 3, mode, edit=sixes, n=1, push=push)
    with caplog.at_level(logging.WARNING):
        failed = pair.run_failing()
    assert all(f == {pair.reqs[0].req_id} for f in failed)
    text = caplog.text
    if push:
        assert "prefill TP 2 -> decode TP 3: neither size divides the other" in text
    else:
        assert "Local tensor parallel size 3 is not divisible by remote tensor parallel size 2" in text
    for r in range(pair.d.tp):
        assert_same_bytes(pair.d.storage(r), pair.background[r], f"decode rank {r} pages were written")


def test_prefill_refuses_kv_blocks_a_pair_does_not_move(pairs):
    """A decode rank's `pack` is checked against the prefill rank's own plan: attention block ids are taken
    only from a decode TP whose pair moves KV, only for mapped groups, only in range; each refusal names
    the value, and nothing is staged."""
    import socket

    from hybrid_kv.staging.wire import recv_msg, send_msg

    pair = pairs(MODEL, 2, 3, "packed", edit=sixes, n=1)
    q = pair.reqs[0]
    for c in pair.p.conns:
        step(c, send_meta(pair.reqs, prefilled=False))
    srv = pair.p.conns[0].connector_worker.hkv.server
    fp = pair.d.conns[0].connector_worker.hkv.geom.fingerprint()
    attn = next(g for g, _, kind in pair.p.groups() if kind == "attn")
    mamba = [g for g, _, kind in pair.p.groups() if kind == "mamba"]
    req = f"{q.req_id}-0000beef"
    state = [[g, q.p_blocks[g]] for g in mamba]
    cases = {
        1: [  # 2 -> 1 divides: vLLM moves the attention KV, the pair moves state only
            (state + [[attn, q.p_blocks[attn]]], f"block ids for groups [{attn}], which pair 0->0 does not move"),
        ],
        3: [
            (state + [[attn, [10**6]]], "block id 1000000 of group"),
            (state + [[99, [0]]], "group 99 is not a Mamba or mapped attention group"),
        ],
    }
    for d_tp, bad in cases.items():
        with socket.create_connection(srv.address, timeout=5) as s:
            send_msg(s, {"type": "hello", "fingerprint": fp, "tp_size": d_tp, "tp_rank": 0})
            assert recv_msg(s, 5)[0]["type"] == "welcome"
            for blocks, why in bad:
                send_msg(s, {"type": "pack", "req": req, "blocks": blocks})
                head, _ = recv_msg(s, 5)
                assert head["type"] == "error" and why in head["message"], (blocks, head)
    assert srv.sender.live_slots == 0
