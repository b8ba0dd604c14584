"""HybridKVPushConnector inside vLLM 0.32 (the prefill WRITEs): prefill and decode connector workers built
from vLLM's own objects, vLLM's push scheduler metadata (the decode engine registers a request, the prefill
engine's finished blocks), real NIXL agents over UCX on DRAM. Each decode rank's whole backing buffer is
compared byte for byte with the oracle, so every byte outside the written pages is checked too."""

from __future__ import annotations

import re
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("vllm", reason="needs the vllm extra (CI installs it)")
pytest.importorskip("nixl", reason="needs the nixl extra (CI installs it)")

import vllm_steps as S
import vllm_util as U
from bytecheck import assert_same_bytes
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole
from vllm.distributed.kv_transfer.kv_connector.v1.nixl.push_worker import NixlPushConnectorWorker
from vllm_pair import assert_exact, assert_untouched

from hybrid_kv.vllm import HybridKVPushConnector
from hybrid_kv.vllm.push import HybridKVPushWorker

pytestmark = pytest.mark.usefixtures("ds_layout")


@pytest.mark.parametrize(
    ("value", "cls"), [(None, HybridKVPushWorker), ("packed", HybridKVPushWorker), ("strided", NixlPushConnectorWorker)]
)
def test_flag_selects_the_push_worker(tmp_path, monkeypatch, value, cls):
    if value is None:
        monkeypatch.delenv("HYBRID_KV_TRANSFER", raising=False)
    else:
        monkeypatch.setenv("HYBRID_KV_TRANSFER", value)
    eng = U.build_engine(U.model_dir(tmp_path, "jamba-v0.1"), "jamba-v0.1", 1, "e", push=True)
    try:
        w = eng.conns[0].connector_worker
        assert type(w) is cls  # strided: vLLM's push worker, unchanged
        assert isinstance(eng.conns[0], HybridKVPushConnector)
    finally:
        eng.shutdown()


@pytest.mark.parametrize("value", ["auto", "fast"])
def test_push_refuses_what_it_cannot_do_at_startup(tmp_path, monkeypatch, value):
    """auto chooses from READs the decode rank times; a push decode rank has none: refused by name."""
    monkeypatch.setenv("HYBRID_KV_TRANSFER", value)
    vc = U.vllm_config(U.model_dir(tmp_path, "jamba-v0.1"), 1, "e", push=True)
    for role in (KVConnectorRole.SCHEDULER, KVConnectorRole.WORKER):
        want = rf"transfer mode '{value}' \(from HYBRID_KV_TRANSFER\) is not one of packed, strided \(the vLLM push"
        with pytest.raises(ValueError, match=want):
            HybridKVPushConnector(vc, role, None)


# ---- byte-exact transfers -------------------------------------------------------------------------------

CASES = [
    ("qwen3-next-80b-a3b", 1, 2),
    ("qwen3-next-80b-a3b", 2, 1),
    ("qwen3-next-80b-a3b", 1, 4),  # 2 KV heads: decode ranks 1 and 3 hold replicated heads
    ("nemotron-h-8b", 2, 4),
    ("nemotron-h-8b", 4, 2),
    ("falcon-h1-0.5b", 1, 2),
    ("jamba-v0.1", 2, 1),
    ("kimi-linear-48b-a3b", 1, 2),  # KDA state; MLA latent KV whole on every rank (vLLM's own WRITE)
]


def stock_push_right(pair) -> bool:
    """Where vLLM's own push moves every byte: not with replicated Mamba2 B/C at different TP (its 3-read
    formulas misread them, reference §4), not where the decode side replicates KV heads (below)."""
    spec, ptp, dtp = pair.p.spec, pair.p.tp, pair.d.tp
    replicated_bc = spec.state.kind.value == "mamba2" and spec.state.groups == 1 and ptp != dtp
    replicated_heads = not spec.attention.latent and dtp > max(ptp, spec.attention.num_kv_heads)
    return not (replicated_bc or replicated_heads)


def _descriptors(eng) -> int:
    """NIXL descriptors this engine's transfers posted (telemetry: in push the prefill posts them all)."""
    return sum(sum(c.connector_worker.xfer_stats.data["num_descriptors"]) for c in eng.conns)


