"""Limits the code enforces, each tested on both sides: the last value accepted and the first refused.
(Limits whose tests sit beside their feature are listed in the closing notes of #34; these had a test on
one side only, or none.)"""

from __future__ import annotations

import socket
import threading

import pytest

from hybrid_kv.spec_fields import MAX_DIM, MAX_LAYERS, as_int, layer_list
from hybrid_kv.staging import messages as M
from hybrid_kv.staging import wire
from hybrid_kv.staging.auth import MIN_SECRET, SECRET_ENV, load_secret


def test_secret_length():
    assert load_secret(environ={SECRET_ENV: "s" * MIN_SECRET}) == b"s" * MIN_SECRET
    with pytest.raises(ValueError, match=f"has {MIN_SECRET - 1} characters; use at least {MIN_SECRET}"):
        load_secret(environ={SECRET_ENV: "s" * (MIN_SECRET - 1)})


def test_config_layer_count_and_dims():
    assert as_int(MAX_LAYERS, "num_hidden_layers", "m", hi=MAX_LAYERS) == MAX_LAYERS
    with pytest.raises(ValueError, match=rf"num_hidden_layers={MAX_LAYERS + 1} is outside .*\[1, {MAX_LAYERS}\]"):
        as_int(MAX_LAYERS + 1, "num_hidden_layers", "m", hi=MAX_LAYERS)
    assert as_int(MAX_DIM, "head_dim", "m") == MAX_DIM
    with pytest.raises(ValueError, match=rf"head_dim={MAX_DIM + 1} is outside"):
        as_int(MAX_DIM + 1, "head_dim", "m")
    assert len(layer_list({"p": ["M"] * MAX_LAYERS}, "p", "m")) == MAX_LAYERS
    with pytest.raises(ValueError, match=f"p has {MAX_LAYERS + 1} entries; at most {MAX_LAYERS}"):
        layer_list({"p": ["M"] * (MAX_LAYERS + 1)}, "p", "m")


def test_cli_token_and_tp_bounds():
    import argparse

    from hybrid_kv.cli import MAX_TOKENS, MAX_TP, TP, _int_arg

    tokens = _int_arg(1, MAX_TOKENS)
    assert tokens(str(MAX_TOKENS)) == MAX_TOKENS and TP(str(MAX_TP)) == MAX_TP
    with pytest.raises(argparse.ArgumentTypeError, match=rf"{MAX_TOKENS + 1} is not in \[1, {MAX_TOKENS}\]"):
        tokens(str(MAX_TOKENS + 1))
    with pytest.raises(argparse.ArgumentTypeError, match=rf"{MAX_TP + 1} is not in \[1, {MAX_TP}\]"):
        TP(str(MAX_TP + 1))


def test_plan_piece_limit(monkeypatch):
    """A plan just inside the piece limit is built; one piece estimate over it is refused, naming both."""
    from hybrid_kv import plan as P
    from hybrid_kv.spec_hf import load_spec

    spec = load_spec("nemotron-h-8b")
    monkeypatch.setattr(P, "MAX_PIECES", 10**9)
    P.TransferPlan.build(spec, 2, 4, 5000)
    est = None
    for limit in (10**6, 10**5, 10**4, 10**3):  # find the estimate: the smallest limit it still fits
        monkeypatch.setattr(P, "MAX_PIECES", limit)
        try:
            P.TransferPlan.build(spec, 2, 4, 5000)
        except ValueError as e:
            est = int(str(e).split("about ")[1].split(" pieces")[0].replace(",", ""))
            break
    assert est is not None
    monkeypatch.setattr(P, "MAX_PIECES", est)
    P.TransferPlan.build(spec, 2, 4, 5000)
    monkeypatch.setattr(P, "MAX_PIECES", est - 1)
    with pytest.raises(ValueError, match=rf"about {est:,} pieces, over the limit of {est - 1:,}"):
        P.TransferPlan.build(spec, 2, 4, 5000)


def test_wire_header_and_payload_limits(monkeypatch):
    monkeypatch.setattr(wire, "MAX_PAYLOAD", 1024)
    monkeypatch.setattr(wire, "MAX_HEADER", 64)
    a, b = socket.socketpair()
    with a, b:
        wire.send_msg(a, {"type": "x" * 53}, b"p" * 1024)  # a 64-byte header, a 1024-byte payload: the limits
        head, payload = wire.recv_msg(b, 5)
        assert head == {"type": "x" * 53} and payload == b"p" * 1024
        with pytest.raises(wire.ProtocolError, match=r"message too large \(header 64 B, payload 1025 B\)"):
            wire.send_msg(a, {"type": "x" * 53}, b"p" * 1025)
        with pytest.raises(wire.ProtocolError, match=r"message too large \(header 65 B, payload 0 B\)"):
            wire.send_msg(a, {"type": "x" * 54})
        a.sendall(wire._HEAD.pack(wire.MAGIC, 10, 1025))  # a peer declaring more than the limit
        with pytest.raises(wire.ProtocolError, match=r"declared lengths too large \(header 10 B, payload 1025 B\)"):
            wire.recv_msg(b, 5)


