"""hybrid-kv's own side channel inside vLLM's connector: what a stranger, a malformed message or a slow
peer can and cannot do (nothing served before a matching hello, the connection cap and message deadline,
the shared secret, staging freed on disconnect and on lease expiry), and the decode side's lease fence."""

from __future__ import annotations

import socket
import time

import pytest
import torch

pytest.importorskip("vllm", reason="needs the vllm extra (CI installs it)")
pytest.importorskip("nixl", reason="needs the nixl extra (CI installs it)")

import vllm_steps as S
import vllm_util as U
from vllm_pair import _hello, _server, assert_exact, assert_untouched

from hybrid_kv.staging.wire import recv_msg, send_msg
from hybrid_kv.vllm.pull import HybridKVWorker

pytestmark = pytest.mark.usefixtures("ds_layout")


def test_side_channel_rejects_malformed_and_unknown(pairs):
    """Nothing is served before a hello that matches; out-of-protocol messages close the connection,
    refused requests are named and the connection stays."""
    pair = pairs("jamba-v0.1", 1, 1, "packed")
    _, srv = _server(pair)
    host, port = srv.address
    with socket.create_connection((host, port), timeout=5) as s:
        s.sendall(b"GET / HTTP/1.1\r\n\r\n")
        head, _ = recv_msg(s, 5)
        assert head["type"] == "error" and "bad magic" in head["message"]
    with socket.create_connection((host, port), timeout=5) as s:  # a request before any hello
        send_msg(s, {"type": "pack", "req": "nope", "blocks": [[0, [1]]]})
        head, _ = recv_msg(s, 5)
        assert head["type"] == "error" and "'pack' before a successful hello" in head["message"]
        assert s.recv(1) == b""  # and the connection is closed
    with socket.create_connection((host, port), timeout=5) as s:
        send_msg(s, {"type": "hello", "fingerprint": {"architecture": "X"}, "tp_size": 1, "tp_rank": 0})
        head, _ = recv_msg(s, 5)
        assert head["type"] == "error" and "configurations differ (architecture" in head["message"]
        # Bug caught: the handshake ignoring the connector's own field (vLLM's state layer names and groups)
        fp = _hello(pair)["fingerprint"]
        other = [[g, name.replace("layers.", "layers.9")] for g, name in fp["state_layers"]]
        send_msg(s, {**_hello(pair), "fingerprint": {**fp, "state_layers": other}})
        head, _ = recv_msg(s, 5)
        assert head["type"] == "error" and "configurations differ (state_layers: prefill" in head["message"], head
        send_msg(s, {"type": "hello", **{k: v for k, v in _hello(pair).items() if k != "type"}, "tp_size": 3})
        head, _ = recv_msg(s, 5)
        assert head["type"] == "error" and "decode tp_size=3" in head["message"]
        send_msg(s, _hello(pair))
        head, _ = recv_msg(s, 5)
        assert head["type"] == "welcome"
        bad = [
            ({"req": "nope", "blocks": [[0, [1]]]}, "request nope is not held"),
            ({"req": "", "blocks": []}, "request id ''"),
            ({"req": 7, "blocks": []}, "request id 7"),
            ({"req": "x" * 600, "blocks": []}, "a string of 1 to 512 characters"),
        ]
        for fields, why in bad:
            send_msg(s, {"type": "pack", **fields})
            head, _ = recv_msg(s, 5)
            assert head["type"] == "error" and why in head["message"], (fields, head)
        send_msg(s, {"type": "mode", "part": ["small", 10]})
        head, _ = recv_msg(s, 5)
        assert head["type"] == "error" and "packs all or nothing" in head["message"]
        send_msg(s, {"type": "mode", "part": "all"})
        head, _ = recv_msg(s, 5)
        assert head["type"] == "error" and "accepted: null" in head["message"]
        send_msg(s, {"type": "hello", "fingerprint": {}})
        head, _ = recv_msg(s, 5)
        assert head["type"] == "error" and "second hello" in head["message"]


