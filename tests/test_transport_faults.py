"""Faults: killed ranks, mismatched configurations, a full staging pool, malformed side-channel traffic.
Each waits with a bound; afterwards nothing is leaked and no failed request is reported as received."""

import socket
import struct
import time

import pytest
from transport_util import assert_no_leaks, small_config

from hybrid_kv.staging.pool import StagingPool
from hybrid_kv.staging.wire import MAGIC, PeerClosed, ProtocolError, recv_msg, send_msg
from hybrid_kv.transport import resolve_mode
from hybrid_kv.transport.common import SideConfig, hello_fields
from hybrid_kv.transport.decode import DecodeOptions
from hybrid_kv.transport.launch import Cluster, TransferJob
from hybrid_kv.transport.prefill import PrefillEndpoint, PrefillOptions

pytestmark = pytest.mark.timeout(300)


def job(model, p, d, dec=None, **kw):
    side = dict(model=model, num_blocks=1)
    opts = dict(requests=6, tokens=1500, concurrency=2, seed=3)
    opts.update(kw)
    return TransferJob(SideConfig(tp_size=p, **side), dec or SideConfig(tp_size=d, **side), **opts)


@pytest.mark.parametrize("mode", ["packed", "strided"])
def test_killed_prefill_rank(tmp_path, mode):
    """P TP 2 -> D TP 2: decode rank 1 reads only prefill rank 1. Killing prefill rank 1 mid-run fails
    decode rank 1's unfinished requests (ids in the error) in bounded time; decode rank 0 completes."""
    cfg = small_config(tmp_path, "nemotron-h-8b")
    j = job(cfg, 2, 2, requests=40, concurrency=1, decode_opts=DecodeOptions(request_timeout_s=5))
    with Cluster(j) as cl:
        assert cl.plan.sources_of(0) == [0] and cl.plan.sources_of(1) == [1]
        cl.start_run(mode)
        cl.kill("prefill", 1)  # right after the start: 40 requests cannot all have landed
        t = time.monotonic()
        r = cl.collect()
        assert time.monotonic() - t < 60
        rows = {d: cl.results[d]["rows"] for d in (0, 1)}
        assert len(rows[0]) == 40 and all(x["ok"] for x in rows[0]), [x["error"] for x in rows[0] if not x["ok"]]
        lost = {x["id"] for x in rows[1] if not x["ok"]}
        assert lost, "killing a source must fail the requests still reading from it"
        for x in rows[1]:
            assert x["ok"] or (x["id"] in x["error"] and "prefill rank 1" in x["error"]), x["error"]
        assert {f["id"] for f in r["failures"]} == lost  # a request fails where any of its shares failed
        assert r["mismatches"] == []  # every request reported received, on either rank, is byte-exact
        counts = cl.counts()
    assert counts["prefill-0"]["staging_slots"] == 0
    assert_no_leaks({k: v for k, v in cl.closed_counts.items() if k != "prefill-1"})


def test_killed_decode_rank(tmp_path):
    """Killing a decode rank mid-run: its source frees that rank's slots and forgets its agent; the
    other decode rank completes, verified."""
    cfg = small_config(tmp_path, "nemotron-h-8b")
    j = job(cfg, 2, 2, requests=12, concurrency=2)
    with Cluster(j) as cl:
        cl.start_run("packed")
        time.sleep(0.3)
        cl.kill("decode", 1)
        r = cl.collect(skip={1})
        assert r["verified"] and r["completed"] == 12  # decode rank 0's share of every request
        deadline = time.monotonic() + 20
        while True:
            c = cl.counts()["prefill-1"]
            if c["peers"] == 0 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert (c["peers"], c["staging_slots"], c["remote_agents"], c["waiting"]) == (0, 0, 0, 0)
        assert c["disconnects"] == 1 and c["last_disconnect"].startswith("decode rank 1 (")
    assert_no_leaks({k: v for k, v in cl.closed_counts.items() if k != "decode-1"})


