"""HybridKVConnector inside vLLM 0.32: prefill and decode connector workers built from vLLM's own objects
(VllmConfig of a real model config, the model class's state shapes, MambaSpec / FullAttentionSpec, vLLM's
KV cache grouping and allocation, the stock scheduler's handshake listener), real NIXL agents over UCX on
DRAM. Each rank's whole backing buffer is compared byte for byte with the oracle, so every byte outside
the written pages is checked too."""

from __future__ import annotations

import time

import pytest

pytest.importorskip("vllm", reason="needs the vllm extra (CI installs it)")
pytest.importorskip("nixl", reason="needs the nixl extra (CI installs it)")

import vllm_steps as S
import vllm_util as U
from bytecheck import assert_same_bytes
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole
from vllm.distributed.kv_transfer.kv_connector.v1.nixl.metadata import NixlConnectorMetadata
from vllm.distributed.kv_transfer.kv_connector.v1.nixl.pull_worker import NixlPullConnectorWorker
from vllm.model_executor.layers.mamba import mamba_utils
from vllm_pair import Pair, assert_exact

from hybrid_kv.vllm import HybridKVConnector
from hybrid_kv.vllm.pull import HybridKVWorker

pytestmark = pytest.mark.usefixtures("ds_layout")


# ---- the flag -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "cls"), [(None, HybridKVWorker), ("packed", HybridKVWorker), ("auto", HybridKVWorker), ("strided", None)]
)
def test_flag_selects_the_worker(tmp_path, monkeypatch, value, cls):
    if value is None:
        monkeypatch.delenv("HYBRID_KV_TRANSFER", raising=False)
    else:
        monkeypatch.setenv("HYBRID_KV_TRANSFER", value)
    eng = U.build_engine(U.model_dir(tmp_path, "jamba-v0.1"), "jamba-v0.1", 1, "e")
    try:
        w = eng.conns[0].connector_worker
        if cls is None:
            assert type(w) is NixlPullConnectorWorker  # strided: the stock worker, unchanged
        else:
            assert type(w) is cls
        assert isinstance(eng.conns[0], HybridKVConnector)
    finally:
        eng.shutdown()


@pytest.mark.parametrize("value", ["fast", "PACKED2", "auto2"])
def test_invalid_flag_fails_at_startup(tmp_path, monkeypatch, value):
    monkeypatch.setenv("HYBRID_KV_TRANSFER", value)
    vc = U.vllm_config(U.model_dir(tmp_path, "jamba-v0.1"), 1, "e")
    for role in (KVConnectorRole.SCHEDULER, KVConnectorRole.WORKER):
        want = rf"transfer mode '{value}' \(from HYBRID_KV_TRANSFER\) is not one of packed, strided, auto"
        with pytest.raises(ValueError, match=want):
            HybridKVConnector(vc, role, None)


def test_invalid_extra_config_fails_at_startup(tmp_path, monkeypatch):
    monkeypatch.setenv("HYBRID_KV_TRANSFER", "packed")
    vc = U.vllm_config(U.model_dir(tmp_path, "jamba-v0.1"), 1, "e", extra={"hybrid_kv_staging_byte": 1})
    with pytest.raises(ValueError, match=r"unknown kv_connector_extra_config key.*hybrid_kv_staging_byte"):
        HybridKVConnector(vc, KVConnectorRole.WORKER, None)
    vc = U.vllm_config(U.model_dir(tmp_path, "jamba-v0.1"), 1, "e", extra={"hybrid_kv_staging_bytes": 10})
    with pytest.raises(ValueError, match="hybrid_kv_staging_bytes=10 must be an integer >= 4096"):
        HybridKVConnector(vc, KVConnectorRole.WORKER, None)


# ---- byte-exact transfers -------------------------------------------------------------------------------

