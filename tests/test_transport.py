"""Real P -> D transfers: every rank its own process with its own NIXL agent (UCX on DRAM), verified
byte for byte against the oracle inside each decode rank, both modes, then no leaked handles."""

import pytest
from transport_util import assert_no_leaks, small_config

from hybrid_kv.transport.common import SideConfig
from hybrid_kv.transport.decode import DecodeOptions
from hybrid_kv.transport.launch import Cluster, TransferJob
from hybrid_kv.transport.prefill import PrefillOptions

pytestmark = pytest.mark.timeout(300)

CASES = [
    pytest.param("qwen3.5-0.8b", 1, 2, "DS", id="gdn-P1-D2"),
    pytest.param("qwen3.5-0.8b", 4, 2, "DS", id="gdn-P4-D2"),
    pytest.param("nemotron-h-8b", 2, 4, "DS", id="mamba2-P2-D4"),
    pytest.param("nemotron-h-8b", 2, 2, "SD", id="mamba2-P2-D2-SD"),
    pytest.param("falcon-h1-0.5b", 1, 2, "DS", id="mamba2-ng1-P1-D2"),
    pytest.param("falcon-h1-0.5b", 2, 1, "SD", id="mamba2-ng1-P2-D1-SD"),
    pytest.param("jamba-v0.1", 2, 1, "DS", id="mamba1-P2-D1"),
    pytest.param("kimi-linear-48b-a3b", 2, 4, "DS", id="kda-mla-P2-D4"),  # MLA latent whole on every rank
    pytest.param("kimi-linear-48b-a3b", 4, 1, "SD", id="kda-mla-P4-D1-SD"),
    pytest.param("granite-236", 2, 3, "DS", id="mamba2-ng1-P2-D3"),
    pytest.param("granite-236", 3, 2, "SD", id="mamba2-ng1-P3-D2-SD"),
]


def job(model, p, d, conv="DS", **kw) -> TransferJob:
    side = dict(model=model, num_blocks=1, conv_layout=conv)
    opts = dict(requests=4, tokens=1500, concurrency=2, seed=7)
    opts.update(kw)
    return TransferJob(SideConfig(tp_size=p, **side), SideConfig(tp_size=d, **side), **opts)


@pytest.mark.parametrize("model,p,d,conv", CASES)
def test_both_modes_byte_exact(tmp_path, model, p, d, conv):
    cfg = small_config(tmp_path, model)
    with Cluster(job(cfg, p, d, conv)) as cl:
        plan = cl.plan
        for mode in ("packed", "strided", "auto"):
            r = cl.run(mode)
            assert r["failures"] == [] and r["mismatches"] == [], r["failures"][:2] + r["mismatches"][:2]
            assert r["verified"] and r["completed"] == 4
            if mode == "auto":  # per pair, packed or direct: between the two pure modes
                assert 4 * plan.packed_descriptors() <= r["descriptors"] <= 4 * plan.strided_descriptors()
                continue
            want = plan.packed_descriptors() if mode == "packed" else plan.strided_descriptors()
            assert r["descriptors"] == 4 * want
            assert r["bytes"] == 4 * plan.bytes_moved()
        # No round trip per request: every message a source received is warm-up (hello, the cost
        # model's pings, one mode per decode rank per run); the units were announced unasked.
        for r in range(p):
            msgs = cl.counts()[f"prefill-{r}"]["messages"]
            assert set(msgs) <= {"hello", "ping", "mode"}, msgs
            assert msgs["mode"] == 3 * len([d_ for d_ in range(d) if r in plan.sources_of(d_)])
    assert_no_leaks(cl.closed_counts)
    assert len(cl.closed_counts) == p + d


def test_units_split_large_requests(tmp_path):
    """A pool smaller than a request: the request moves as several units, the pool is reused, and the
    bytes are still exact."""
    cfg = small_config(tmp_path, "qwen3.5-0.8b")
    j = job(
        cfg,
        1,
        2,
        requests=3,
        concurrency=3,
        prefill_opts=PrefillOptions(pool_bytes=3 << 20, max_unit_bytes=1 << 20),
        decode_opts=DecodeOptions(pool_bytes=2 << 20),
    )
    with Cluster(j) as cl:
        assert max(len(s.units) for s in cl.plan.staging.values()) == 1  # the driver's plan: default units
        r = cl.run("packed")
        assert r["verified"], r["failures"][:2]
        assert r["descriptors_per_request"] > 4  # several 1 MiB units per pair
        counts = cl.counts()
    assert max(c["staging_in_use"] for k, c in counts.items() if k.startswith("prefill")) == 0
    assert_no_leaks(cl.closed_counts)


@pytest.mark.parametrize("model,p,d", [("qwen3.5-0.8b", 1, 2), ("nemotron-h-8b", 2, 1)])
def test_mixed_lengths_in_one_run(tmp_path, model, p, d):
    """Requests of 1 to 5000 tokens in one run, block sizes differing between the sides: every rank plans
    each request for its own length (a rank that reused one request's plan for the next moves the wrong
    KV blocks, or too few, and the oracle check fails)."""
    cfg = small_config(tmp_path, model)
    lengths = (1, 5000, 700, 33, 2049)
    with Cluster(job(cfg, p, d, requests=5, lengths=lengths, concurrency=3)) as cl:
        assert len({r["tokens"] for r in cl.requests}) == 5
        kv = {len(r["decode_blocks"][1]) for r in cl.requests}
        assert len(kv) >= 3, kv  # the lengths span different KV block counts
        for mode in ("packed", "strided", "auto"):
            r = cl.run(mode)
            assert r["failures"] == [] and r["mismatches"] == [], r["failures"][:2] + r["mismatches"][:2]
            assert r["verified"] and r["completed"] == 5
    assert_no_leaks(cl.closed_counts)


def test_progress_per_request(tmp_path):
    """`run_job` tells its progress callback how many requests have ended while a mode runs (the CLI's
    bar moves per request, not only per phase), in order, ending at every request."""
    from hybrid_kv.transport.launch import run_job

    cfg = small_config(tmp_path, "falcon-h1-0.5b")
    calls = []
    out = run_job(job(cfg, 1, 2, requests=48, tokens=300), ["packed"], lambda i, n, text: calls.append((i, n, text)))
    assert out["modes"]["packed"]["verified"]
    steps = [i for i, _, _ in calls]
    assert steps == sorted(steps) and steps[0] == 0 and steps[-1] == calls[-1][1] == 3
    ended = [int(t.split(": ")[1].split("/")[0]) for _, _, t in calls if t.startswith("packed: ")]
    assert any(0 < k < 48 for k in ended), calls  # mid-run updates
    assert ended == sorted(ended) and ended[-1] == 48
    assert ("packed: 48/48 requests received") in [t for _, _, t in calls]