@pytest.mark.parametrize(("name", "ptp", "dtp"), CASES, ids=[f"{n}-{p}to{d}" for n, p, d in CASES])
def test_push_packed_and_strided(pairs, name, ptp, dtp):
    """Both flag values on the same requests. Packed: byte-exact always, one WRITE descriptor per (transfer
    unit, decode rank) for the state, attention as vLLM writes it, no `pack` message, nothing left behind."""
    strided = pairs(name, ptp, dtp, "strided", push=True)
    _, failed, _ = strided.run()
    assert not any(failed)
    if stock_push_right(strided):
        assert_exact(strided)
    tel_strided = _descriptors(strided.p)
    strided.close()

    packed = pairs(name, ptp, dtp, "packed", push=True)
    _, failed, _ = packed.run()
    assert not any(failed)
    assert_exact(packed)
    packed.wait_no_leaks()
    n = len(packed.reqs)
    pairs_ = max(ptp, dtp)  # (prefill rank, decode rank) pairs that share state, integer ratios
    for c in packed.p.conns:
        w = c.connector_worker
        served = dtp // ptp if dtp > ptp else 1
        assert w.hkv.send.out.descriptors == {S.p_id(q.req_id): served for q in packed.reqs}
        assert w.hkv.server.received.get("pack", 0) == 0  # nobody asked: the grant came with the registration
        assert w.hkv.server.received.get("grant", 0) == n * served
    state_layers = len(packed.p.spec.state_layers)
    parts = 2 if packed.p.spec.state.kind.value == "mamba1" else 4
    attention = tel_strided - n * state_layers * parts * pairs_
    kv = packed.p.spec.attention.num_kv_heads
    if not packed.p.spec.attention.latent and dtp > max(ptp, kv):  # vLLM wrote one rank per head, packed all
        attention = attention * dtp // len({r * kv // dtp for r in range(dtp)})
    assert _descriptors(packed.p) == attention + n * pairs_
    for c in packed.d.conns:
        assert not c.connector_worker._recving_transfers  # the decode posted nothing: the prefill wrote