CASES = [
    ("qwen3-next-80b-a3b", 1, 2),
    ("qwen3-next-80b-a3b", 2, 1),
    ("qwen3-next-80b-a3b", 2, 4),
    ("qwen3-next-80b-a3b", 4, 2),
    ("nemotron-h-8b", 1, 2),
    ("nemotron-h-8b", 2, 4),
    ("nemotron-h-8b", 4, 2),
    ("falcon-h1-0.5b", 1, 2),
    ("falcon-h1-0.5b", 2, 1),
    ("jamba-v0.1", 1, 2),
    ("jamba-v0.1", 2, 1),
    ("kimi-linear-48b-a3b", 1, 2),  # KDA state; MLA latent KV whole on every rank (vLLM's own transfer)
    ("kimi-linear-48b-a3b", 2, 1),
]


@pytest.mark.parametrize(("name", "ptp", "dtp"), CASES, ids=[f"{n}-{p}to{d}" for n, p, d in CASES])
def test_packed_and_strided(pairs, name, ptp, dtp):
    """Both flag values on the same requests; packed byte-exact always, strided wherever stock vLLM is right.
    Descriptors per request: packed moves the state in one READ per source rank, attention identically."""
    strided = pairs(name, ptp, dtp, "strided")
    _, failed, _ = strided.run()
    assert not any(failed)
    stock_ok = not (name == "falcon-h1-0.5b" and ptp != dtp)  # replicated B/C: reference §4
    if stock_ok:
        assert_exact(strided)
    strided.close()

    packed = pairs(name, ptp, dtp, "packed")
    _, failed, _ = packed.run()
    assert not any(failed)
    assert_exact(packed)
    packed.wait_no_leaks()

    state_layers = len(packed.p.spec.state_layers)
    parts = 2 if packed.p.spec.state.kind.value == "mamba1" else 4
    n = len(packed.reqs)
    for r, (c, tel_packed, tel_strided) in enumerate(
        zip(packed.d.conns, packed.telemetry_descriptors(), strided.telemetry_descriptors())
    ):
        w = c.connector_worker
        sources = range(max(1, ptp // dtp))  # integer ratios: the prefill ranks whose shards overlap rank r's
        # one descriptor per (transfer unit, source rank): the default unit budget holds a request's state
        assert w.hkv.descriptors == {q.req_id: len(sources) for q in packed.reqs}
        # the stock path: 3 conv + 1 SSM (Mamba1: 1 + 1) per layer per block per SSM source rank
        stock_ssm_sources = max(1, ptp // dtp)
        attention = tel_strided - n * state_layers * parts * stock_ssm_sources
        assert tel_packed == attention + n * len(sources)
        print(
            f"{name} {ptp}->{dtp} decode rank {r}: descriptors per request "
            f"strided {tel_strided / n:g} (state {state_layers * parts * stock_ssm_sources}), "
            f"packed {tel_packed / n:g} (state {len(sources)})"
        )


def test_stock_path_misreads_replicated_bc(pairs):
    """Why packed exists: with Mamba2 n_groups=1 at different TP the stock 3-read reads SSM bytes as C
    (reference §4). The damage is confined to the decode rank's state pages; attention is right."""
    pair = pairs("falcon-h1-0.5b", 1, 2, "strided")
    pair.run()
    want, got = pair.expected()[1], pair.d.storage(1)
    bad = (want != got).nonzero().flatten()
    assert bad.numel() > 0
    spans = state_spans(pair, 1)
    assert all(any(a <= int(b) < z for a, z in spans) for b in bad[:: max(1, bad.numel() // 1000)])


def test_triton_backend_under_the_interpreter(pairs):
    """The Triton pack/scatter kernels (interpreted on CPU, native on GPU) give the same bytes."""
    extra = {"hybrid_kv_backend": "triton", "hybrid_kv_timeout_s": 600, "hybrid_kv_staging_lease_s": 1200}
    pair = pairs("jamba-v0.1", 2, 1, "packed", n=1, p_extra=extra, d_extra=extra)
    assert pair.p.conns[0].connector_worker.hkv.backend == "triton"
    _, failed, _ = pair.run(timeout=600)
    assert not any(failed)
    assert_exact(pair)


@pytest.mark.parametrize(("name", "ptp", "dtp"), [("nemotron-h-8b", 2, 1), ("falcon-h1-0.5b", 1, 2)])
def test_sd_conv_layout(pairs, monkeypatch, name, ptp, dtp):
    """Packing addresses each channel slice itself, so vLLM's SD conv layout works; the stock 3-read
    refuses SD at start-up."""
    monkeypatch.setenv("VLLM_SSM_CONV_STATE_LAYOUT", "SD")
    mamba_utils.get_conv_state_layout.cache_clear()
    pair = pairs(name, ptp, dtp, "packed")
    assert pair.d.conns[0].connector_worker.hkv.geom.layout.conv_layout == "SD"
    _, failed, _ = pair.run()
    assert not any(failed)
    assert_exact(pair)
    with pytest.raises(AssertionError, match="requires DS conv state layout"):
        pairs(name, ptp, dtp, "strided")


def test_large_request_split_into_units(pairs):
    """A unit budget below one request's state: several descriptors per source, still byte-exact."""
    extra = {"hybrid_kv_max_unit_bytes": 3 << 20}
    pair = pairs("qwen3-next-80b-a3b", 2, 1, "packed", p_extra=extra, d_extra=extra)
    _, failed, _ = pair.run()
    assert not any(failed)
    assert_exact(pair)
    w = pair.d.conns[0].connector_worker
    # 2 -> 1: decode rank 0 reads all of each prefill rank's state, at most 3 MiB per descriptor
    lay = U.layouts(pair.p, 0)
    least = -(-len(pair.d.spec.state_layers) * lay.state_bytes // (3 << 20))
    assert least > 1
    assert all(w.hkv.descriptors[q.req_id] >= 2 * least for q in pair.reqs)
    pair.wait_no_leaks()


def test_no_round_trip_after_warm_up(pairs):
    """Once a decode rank has connected, a prefill rank packs each request when its prefill finishes and
    pushes the staged units: the decode rank's READ waits on no reply (no `pack` reaches the prefill
    side), the bytes are exact, nothing leaks. The first request (it makes the connection) asks."""
    pair = pairs("nemotron-h-8b", 2, 1, "packed", n=3)
    warm, rest = pair.reqs[:1], pair.reqs[1:]
    ids = {q.req_id for q in warm}
    S.submit(pair.p, pair.d, warm)
    S.run_until(pair.p.conns, pair.d.conns, ids, {S.p_id(i) for i in ids})
    servers = [c.connector_worker.hkv.server for c in pair.p.conns]
    asked = sum(s.received.get("pack", 0) for s in servers)
    assert asked == 2  # warm-up: one per source rank
    for c in pair.p.conns:  # the prefills of the other requests finish
        S.step(c, S.send_meta(rest))
    links = [link for c in pair.d.conns for link in c.connector_worker.hkv.links.values()]
    deadline = time.monotonic() + 30
    while not all(all(S.p_id(q.req_id) in link._staged for q in rest) for link in links):
        # (the decode ranks' readers hold the pushes: a busy machine must not turn this into a race)
        assert time.monotonic() < deadline, [len(s.sender._staged) for s in servers]
        time.sleep(0.01)
    for c in pair.d.conns:
        S.step(c, S.recv_meta(rest, pair.p))
    ids = {q.req_id for q in rest}
    _, failed, _ = S.run_until(pair.p.conns, pair.d.conns, ids, {S.p_id(i) for i in ids})
    assert not any(failed)
    assert sum(s.received.get("pack", 0) for s in servers) == asked  # no request asked
    w = pair.d.conns[0].connector_worker
    assert {r: w.hkv.round_trips[r] for r in ids} == dict.fromkeys(ids, 0)
    assert w.hkv.round_trips[warm[0].req_id] == 2
    assert_exact(pair)
    pair.wait_no_leaks()


AUTO_CASES = [
    ("nemotron-h-8b", 2, 1, 1000.0, "packed"),  # descriptors dear: pack
    ("nemotron-h-8b", 2, 1, 0.0, "stock"),  # descriptors free: vLLM's own 3-read
    ("falcon-h1-0.5b", 1, 2, 0.0, "packed"),  # stock would misread replicated B/C: packed regardless
    ("jamba-v0.1", 1, 2, None, None),  # measured (copy at start-up, READs at handshake): either, exact
]


@pytest.mark.parametrize(("name", "ptp", "dtp", "desc_us", "reads"), AUTO_CASES)
def test_auto_chooses_per_prefill_engine(pairs, name, ptp, dtp, desc_us, reads):
    """auto: each decode rank chooses once per prefill engine; a rank that reads the stock way tells
    its sources, which then stage nothing for it; either way the bytes are exact and nothing leaks."""
    extra = {} if desc_us is None else {"hybrid_kv_desc_cost_us": desc_us}
    pair = pairs(name, ptp, dtp, "auto", n=3, d_extra=extra)
    warm, rest = pair.reqs[:1], pair.reqs[1:]
    ids = {q.req_id for q in warm}
    S.submit(pair.p, pair.d, warm)
    S.run_until(pair.p.conns, pair.d.conns, ids, {S.p_id(i) for i in ids})
    choices = [c.connector_worker.hkv.auto for c in pair.d.conns]
    assert all(list(ch) == [pair.p.engine_id] for ch in choices), choices
    got = [ch[pair.p.engine_id]["reads"] for ch in choices]
    # each rank decides on its own inputs: measured ones may differ between ranks (both choices are exact),
    # so what follows is counted per rank
    assert reads is None or set(got) == {reads}, choices
    if desc_us is None:
        for ch in choices:
            assert ch[pair.p.engine_id]["copy_gbps"] > 0 and ch[pair.p.engine_id]["desc_cost_us"] >= 0, ch
    servers = [c.connector_worker.hkv.server for c in pair.p.conns]
    links = [len(c.connector_worker.hkv.links) for c in pair.d.conns]
    stock_links = sum(n for n, r in zip(links, got) if r == "stock")
    assert sum(s.received.get("mode", 0) for s in servers) == stock_links
    for c in pair.p.conns:  # the prefills of the other requests finish
        S.step(c, S.send_meta(rest))
    for s in servers:  # the prepacker has run
        s._prepacker.submit(lambda: None).result(timeout=30)
    staged = sum(len(s.sender._staged) for s in servers)
    assert staged == (sum(links) - stock_links) * len(rest)
    for c in pair.d.conns:
        S.step(c, S.recv_meta(rest, pair.p))
    ids = {q.req_id for q in rest}
    _, failed, _ = S.run_until(pair.p.conns, pair.d.conns, ids, {S.p_id(i) for i in ids})
    assert not any(failed)
    assert_exact(pair)
    pair.wait_no_leaks()
    for c, r in zip(pair.d.conns, got):
        w = c.connector_worker
        assert (w.hkv.descriptors == {}) == (r == "stock"), (r, w.hkv.descriptors)
    if set(got) == {"stock"}:
        assert sum(s.received.get("pack", 0) for s in servers) == 0


def test_auto_never_trades_bytes_for_speed():
    """The pairs vLLM's stock descriptors cannot move exactly are named (hand-checked, reference §4)."""
    from hybrid_kv.mover.choice import stock_problem
    from hybrid_kv.spec_hf import load_spec

    falcon, nemo = load_spec("falcon-h1-0.5b"), load_spec("nemotron-h-8b")
    assert "B|C are replicated at TP 2" in stock_problem(falcon, "DS", 1, 2)
    assert stock_problem(falcon, "DS", 2, 2) is None  # same TP: every rank holds the same copy
    assert stock_problem(nemo, "DS", 1, 2) is None
    assert "SD" in stock_problem(nemo, "SD", 2, 2)


class _LateScatter:
    """A scatter that completes only on its 5th poll (as a GPU stream may): the copy runs then."""

    def __init__(self, copy) -> None:
        self.copy, self.polls, self.done = copy, 0, False

    def ready(self) -> bool:
        self.polls += 1
        if self.polls >= 5 and not self.done:
            self.copy().wait()
            self.done = True
        return self.done


def test_received_only_once_the_scatter_completed(pairs, monkeypatch):
    """A request is reported received only after its scatter completed: at the moment it is reported,
    the decode pages already hold every byte (a worker that reports on READ completion fails here)."""
    pair = pairs("nemotron-h-8b", 1, 2, "packed", n=1)
    late = []
    for c in pair.d.conns:
        cop = c.connector_worker.hkv.rx.copier
        real = cop.run

        def run(jobs, real=real):
            late.append(_LateScatter(lambda: real(jobs)))
            return late[-1]

        monkeypatch.setattr(cop, "run", run)
    S.submit(pair.p, pair.d, pair.reqs)
    want, reported = pair.expected(), set()
    deadline = time.monotonic() + 60
    while len(reported) < pair.d.tp and time.monotonic() < deadline:
        for c in (*pair.d.conns, *pair.p.conns):
            S.step(c, NixlConnectorMetadata())
        for r, c in enumerate(pair.d.conns):
            res = c.connector_worker.get_transfer_results()
            assert not res.failed_recving
            if res.finished_recving:
                assert_same_bytes(pair.d.storage(r), want[r], f"decode rank {r} reported before its pages landed")
                reported.add(r)
        time.sleep(0.002)
    assert reported == set(range(pair.d.tp)) and late and all(x.polls >= 5 for x in late)
    pair.wait_no_leaks()


# ---- refusals and failures ------------------------------------------------------------------------------


def state_spans(pair: Pair, r: int) -> list[tuple[int, int]]:
    """Byte ranges of decode rank r's state layers in its backing buffer."""
    names = U.layer_names(pair.d)
    base = pair.d.storage(r).data_ptr()
    out = []
    for i in (layer.index for layer in pair.d.spec.state_layers):
        t = pair.d.caches[r][names[i]]
        out.append((t.data_ptr() - base, t.data_ptr() - base + t.shape[0] * t.stride(0)))
    return out


NGRAM = {"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 1, "prompt_lookup_max": 3}


@pytest.mark.parametrize(("name", "ptp", "dtp"), [("qwen3-next-80b-a3b", 1, 2), ("nemotron-h-8b", 2, 1)])
def test_speculative_decoding_extra_conv_rows(pairs, name, ptp, dtp):
    """With speculative decoding on (n-gram, 2 draft tokens) vLLM's model class allocates K-1+2 conv rows
    (the MambaSpec here is its own). Both modes move every row byte-exact; the packed worker's page anatomy
    is the one with those rows (a spec without them puts the SSM 2 rows early and the oracle check fails)."""
    for mode in ("strided", "packed"):
        pair = pairs(name, ptp, dtp, mode, spec=NGRAM)
        mamba = next(s for s in pair.d.specs.values() if hasattr(s, "shapes"))
        k = pair.d.spec.state.conv_kernel
        assert min(mamba.shapes[0]) == k - 1 + 2 == pair.d.spec.state.conv_rows
        _, failed, _ = pair.run()
        assert not any(failed)
        assert_exact(pair)
        if mode == "packed":
            for c in pair.d.conns:
                assert c.connector_worker.hkv.geom.layout.conv_rows == k - 1 + 2
            pair.wait_no_leaks()
        pair.close()