def test_killing_a_decode_rank_never_costs_the_other_its_requests(tmp_path):
    """P TP 1 -> D TP 2 at concurrency 64, 10 runs: each run kills decode rank 1 at another moment (its
    process is started again for the next run). The shared prefill rank survives every kill, and every
    one of decode rank 0's 128 requests completes, byte-exact, in every run. (Before its sends were
    guarded, a kill crashed the prefill in 3 of 4 runs and decode rank 0 lost 16-30 of 64 requests.)"""
    cfg = small_config(tmp_path, "falcon-h1-0.5b")
    j = job(cfg, 1, 2, requests=128, tokens=300, concurrency=64, decode_opts=DecodeOptions(request_timeout_s=30))
    with Cluster(j) as cl:
        assert cl.plan.sources_of(0) == [0] and cl.plan.sources_of(1) == [0]
        for run in range(10):
            cl.start_run("packed")
            time.sleep(0.02 * run)  # from right after the start to well into the run
            cl.kill("decode", 1)
            r = cl.collect(skip={1})
            assert cl.pprocs[0].is_alive(), f"run {run}: the prefill rank died"
            assert r["failures"] == [] and r["mismatches"] == [], (run, r["failures"][:2], r["mismatches"][:2])
            assert r["completed"] == 128 and r["verified"], run
            cl.restart_decode(1)
        c = cl.counts()["prefill-0"]
        assert c["disconnects"] == 10 and c["peers"] == 2, c
    assert_no_leaks({k: v for k, v in cl.closed_counts.items()})


@pytest.mark.parametrize(
    "override,msg",
    [
        (dict(ssm_dtype="bfloat16"), r"state.ssm_dtype: prefill 'float32' vs decode 'bfloat16'"),
        (
            dict(model="other"),
            r"architecture: prefill 'Qwen3_5ForConditionalGeneration' vs decode 'NemotronHForCausalLM'",
        ),
    ],
)
def test_mismatched_configurations_refused(tmp_path, override, msg):
    cfg = small_config(tmp_path, "qwen3.5-0.8b")
    if override.get("model") == "other":
        override = {"model": small_config(tmp_path, "nemotron-h-8b")}
    dec = SideConfig(**{"model": cfg, "tp_size": 2, "num_blocks": 1, **override})
    cl = Cluster(job(cfg, 1, 2, dec=dec))
    with pytest.raises(RuntimeError, match=msg):
        cl.__enter__()
    assert all(not p.is_alive() for p in cl.pprocs + cl.dprocs)


def test_full_staging_pool_waits_then_errors(tmp_path):
    """The prefill pool holds one 4 MiB unit while 8 are asked for in one burst: a unit that finds no
    slot waits up to `pool_wait_s` (here 0: refused at once, which makes the test deterministic), then
    fails with a clear error (each request here has two units, so each fails). Nothing is overwritten,
    nothing leaks."""
    cfg = small_config(tmp_path, "qwen3.5-0.8b")
    j = job(
        cfg,
        1,
        1,
        requests=4,
        concurrency=4,
        prefill_opts=PrefillOptions(pool_bytes=6 << 20, max_unit_bytes=4 << 20, pool_wait_s=0.0),
        decode_opts=DecodeOptions(pool_bytes=5 << 20, request_timeout_s=20),
    )
    with Cluster(j) as cl:
        r = cl.run("packed")
        errors = [e for f in r["failures"] for e in f["errors"]]
        assert any("staging pool full for 0 s" in e and "6291456 B" in e for e in errors), errors[:3]
        assert all("staging pool full" in e for e in errors)
        assert r["mismatches"] == []
        c = cl.counts()
    assert c["prefill-0"]["pool_timeouts"] >= 1 and c["prefill-0"]["packed_units"] >= 1
    assert_no_leaks(cl.closed_counts)


def test_pool_never_overlaps():
    pool = StagingPool(1000)
    a, b = pool.alloc(("a",), 300), pool.alloc(("b",), 300)
    assert (a.offset, b.offset) == (0, 304)
    assert pool.alloc(("c",), 500) is None  # full: no overwrite, the caller waits
    pool.free(("a",))
    c = pool.alloc(("c",), 200)
    assert c.offset == 0 and c.offset + c.nbytes <= b.offset
    with pytest.raises(ValueError, match=r"already held"):
        pool.alloc(("b",), 10)
    with pytest.raises(ValueError, match=r"can never fit"):
        pool.alloc(("d",), 2000)
    assert pool.rekey(("c",), ("q",)).offset == 0  # same bytes, new key: ("c",) may be taken again
    assert pool.alloc(("c",), 16).offset == 208 and pool.held(("q",)).nbytes == 208  # first fit: after q
    with pytest.raises(ValueError, match=r"already held"):
        pool.rekey(("c",), ("q",))
    for k in ("b", "c", "q"):
        pool.free((k,))
    assert pool.alloc(("e",), 992).offset == 0


# ---- side channel ---------------------------------------------------------------------------------------