def test_staged_slots_freed_on_disconnect_and_lease(pairs):
    """A decode rank that packs and vanishes (connection closed) or never releases (lease) frees its slots."""
    pair = pairs("jamba-v0.1", 1, 1, "packed", p_extra={"hybrid_kv_staging_lease_s": 1, "hybrid_kv_timeout_s": 0.5})
    _, srv = _server(pair)
    q = pair.reqs[0]
    for c in pair.p.conns:
        S.step(c, S.send_meta(pair.reqs))
    g = [i for i, (_, _, kind) in enumerate(pair.p.groups()) if kind == "mamba"]
    msg = {"type": "pack", "req": S.p_id(q.req_id), "blocks": [[i, q.p_blocks[i]] for i in g]}

    def pack(s) -> None:
        send_msg(s, _hello(pair))
        assert recv_msg(s, 10)[0]["type"] == "welcome"
        send_msg(s, msg)
        ready, _ = recv_msg(s, 10)
        assert ready["type"] == "ready" and ready["req"] == msg["req"] and len(ready["units"]) == 1
        assert recv_msg(s, 10)[0]["type"] == "ok" and srv.sender.live_slots == 1

    with socket.create_connection(srv.address, timeout=5) as s:
        pack(s)
    deadline = time.monotonic() + 5
    while srv.sender.live_slots and time.monotonic() < deadline:
        time.sleep(0.01)
    assert srv.sender.live_slots == 0  # disconnect
    s = socket.create_connection(srv.address, timeout=5)
    try:
        pack(s)
        deadline = time.monotonic() + 10
        while srv.sender.live_slots and time.monotonic() < deadline:
            time.sleep(0.05)
        assert srv.sender.live_slots == 0  # lease expiry with the connection still open
        send_msg(s, {"type": "release", "req": msg["req"]})  # late: nothing left to free, no reply
        send_msg(s, msg)  # and the connection still serves
        assert recv_msg(s, 10)[0]["type"] == "ready"
        assert recv_msg(s, 10)[0]["type"] == "ok" and srv.sender.live_slots == 1
        send_msg(s, {"type": "release", "req": msg["req"]})
        deadline = time.monotonic() + 5
        while srv.sender.live_slots and time.monotonic() < deadline:
            time.sleep(0.01)
        assert srv.sender.live_slots == 0  # released
    finally:
        s.close()


# ---- the shared secret ----------------------------------------------------------------------------------

SECRET = {"hybrid_kv_secret": "s3cret-" * 4}


def test_shared_secret_transfers_and_refuses_strangers(pairs):
    """Both engines with `hybrid_kv_secret`: byte-exact, nothing leaks. A peer with the public fingerprint
    but not the secret gets a challenge and an error, never the welcome (no staging address)."""
    pair = pairs("jamba-v0.1", 1, 1, "packed", p_extra=SECRET, d_extra=SECRET)
    _, failed, _ = pair.run()
    assert not any(failed)
    assert_exact(pair)
    pair.wait_no_leaks()
    _, srv = _server(pair)
    for hello in (_hello(pair), {**_hello(pair), "nonce": "ab" * 16, "auth": True}):
        got = []
        with socket.create_connection(srv.address, timeout=5) as s:
            send_msg(s, hello)
            head, _ = recv_msg(s, 5)
            got.append(head)
            if head["type"] == "challenge":
                send_msg(s, {"type": "auth", "proof": "0" * 64})
                got.append(recv_msg(s, 5)[0])
            assert s.recv(1) == b""  # closed
        assert got[-1]["type"] == "error" and "secret" in got[-1]["message"].lower(), got
        assert "staging" not in repr(got) and all(h["type"] in ("challenge", "error") for h in got), got


@pytest.mark.parametrize("side", ["prefill", "decode"])
def test_secret_on_one_side_only_fails_the_requests(pairs, caplog, side):
    kw = {"p_extra": SECRET} if side == "prefill" else {"d_extra": SECRET}
    pair = pairs("jamba-v0.1", 1, 1, "packed", **kw)
    failed = pair.run_failing()
    assert all(f == {q.req_id for q in pair.reqs} for f in failed)
    want = "requires the shared secret" if side == "prefill" else "has no shared secret"
    assert want in caplog.text
    assert_untouched(pair)
    pair.wait_no_leaks()


