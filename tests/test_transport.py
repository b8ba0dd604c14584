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


def test_waves_reuse_each_lanes_blocks():
    """`in_flight` L < requests: the caches hold L requests' blocks (the longest of each lane's requests),
    request i takes lane i % L's blocks, and no two requests of one wave share a block."""
    from hybrid_kv.layout import cdiv
    from hybrid_kv.transport.launch import plan_requests

    lengths = (2049, 700, 33, 5000, 1, 1500, 64)
    j = job("falcon-h1-0.5b", 2, 1, requests=7, lengths=lengths, in_flight=3)
    plan, reqs, nbp, nbd = plan_requests(j)
    bs_p, bs_d = plan.prefill[0].block_size, plan.decode[0].block_size
    lanes = [max(lengths[i] for i in range(7) if i % 3 == lane) for lane in range(3)]  # 2049, 5000, 1500
    assert (nbp, nbd) == (sum(cdiv(t, bs_p) for t in lanes) + 2, sum(cdiv(t, bs_d) for t in lanes) + 2)
    assert [r["wave"] for r in reqs] == [0, 0, 0, 1, 1, 1, 2]
    for side, bs in (("prefill_blocks", bs_p), ("decode_blocks", bs_d)):
        for r, t in zip(reqs, lengths):
            assert len(r[side][1]) == cdiv(t, bs)
        for w in range(3):
            wave = [r[side] for r in reqs if r["wave"] == w]
            kv = [b for state, blocks in wave for b in blocks]
            assert len(set(kv)) == len(kv) and len({state for state, _ in wave}) == len(wave)
        for i in range(3, 7):  # the lane's earlier request's blocks, as many as this one needs
            a, b = reqs[i - 3][side], reqs[i][side]
            n = min(len(a[1]), len(b[1]))
            assert a[0] == b[0] and a[1][:n] == b[1][:n]
    big = job("falcon-h1-0.5b", 2, 1, requests=3000, in_flight=4)
    from hybrid_kv.transport.launch import memory_estimate

    assert memory_estimate(big) == memory_estimate(job("falcon-h1-0.5b", 2, 1, requests=4))
    with pytest.raises(ValueError, match=r"in_flight=0 \(accepted: an integer >= 1"):
        plan_requests(job("falcon-h1-0.5b", 2, 1, in_flight=0))


@pytest.mark.parametrize("model,p,d", [("qwen3.5-0.8b", 1, 2), ("nemotron-h-8b", 2, 1)])
def test_waves_byte_exact_every_mode(tmp_path, model, p, d):
    """Five requests through caches for two, in three waves: lane 0 runs 2049 then 33 then 1 tokens
    (later requests leave earlier ones' blocks unused), lane 1 700 then 5000. Each wave's pages are
    rewritten on the prefill and verified on the decode (its cache reset first), so a wave that read the
    previous wave's bytes, or a decode page left from it, fails the oracle check."""
    cfg = small_config(tmp_path, model)
    lengths = (2049, 700, 33, 5000, 1)
    with Cluster(job(cfg, p, d, requests=5, lengths=lengths, in_flight=2, concurrency=2)) as cl:
        assert cl.dcfg.num_blocks < sum(len(r["decode_blocks"][1]) for r in cl.requests)
        with pytest.raises(ValueError, match="3 waves"):
            cl.start_run("packed")
        for mode in ("packed", "strided", "auto"):
            seen = []
            r = cl.run(mode, progress=seen.append)
            assert r["failures"] == [] and r["mismatches"] == [], r["failures"][:2] + r["mismatches"][:2]
            assert r["verified"] and r["completed"] == 5 and r["waves"] == 3
            assert r["bytes"] == sum(cl.plan.for_tokens(t).bytes_moved() for t in lengths)
            assert seen == sorted(seen) and seen[-1] == 5 and 2 in seen  # counted across waves
    assert_no_leaks(cl.closed_counts)