def test_wire_rejects_malformed():
    a, b = socket.socketpair()
    send_msg(a, {"type": "hello", "x": 1}, b"meta")
    assert recv_msg(b, 5) == ({"type": "hello", "x": 1}, b"meta")
    a.sendall(struct.pack("!4sIQ", MAGIC, 50, 0) + b'{"type": "hel')  # truncated header
    a.close()
    with pytest.raises(PeerClosed, match=r"truncated message: header ended after 13 of 50 bytes"):
        recv_msg(b, 5)
    for raw, msg in [
        (b"XXXX" + bytes(12), r"bad magic"),
        (struct.pack("!4sIQ", MAGIC, 1 << 30, 0), r"declared lengths too large"),
        (struct.pack("!4sIQ", MAGIC, 3, 0) + b"{{{", r"not valid JSON"),
        (struct.pack("!4sIQ", MAGIC, 2, 0) + b"[]", r"JSON object with a string 'type'"),
    ]:
        a, b = socket.socketpair()
        a.sendall(raw)
        with pytest.raises(ProtocolError, match=msg):
            recv_msg(b, 5)
    a, b = socket.socketpair()
    with pytest.raises(TimeoutError):
        recv_msg(b, 0.2)


def test_prefill_survives_bad_handshakes(tmp_path):
    """Truncated, malformed and mismatched hellos are refused; the endpoint keeps serving and holds
    nothing for them."""
    cfg = SideConfig(small_config(tmp_path, "falcon-h1-0.5b"), 1, 4)
    ep = PrefillEndpoint(cfg, 0, PrefillOptions())
    try:

        def pump(sock=None, until=2.0):
            end = time.monotonic() + until
            while time.monotonic() < end:
                ep.step(0.01)
                if sock is not None:
                    sock.settimeout(0.01)
                    try:
                        data = sock.recv(1 << 16, socket.MSG_PEEK)
                        if data is not None:
                            return
                    except (TimeoutError, BlockingIOError):
                        pass
                    except OSError:
                        return

        s = socket.create_connection(("127.0.0.1", ep.port))
        s.sendall(struct.pack("!4sIQ", MAGIC, 100, 0) + b'{"type"')
        s.close()
        pump(until=0.5)
        s = socket.create_connection(("127.0.0.1", ep.port))
        send_msg(s, {"type": "pack", "req": "x", "unit": 0})  # before hello
        pump(s)
        assert "before a successful hello" in recv_msg(s, 5)[0]["message"]
        s = socket.create_connection(("127.0.0.1", ep.port))
        send_msg(s, {"type": "hello", "fingerprint": {}}, b"")
        pump(s)
        assert "hello lacks field 'tp_size'" in recv_msg(s, 5)[0]["message"]
        # a well-formed hello from a decode rank whose conv layout differs
        sd = SideConfig(cfg.model, 2, 4, conv_layout="SD")
        s = socket.create_connection(("127.0.0.1", ep.port))
        send_msg(s, {"type": "hello", **hello_fields(sd.layouts()[0], sd), "agent": "d"}, b"meta")
        pump(s)
        assert "conv_layout: prefill 'DS' vs decode 'SD'" in recv_msg(s, 5)[0]["message"]
        # and one whose claimed page size is not what its TP gives
        dec = SideConfig(cfg.model, 2, 4)
        s = socket.create_connection(("127.0.0.1", ep.port))
        send_msg(s, {"type": "hello", **hello_fields(dec.layouts()[0], dec), "page_bytes": 123, "agent": "d"}, b"m")
        pump(s)
        assert "decode page_bytes=123 but the model at TP 2 gives" in recv_msg(s, 5)[0]["message"]
        pump(until=0.3)
        c = ep.counts()
        assert (c["peers"], c["remote_agents"], c["staging_slots"]) == (0, 0, 0)
    finally:
        ep.close()
    assert ep.agent.counts() == {"registrations": 0, "remote_agents": 0, "xfer_handles": 0}


def test_mode_flag(monkeypatch):
    monkeypatch.delenv("HYBRID_KV_TRANSFER", raising=False)
    assert resolve_mode() == "packed"
    monkeypatch.setenv("HYBRID_KV_TRANSFER", "strided")
    assert resolve_mode() == "strided"
    assert resolve_mode("packed") == "packed"
    monkeypatch.setenv("HYBRID_KV_TRANSFER", "fast")
    with pytest.raises(
        ValueError, match=r"transfer mode 'fast' \(from HYBRID_KV_TRANSFER\) is not one of packed, strided, auto"
    ):
        resolve_mode()


def test_decode_pool_smaller_than_unit_refused(tmp_path):
    cfg = small_config(tmp_path, "falcon-h1-0.5b")
    cl = Cluster(
        job(
            cfg,
            1,
            1,
            prefill_opts=PrefillOptions(max_unit_bytes=8 << 20),
            decode_opts=DecodeOptions(pool_bytes=4 << 20),
        )
    )
    with pytest.raises(
        RuntimeError,
        match=r"decode staging pool \(4194304 B\) is smaller than the prefill "
        r"transfer unit budget \(8388608 B\)",
    ):
        cl.__enter__()