def test_bad_secret_and_open_bind_refused_at_startup(tmp_path, monkeypatch):
    monkeypatch.setenv("HYBRID_KV_TRANSFER", "packed")
    vc = U.vllm_config(U.model_dir(tmp_path, "jamba-v0.1"), 1, "e", extra={"hybrid_kv_secret": "short"})
    with U.tp_rank(0, 1), pytest.raises(ValueError, match="has 5 characters; use at least 16"):
        HybridKVWorker(vc, "e", None)
    from types import SimpleNamespace

    from hybrid_kv.mover.server import PrefillServer

    sender = SimpleNamespace(geom=SimpleNamespace(layout=SimpleNamespace(tp_rank=0)))  # refused before it is used
    kw = dict(port=0, sender=sender, staging_desc=(0, 0, 0), agent_name="a", not_held=lambda r: None)
    with pytest.raises(ValueError, match=r"would listen on '0.0.0.0'.*HYBRID_KV_SECRET"):
        PrefillServer(host="0.0.0.0", secret=None, **kw)


# ---- the lease fence ------------------------------------------------------------------------------------


def test_push_near_its_lease_end_is_not_used(pairs):
    """A push whose lease leaves less than the decode rank's whole wait (here: the prefill lease is only
    twice the decode timeout) is not used: the decode rank asks, the source renews the lease, bytes exact."""
    p_extra = {"hybrid_kv_staging_lease_s": 120, "hybrid_kv_timeout_s": 60}
    pair = pairs("nemotron-h-8b", 1, 1, "packed", n=2, p_extra=p_extra)
    warm, rest = pair.reqs[:1], pair.reqs[1:]
    ids = {q.req_id for q in warm}
    S.submit(pair.p, pair.d, warm)
    S.run_until(pair.p.conns, pair.d.conns, ids, {S.p_id(i) for i in ids})
    srv = pair.p.conns[0].connector_worker.hkv.server
    for c in pair.p.conns:
        S.step(c, S.send_meta(rest))
    srv._prepacker.submit(lambda: None).result(timeout=30)
    assert len(srv.sender._staged) == 1  # pushed, but with 120 s of lease, under the decode's 2 x 60 s
    for c in pair.d.conns:
        S.step(c, S.recv_meta(rest, pair.p))
    ids = {q.req_id for q in rest}
    _, failed, _ = S.run_until(pair.p.conns, pair.d.conns, ids, {S.p_id(i) for i in ids})
    assert not any(failed)
    assert pair.d.conns[0].connector_worker.hkv.round_trips[rest[0].req_id] == 1
    assert_exact(pair)
    pair.wait_no_leaks()


def test_read_that_ends_after_the_lease_is_not_used(pairs, monkeypatch, caplog):
    """The fence after the READ: bytes whose READ completed once the source's lease could have ended are
    discarded (a margin larger than any lease makes every READ late): the requests fail, no page is
    written, nothing leaks."""
    from hybrid_kv.staging import messages as M

    monkeypatch.setattr(M, "LEASE_MARGIN", 1e9)
    pair = pairs("jamba-v0.1", 1, 1, "packed")
    failed = pair.run_failing()
    assert all(f == {q.req_id for q in pair.reqs} for f in failed)
    assert "completed after the source's staging lease could have ended" in caplog.text
    want = pair.expected()  # attention came by vLLM's own READ (the failed request's blocks are recomputed)
    for r, c in enumerate(pair.d.conns):
        geom = c.connector_worker.hkv.geom
        got, bg, exp = pair.d.storage(r), pair.background[r], want[r].clone()
        for q in pair.reqs:  # the requests' state pages: no byte was scattered
            for s in geom.layers:
                for b in q.d_blocks[s.group]:
                    a = s.offset + b * s.stride
                    exp[a : a + geom.layout.state_bytes] = bg[a : a + geom.layout.state_bytes]
        same = torch.equal(got, exp)
        assert same, f"decode rank {r}: state pages written, or attention differs from the oracle"
    pair.wait_no_leaks()