def test_stock_push_skips_decode_ranks_with_replicated_heads(pairs):
    """Why packed push fills them in: vLLM 0.32's push writes attention only to the first decode rank of each
    KV head (`compute_tp_mapping`'s pull-side dedup, applied by the writer), so with Qwen3-Next (2 KV heads)
    at decode TP 4 decode ranks 1 and 3 receive no attention KV at all; their state and ranks 0 and 2 are
    right. (vLLM's pull reads each rank's head itself and is right.)"""
    pair = pairs("qwen3-next-80b-a3b", 1, 4, "strided", push=True)
    _, failed, _ = pair.run()
    assert not any(failed)
    want = pair.expected()
    for r in range(4):
        bad = (want[r] != pair.d.storage(r)).nonzero().flatten()
        assert (bad.numel() > 0) == (r in (1, 3)), r
        if bad.numel():
            spans = attention_spans(pair, r)
            assert all(any(a <= int(b) < z for a, z in spans) for b in bad[:: max(1, bad.numel() // 1000)])


def attention_spans(pair, r: int) -> list[tuple[int, int]]:
    """Byte ranges of decode rank r's attention layers in its backing buffer."""
    names = U.layer_names(pair.d)
    base = pair.d.storage(r).data_ptr()
    out = []
    for i in (layer.index for layer in pair.d.spec.attention_layers):
        t = pair.d.caches[r][names[i]]
        out.append((t.data_ptr() - base, t.data_ptr() - base + t.shape[0] * t.stride(0) * t.element_size()))
    return out


@pytest.mark.parametrize("order", ["grant-late", "prefill-first"])
def test_grant_after_the_match(pairs, order):
    """The grant reaches the prefill rank after vLLM matched the registration with the finished prefill
    (held back here), or the prefill finishes before the decode engine registers at all: the WRITE waits
    for the grant without blocking vLLM's writer thread, then everything is byte-exact."""
    pair = pairs("nemotron-h-8b", 2, 1, "packed", push=True)
    gate = threading.Event()
    w = pair.d.conns[0].connector_worker
    real = w.hkv.recv.send_grants

    def held(*a):
        assert gate.wait(60)
        real(*a)

    if order == "grant-late":
        w.hkv.recv.send_grants = held
        S.submit(pair.p, pair.d, pair.reqs, push=True)
    else:
        for c in pair.p.conns:
            S.step(c, S.send_meta(pair.reqs))
        for c in pair.d.conns:
            S.step(c, S.recv_meta(pair.reqs, pair.p, pair.d))
    senders = [c.connector_worker for c in pair.p.conns]
    if order == "grant-late":
        deadline = time.monotonic() + 30
        while not all(len(s.hkv.send.out.awaiting) == len(pair.reqs) for s in senders):  # matched, waiting for grants
            assert time.monotonic() < deadline, [s.hkv.send.out.awaiting for s in senders]
            for c in (*pair.p.conns, *pair.d.conns):
                S.step(c, S.NixlConnectorMetadata())
                c.connector_worker.get_transfer_results()
            time.sleep(0.01)
        gate.set()
    ids = {q.req_id for q in pair.reqs}
    _, failed, _ = S.run_until(pair.p.conns, pair.d.conns, ids, {S.p_id(i) for i in ids})
    assert not any(failed)
    assert_exact(pair)
    pair.wait_no_leaks()


def test_prefill_holds_a_request_until_its_state_writes_ended(pairs, monkeypatch):
    """vLLM's report that a request was sent (its blocks and hybrid-kv's staging are then reused) waits for
    the state WRITEs, not only for vLLM's own: a state WRITE NIXL reports in flight for its first polls keeps
    the request unreported and its staging held."""
    pair = pairs("nemotron-h-8b", 1, 1, "packed", push=True, n=1)
    w = pair.p.conns[0].connector_worker
    nx, real, polls = w.nixl_wrapper, w.nixl_wrapper.check_xfer_state, {}

    def slow(handle):  # as a slow link would: our state WRITEs stay in flight for 20 polls
        mine = any(handle is h for out in w.hkv.send.out.pushes.values() for h in out.handles.values())
        if mine and polls.setdefault(id(handle), 0) < 20:
            polls[id(handle)] += 1
            return "PROC"
        return real(handle)

    monkeypatch.setattr(nx, "check_xfer_state", slow)
    S.submit(pair.p, pair.d, pair.reqs, push=True)
    req = pair.reqs[0]
    sent, received = set(), set()
    deadline = time.monotonic() + 60
    # (until the decode rank reported it too: its scatter may complete after the prefill's report)
    while S.p_id(req.req_id) not in sent or req.req_id not in received:
        assert time.monotonic() < deadline
        for c in (*pair.d.conns, *pair.p.conns):
            S.step(c, S.NixlConnectorMetadata())
        received |= pair.d.conns[0].connector_worker.get_transfer_results().finished_recving
        res = w.get_transfer_results()
        if polls and min(polls.values()) < 20:  # a state WRITE still "in flight"
            assert not res.finished_sending, "reported sent while its state WRITE was in flight"
            assert w.hkv.server.sender.live_slots > 0, "staging freed while its state WRITE was in flight"
        sent |= res.finished_sending
        time.sleep(0.002)
    assert polls and all(n == 20 for n in polls.values())
    assert_exact(pair)
    pair.wait_no_leaks()


@pytest.mark.parametrize("mode", ["packed", "strided"])
def test_push_with_a_decode_prefix_hit_moves_only_what_is_missing(pairs, mode):
    """Prefix caching on both engines (vLLM's mamba_cache_mode 'align'): the decode cache already holds the
    first KV block of one request, so vLLM's push registration carries only the blocks after it (and the
    running-state block); the prefill writes exactly those (vLLM trims its own list from the front), the
    held block keeps its bytes, every other byte of every decode rank is the oracle's."""
    pair = pairs("qwen3-next-80b-a3b", 1, 2, mode, n=3, d_cache=S.ALIGN, p_cache=S.ALIGN, push=True)
    none, _, part = pair.reqs  # 90 and 1490 tokens: 1 and 2 KV blocks
    pair.reqs = [none, part]
    kinds = [k for _, _, k in pair.d.groups()]
    part.d_blocks = [ids[1:] if k == "attn" else ids for ids, k in zip(part.d_blocks, kinds)]
    want = S.expected_with_hits(pair, {part.req_id: 1})
    _, failed, _ = pair.run()
    assert not any(failed)
    for r, w in enumerate(want):
        assert_same_bytes(pair.d.storage(r), w, f"decode rank {r} against the oracle")
    if mode == "packed":
        pair.wait_no_leaks()


# ---- failures: exactly the requests concerned, nothing written, nothing left behind -----------------------


@pytest.mark.parametrize(
    ("lie", "named"),
    [
        (lambda m: {**m, "units": [[0, m["units"][0][1], m["units"][0][2] + 16]]}, "which its plan for this rank"),
        (lambda m: {**m, "units": [[0, 1 << 40, m["units"][0][2]]]}, "-byte staging"),
        (lambda m: {**m, "until": float("nan")}, "grant until=nan"),
        (
            lambda m: {**m, "blocks": [[m["blocks"][0][0], [m["blocks"][0][1][0] ^ 1]], *m["blocks"][1:]]},
            "granted blocks",
        ),
    ],
    ids=["size", "offset", "until", "blocks"],
)
def test_a_lying_grant_fails_only_its_request(pairs, monkeypatch, caplog, lie, named):
    """A grant that does not fit the prefill rank's plan (a unit's size, a slot outside the decode rank's
    registered staging, a non-finite deadline, other block ids of the same count) is refused by name; the
    decode rank fails exactly that request with nothing written into its pages (attention included); the
    other request moves byte-exact; the prefill frees both requests' blocks."""
    from hybrid_kv.staging import messages as M

    pair = pairs("nemotron-h-8b", 1, 1, "packed", push=True)
    bad, good = pair.reqs
    real = M.grant
    monkeypatch.setattr(M, "grant", lambda *a: lie(real(*a)) if a[0] == bad.req_id else real(*a))
    S.submit(pair.p, pair.d, pair.reqs, push=True)
    ids = {q.req_id for q in pair.reqs}
    _, failed, _ = S.run_until(pair.p.conns, pair.d.conns, ids, {S.p_id(i) for i in ids}, timeout=60)
    assert failed[0] == {bad.req_id}
    assert named in caplog.text, caplog.text[-2000:]
    want = S.fill(pair.d, [good], "decode", 12)[0]  # the good request's pages, the bad one's untouched
    assert_same_bytes(pair.d.storage(0), want, "decode rank 0 against the good request + background")
    pair.wait_no_leaks()


def test_no_write_starts_inside_the_grants_margin(pairs, monkeypatch, caplog):
    """The decode rank's fence: a prefill rank starts no WRITE later than a grant's end minus PUSH_MARGIN_S.
    Each grant's end, as the prefill rank takes it, is moved relative to the prefill's clock: 1 s after the
    margin begins the request moves byte-exact; 10 ms inside it (so the check, which comes later, is always
    inside) it is refused as too late, the decode rank fails it with nothing written into its pages, and the
    prefill frees both requests' blocks.

    Bug caught: the check against the grant's end without the margin (`now > g.until`), or no check."""
    import dataclasses

    from hybrid_kv.staging import messages as M

    pair = pairs("nemotron-h-8b", 1, 1, "packed", push=True)
    late, ok = pair.reqs
    shift = {late.req_id: -0.01, ok.req_id: +1.0}
    srv = pair.p.conns[0].connector_worker.hkv.server.grants
    real_take = srv.take_grants

    def take(engine_id, ranks, req):
        end = time.monotonic() + M.PUSH_MARGIN_S + shift[req]
        return {r: dataclasses.replace(g, until=end) for r, g in real_take(engine_id, ranks, req).items()}

    monkeypatch.setattr(srv, "take_grants", take)
    S.submit(pair.p, pair.d, pair.reqs, push=True)
    ids = {q.req_id for q in pair.reqs}
    _, failed, _ = S.run_until(pair.p.conns, pair.d.conns, ids, {S.p_id(i) for i in ids}, timeout=60)
    assert failed[0] == {late.req_id}
    assert re.search(rf"grant of {late.req_id} ends in [45]\.\d s \(too late\)", caplog.text), caplog.text[-2000:]
    want = S.fill(pair.d, [ok], "decode", 12)[0]  # the request in time, the late one's pages untouched
    assert_same_bytes(pair.d.storage(0), want, "decode rank 0 against the request in time + background")
    pair.wait_no_leaks()


@pytest.mark.parametrize("withdrawal", ["heard", "lost"])
def test_grant_that_ends_before_the_prefill_fails_with_nothing_written(pairs, caplog, withdrawal):
    """The fence: a decode rank's grant ends while the prefill is still running; the decode rank fails the
    request at the grant's end, and the prefill, finishing later, writes nothing (neither state nor
    attention) into the decode rank and frees its blocks - whether it heard the decode rank give the
    request up, or that message was lost and only the grant's end stops it."""
    short = {"hybrid_kv_timeout_s": 3, "hybrid_kv_staging_lease_s": 7}  # grants end 7 s after they are made
    pair = pairs("qwen3-next-80b-a3b", 1, 2, "packed", push=True, d_extra=short)
    if withdrawal == "lost":
        for c in pair.d.conns:
            c.connector_worker.hkv.release = lambda engine_id, req, ranks: None
    ids = {q.req_id for q in pair.reqs}
    for c in pair.d.conns:
        S.step(c, S.recv_meta(pair.reqs, pair.p, pair.d))
    t0 = time.monotonic()
    _, failed, _ = S.run_until(pair.p.conns, pair.d.conns, ids, set(), timeout=30)
    assert all(f == ids for f in failed)
    assert time.monotonic() - t0 >= 7 - 1.0  # not before the grant's end
    assert "grant ended before the state landed" in caplog.text
    for c in pair.p.conns:  # now the prefills finish
        S.step(c, S.send_meta(pair.reqs))
    S.run_until(pair.p.conns, pair.d.conns, set(), {S.p_id(i) for i in ids}, timeout=30)
    if withdrawal == "lost":
        assert "too late" in caplog.text
    assert_untouched(pair)
    assert _descriptors(pair.p) == 0  # not one WRITE
    pair.wait_no_leaks()


def test_mismatched_ssm_dtype_refused_at_handshake(pairs, caplog):
    """vLLM's compatibility hash omits the Mamba dtypes (reference §4): the decode rank's hello, which in push
    mode precedes vLLM's own handshake with the prefill engine, names the field; the requests fail with
    nothing written and nothing held."""
    pair = pairs("nemotron-h-8b", 2, 2, "packed", push=True, d_cache={"mamba_ssm_cache_dtype": "float16"})
    failed = pair.run_failing()
    assert all(f == {q.req_id for q in pair.reqs} for f in failed)
    assert "state.ssm_dtype: prefill 'float32' vs decode 'float16'" in caplog.text
    assert_untouched(pair)
    assert _descriptors(pair.p) == 0
    pair.wait_no_leaks()


def test_one_source_refusing_waits_for_the_others_writes(pairs, monkeypatch, caplog):
    """Prefill TP 2 -> decode TP 1: the grant to prefill rank 0 lies (refused: nothing written from it),
    prefill rank 1 writes its state and its attention heads. The decode rank cannot tell when rank 1's
    attention WRITE has landed (vLLM counts notifications per request, not per source), so it fails the
    request only at the grant's end, never while a WRITE may be in flight; then nothing is left anywhere."""
    short = {"hybrid_kv_timeout_s": 3, "hybrid_kv_staging_lease_s": 7}
    pair = pairs("nemotron-h-8b", 2, 1, "packed", push=True, n=1, d_extra=short)
    req = pair.reqs[0]
    w = pair.d.conns[0].connector_worker
    real = w.hkv.recv.send_grants

    def lying(req, grants):  # the grant to prefill rank 0 names a unit 16 bytes too large
        link, m = grants[0]
        real(req, {**grants, 0: (link, {**m, "units": [[0, m["units"][0][1], m["units"][0][2] + 16]]})})

    monkeypatch.setattr(w.hkv.recv, "send_grants", lying)
    t0 = time.monotonic()
    S.submit(pair.p, pair.d, pair.reqs, push=True)
    _, failed, _ = S.run_until(pair.p.conns, pair.d.conns, {req.req_id}, {S.p_id(req.req_id)}, timeout=30)
    assert failed == [{req.req_id}]
    assert time.monotonic() - t0 >= 7 - 1.5, "failed while prefill rank 1's WRITEs could be in flight"
    assert "prefill rank 0: grant refused" in caplog.text
    senders = [c.connector_worker for c in pair.p.conns]
    assert [s.hkv.send.out.descriptors for s in senders] == [{}, {S.p_id(req.req_id): 1}]
    pair.wait_no_leaks()


def test_dead_prefill_fails_its_requests(pairs, caplog):
    """The prefill engine dies after the decode ranks granted: each decode rank fails the requests once the
    lost link's margin passed (long before the grant's end), nothing written, every receive slot freed."""
    pair = pairs("nemotron-h-8b", 1, 2, "packed", push=True)
    ids = {q.req_id for q in pair.reqs}
    for c in pair.d.conns:
        S.step(c, S.recv_meta(pair.reqs, pair.p, pair.d))
    deadline, server = time.monotonic() + 30, pair.p.conns[0].connector_worker.hkv.server
    while server.received.get("grant", 0) < pair.d.tp * len(ids):
        assert time.monotonic() < deadline
        for c in pair.d.conns:
            S.step(c, S.NixlConnectorMetadata())
        time.sleep(0.01)
    pair.p.shutdown()
    pair.engines.remove(pair.p)
    t0 = time.monotonic()
    _, failed, _ = S.run_until([], pair.d.conns, ids, set(), timeout=90)
    assert all(f == ids for f in failed)
    assert time.monotonic() - t0 < 90  # the lost link, not the grant's end (180 s)
    assert "link was lost" in caplog.text
    assert_untouched(pair)
    pair.wait_no_leaks()


def test_dead_decode_engine_costs_another_decode_engine_nothing(pairs):
    """One prefill engine pushes to two decode engines; one dies after granting. Its request's blocks are
    freed on the prefill side (the lease), its grants dropped; the other engine's request is byte-exact."""
    pair = pairs("jamba-v0.1", 1, 1, "packed", push=True)
    path = Path(pair.p.vc.model_config.model)  # the same model path: vLLM's compatibility hash covers it
    other = U.build_engine(path, "jamba-v0.1", 1, "decode2", push=True)
    pair.engines.append(other)
    bg = S.fill(other, [], "decode", 12)
    other.storage(0).copy_(bg[0])
    dead, alive = pair.reqs
    for c in pair.d.conns:
        S.step(c, S.recv_meta([dead], pair.p, pair.d))
    server = pair.p.conns[0].connector_worker.hkv.server
    deadline = time.monotonic() + 30
    while server.received.get("grant", 0) < 1:
        assert time.monotonic() < deadline
        S.step(pair.d.conns[0], S.NixlConnectorMetadata())
        time.sleep(0.01)
    pair.d.shutdown()
    pair.engines.remove(pair.d)
    S.step(other.conns[0], S.recv_meta([alive], pair.p, other))
    S.step(pair.p.conns[0], S.send_meta([dead], lease_s=3))  # its lease ends: nobody renews it
    S.step(pair.p.conns[0], S.send_meta([alive]))
    _, failed, _ = S.run_until(pair.p.conns, other.conns, {alive.req_id}, {S.p_id(alive.req_id)}, timeout=60)
    assert not any(failed)
    want = S.fill(other, [alive], "decode", 12)[0]
    assert_same_bytes(other.storage(0), want, "the other decode engine")
    S.run_until(pair.p.conns, [], set(), {S.p_id(dead.req_id)}, timeout=30)  # the lease frees the dead one's
    w = pair.p.conns[0].connector_worker
    deadline = time.monotonic() + 10
    while any(w.hkv.leaks().values()):
        assert time.monotonic() < deadline, w.hkv.leaks()
        S.step(pair.p.conns[0], S.NixlConnectorMetadata())
        w.get_transfer_results()
        time.sleep(0.01)