def test_request_id_length():
    assert M.request_id("x" * M.MAX_REQUEST_ID) == "x" * M.MAX_REQUEST_ID
    with pytest.raises(ValueError, match=f"a string of 1 to {M.MAX_REQUEST_ID} characters"):
        M.request_id("x" * (M.MAX_REQUEST_ID + 1))


def test_link_keeps_at_most_max_staged_pushes(monkeypatch):
    """A prefill rank that announces more requests than the decode rank has reached: the link keeps the
    newest MAX_STAGED (3 here) and forgets the oldest; with exactly MAX_STAGED, all are kept."""
    from hybrid_kv.mover.link import PrefillLink

    monkeypatch.setattr(PrefillLink, "MAX_STAGED", 3)
    srv = socket.create_server(("127.0.0.1", 0))
    go = threading.Event()

    def serve():
        conn, _ = srv.accept()
        with conn:
            go.wait(10)
            for i in range(4):
                wire.send_msg(conn, {"type": M.READY, "req": f"r{i}", "until": None})
            wire.send_msg(conn, {"type": "pong", "now": 0.0})  # a reply after them: they were all read
            conn.recv(1)

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    link = PrefillLink("127.0.0.1", srv.getsockname()[1], 5.0)
    try:
        go.set()
        assert link._replies.get(timeout=10)["type"] == "pong"
        assert link.staged == 3
        assert link.take_staged("r0") is None and all(link.take_staged(f"r{i}") for i in (1, 2, 3))
    finally:
        link.close()
        srv.close()
        t.join(10)


def test_announcements_kept_before_a_request_starts(monkeypatch):
    """A source's `ready` for a request this decode rank has not started is kept for it, at most
    MAX_EARLY_UNITS per (request, source) (3 here): the first ones kept, the rest dropped."""
    import types

    from hybrid_kv.transport import receive as R

    monkeypatch.setattr(R, "MAX_EARLY_UNITS", 3)
    rx = R.DecodeRuns(None)
    for i in range(4):
        rx._on_message(types.SimpleNamespace(rank=1), {"type": M.READY, "req": "r", "n": i}, {})
    rx._on_message(types.SimpleNamespace(rank=0), {"type": M.READY, "req": "r", "n": 9}, {})
    assert [m["n"] for m in rx._early[("r", 1)]] == [0, 1, 2] and len(rx._early[("r", 0)]) == 1


def test_interpreter_size_guard(monkeypatch):
    """`repack --backend triton` under the interpreter: a run of exactly the limit passes the guard (the
    harness is reached), one request more is refused before any work, naming the limit."""
    import argparse

    from hybrid_kv import repack
    from hybrid_kv.plan import TransferPlan
    from hybrid_kv.spec_hf import load_spec

    plan = TransferPlan.build(load_spec("falcon-h1-0.5b").truncated(1, 1), 1, 1, 20)
    limit = 2 * plan.bytes_moved()
    monkeypatch.setattr(repack, "INTERPRETER_MAX_BYTES", limit)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    args = argparse.Namespace(requests=2, repeats=1, device="cpu", backend="triton", seed=0, verify=False)

    class Reached(Exception):
        pass

    def harness(*a, **kw):
        raise Reached

    import hybrid_kv.harness as H

    monkeypatch.setattr(H, "Harness", harness)
    with pytest.raises(Reached):
        repack.run_repack(plan, args)
    args.requests = 3
    with pytest.raises(ValueError, match=rf"3 x .* would take tens of minutes .*\(limit {limit >> 20} MiB\)"):
        repack.run_repack(plan, args)


def test_copier_row_memo_is_bounded(monkeypatch):
    """The copier keeps the slot rows of at most MAX_SHAPES chunk shapes (2 here), then starts over."""
    from hybrid_kv.harness import Harness
    from hybrid_kv.plan import TransferPlan
    from hybrid_kv.spec_hf import load_spec
    from hybrid_kv.staging import copier as C

    monkeypatch.setattr(C, "MAX_SHAPES", 2)
    plan = TransferPlan.build(load_spec("falcon-h1-0.5b").truncated(1, 1), 1, 1, 10, decode_block_size=16)
    h = Harness(plan, [1, 20, 40, 60])  # 1, 2, 3 and 4 KV blocks: four chunk shapes
    h.run_staged(backend="torch")
    assert h.mismatches() == []
    copier = h.staged("torch")["pack"][0]
    assert 1 <= len(copier._rows) <= 2
    h.run_staged(backend="torch")  # rebuilt rows after the clear are the same rows
    assert h.mismatches() == []