def test_no_refill_while_a_decode_rank_runs(tmp_path):
    """A wave's prefill pages are rewritten only once every decode rank ended the wave before: decode rank 1
    is stopped (SIGSTOP) right after each "go" and continued 0.5 s later by a timer; the driver must not
    refill while it is stopped, however long that is. The transfers stay byte-exact. The driver also refuses
    a refill of its own accord while a started rank has not answered.

    Bug caught: the driver refilling after the first decode rank's result (or any rank's) instead of after
    every rank's: on a quiet machine the stopped rank's READs would usually have ended first, hiding it."""
    import os
    import signal
    import threading

    cfg = small_config(tmp_path, "qwen3.5-0.8b")
    with Cluster(job(cfg, 1, 2, requests=4, lengths=(700, 33), in_flight=2, concurrency=2)) as cl:
        stopped, refills, timers = threading.Event(), [], []
        real_start, real_fill = cl.start_run, cl.fill

        def start_run(*a, **kw):
            real_start(*a, **kw)
            os.kill(cl.dprocs[1].pid, signal.SIGSTOP)
            stopped.set()

            def resume():
                stopped.clear()
                os.kill(cl.dprocs[1].pid, signal.SIGCONT)

            timers.append(threading.Timer(0.5, resume))
            timers[-1].start()

        def fill(wave):
            refills.append((wave, stopped.is_set()))
            real_fill(wave)

        cl.start_run, cl.fill = start_run, fill
        try:
            r = cl.run("packed")
        finally:
            for t in timers:
                t.join(10)
            os.kill(cl.dprocs[1].pid, signal.SIGCONT)
        assert r["verified"] and r["completed"] == 4 and r["waves"] == 2, r["failures"][:2] + r["mismatches"][:2]
        assert refills == [(1, False)], f"(wave, decode rank 1 still stopped) at each refill: {refills}"
        cl.start_run = real_start
        real_start("packed", cl.waves[0])
        with pytest.raises(RuntimeError, match=r"refill for wave 0 while decode ranks \[0, 1\] still run"):
            real_fill(0)
        cl.collect()
        cl.fill(0)  # every rank answered: allowed
    assert_no_leaks(cl.closed_counts)


def test_transfer_cli_in_flight(tmp_path, capsys):
    """`transfer --in-flight 2` on 3 requests: two waves, both reported, verified."""
    import json

    from hybrid_kv.cli import main

    cfg = small_config(tmp_path, "falcon-h1-0.5b")
    argv = ["transfer", "--model", cfg, "--prefill-tp", "1", "--decode-tp", "2", "--tokens", "300"]
    argv += ["--requests", "3", "--in-flight", "2", "--mode", "packed", "--verify", "--json"]
    assert main(argv) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["in_flight"] == 2 and rep["verified"] and rep["packed"]["waves"] == 2
    assert rep["packed"]["completed"] == 3 and rep["leaks"] == {}
    # each rank's own peak resident set comes back beside the estimate the run was admitted with
    assert set(rep["peak_rss"]) == {"prefill-0", "decode-0", "decode-1"}
    assert all(v > 50 << 20 for v in rep["peak_rss"].values()), rep["peak_rss"]
    assert rep["memory_estimate"]["processes"] == 3
    assert main([a for a in argv if a != "--json"]) == 0  # the table a person reads
    out = " ".join(capsys.readouterr().out.split())  # rich wraps at the terminal width
    assert "3 requests x 300 tokens, concurrency 4, caches for 2 requests in flight" in out, out
    assert "every decode byte matches the oracle" in out and "memory: peak resident" in out, out


def test_memory_line_reads_each_sides_largest_rank():
    from hybrid_kv.report_transfer import memory_line

    rep = {
        "peak_rss": {"prefill-0": 3 << 29, "prefill-1": 1 << 30, "decode-0": 1 << 29},
        "memory_estimate": {"prefill_rank": 2 << 30, "decode_rank": 1 << 30},
    }
    assert memory_line(rep) == (
        "memory: peak resident 1.50 GiB a prefill rank (estimated 2.00), 0.50 GiB a decode rank (estimated 1.00)"
    )
    assert memory_line({"peak_rss": {}, "memory_estimate": None}) is None