def test_connection_cap_and_message_deadline(pairs, monkeypatch):
    """Connections past the cap are told why and closed, and one is served again once another closes; a
    connection that sends part of a message and stalls is closed when its deadline passes, while a
    decode rank's ping on another connection is answered at once (one thread per connection)."""
    import hybrid_kv.mover.server as chan

    pair = pairs("jamba-v0.1", 1, 1, "packed")
    _, srv = _server(pair)
    host, port = srv.address
    live = len([t for t in srv._threads if t.is_alive()])  # the decode engine's own connection(s)
    monkeypatch.setattr(chan, "MAX_CONNECTIONS", live + 2)
    monkeypatch.setattr(chan, "MSG_TIMEOUT_S", 5.0)  # the pong below must come well inside it, loaded or not
    held = [socket.create_connection((host, port), timeout=5) for _ in range(2)]
    try:
        for s in held:  # served: each answers a hello
            send_msg(s, _hello(pair))
            assert recv_msg(s, 5)[0]["type"] == "welcome"
        with socket.create_connection((host, port), timeout=5) as extra:
            head, _ = recv_msg(extra, 5)
            assert head["type"] == "error" and f"over {live + 2} connections" in head["message"]
            assert extra.recv(1) == b""
        held.pop().close()
        deadline = time.monotonic() + 10
        while len([t for t in srv._threads if t.is_alive()]) > live + 1:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        stuck = socket.create_connection((host, port), timeout=5)  # in again, under the cap
        held.append(stuck)
        stuck.sendall(b"HKV")  # 3 bytes of a header, then silence
        with socket.create_connection((host, port), timeout=5) as other:
            pass  # over the cap again: refused, which the next line must not depend on
        send_msg(held[0], {"type": "ping"})  # a served connection is answered while `stuck` stalls:
        assert recv_msg(held[0], 5)[0]["type"] == "pong"
        stuck.setblocking(False)  # ... that is, before the stalled message's deadline closed `stuck`
        with pytest.raises(BlockingIOError):
            stuck.recv(1 << 16)
        stuck.settimeout(30)
        assert stuck.recv(1 << 16) == b""  # closed once its message was overdue
        assert other is not None
    finally:
        for s in held:
            s.close()


def test_link_refuses_a_welcome_it_cannot_use():
    """A hostile or broken prefill side channel (a raw socket server here) whose welcome names a staging
    region that is not [addr, nbytes, dev] integers, lacks a fingerprint or a usable lease (the fence's
    margin is a quarter of it), or whose state layers differ from
    this rank's (bug caught: the link's comparison dropping the connector's `state_layers` field): the decode
    rank's link refuses it at the handshake, naming the value, before anything is READ."""
    import threading

    from hybrid_kv.layout import RankLayout
    from hybrid_kv.mover.link import PrefillLink
    from hybrid_kv.spec_hf import load_spec

    fp = {**RankLayout(load_spec("jamba-v0.1"), 1, 0).fingerprint(), "state_layers": [[1, "model.layers.1.mamba"]]}
    moved = {**fp, "state_layers": [[1, "model.layers.2.mamba"]]}  # another layer holds the state
    for welcome, msg in [
        ({"fingerprint": moved, "staging": [4096, 10, 0]}, r"differ \(state_layers: prefill \[\[1, 'model.layers.2"),
        ({"fingerprint": fp, "staging": [4096, "1 GiB", 0]}, r"staging=\[4096, '1 GiB', 0\] \(accepted"),
        ({"fingerprint": fp, "staging": [-1, 10, 0]}, r"staging=\[-1, 10, 0\]"),
        ({"fingerprint": fp, "staging": {"addr": 1}}, r"staging=\{'addr': 1\}"),
        ({"staging": [4096, 10, 0]}, r"welcome lacks a fingerprint object"),
        ({"fingerprint": fp, "staging": [4096, 10, 0]}, r"welcome: lease_s=None \(accepted: seconds in \(0, 86400\]"),
        ({"fingerprint": fp, "staging": [4096, 10, 0], "lease_s": 0}, r"welcome: lease_s=0 \(accepted"),
    ]:
        srv = socket.create_server(("127.0.0.1", 0))

        def serve(srv=srv, welcome=welcome):
            conn, _ = srv.accept()
            with conn:
                recv_msg(conn, 5)
                send_msg(conn, {"type": "welcome", "tp_size": 1, "tp_rank": 0, "agent": "x", **welcome})
                try:
                    while True:  # answer pings until the link closes
                        recv_msg(conn, 5)
                        send_msg(conn, {"type": "pong", "now": time.monotonic()})
                except Exception:
                    pass

        t = threading.Thread(target=serve, daemon=True)
        t.start()
        link = PrefillLink("127.0.0.1", srv.getsockname()[1], 5.0)
        try:
            with pytest.raises(ValueError, match=msg):
                link.hello(fp, 1, 0)
        finally:
            link.close()
            srv.close()
            t.join(10)
