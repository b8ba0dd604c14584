"""Limits the code enforces, each tested on both sides: the last value accepted and the first refused.
(Limits whose tests sit beside their feature are listed in the closing notes of #34; these had a test on
one side only, or none.)"""

from __future__ import annotations

import socket
import threading
import time

import pytest

from hybrid_kv.spec_fields import MAX_DIM, MAX_LAYERS, as_int, layer_list
from hybrid_kv.staging import messages as M
from hybrid_kv.staging.auth import MIN_SECRET, SECRET_ENV, load_secret
from hybrid_kv.transport import wire


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
    from hybrid_kv.vllm.link import PrefillLink

    monkeypatch.setattr(PrefillLink, "MAX_STAGED", 3)
    srv = socket.create_server(("127.0.0.1", 0))
    go = threading.Event()

    def serve():
        conn, _ = srv.accept()
        with conn:
            go.wait(10)
            for i in range(4):
                wire.send_msg(conn, {"type": M.READY, "req": f"r{i}", "until": None})
            time.sleep(0.01)
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
