"""Peer authentication before anything is revealed (`hybrid_kv.staging.auth`): the exchange on hand-made
messages, then real prefill and decode endpoints (NIXL over UCX): the right secret transfers byte-exact,
a hostile peer that copied the public fingerprint learns no address, a missing or different secret on
either side is refused, naming the variable, and a non-loopback bind without a secret does not start."""

import socket

import pytest
from transport_util import LoopSource
from transport_util import sides as transport_sides

from hybrid_kv.staging.auth import SECRET_ENV, AuthError, ClientAuth, ServerAuth, _proof, check_bind, load_secret
from hybrid_kv.staging.wire import recv_msg, send_msg
from hybrid_kv.transport.common import hello_fields
from hybrid_kv.transport.decode import DecodeEndpoint, DecodeOptions

pytestmark = pytest.mark.timeout(240)
K, OTHER = b"k" * 32, b"o" * 32
SEED = 9


def test_exchange_on_hand_made_messages():
    c, s = ClientAuth(K), ServerAuth(K)
    ch = s.challenge({"type": "hello", "nonce": c.nonce})
    assert set(ch) == {"type", "nonce", "proof"}  # nothing but the challenge
    s.check(c.answer(ch, "p0"))
    # a recorded auth does not answer a new challenge (fresh nonce), and one try per challenge
    old = c.answer(ch, "p0")
    s.challenge({"type": "hello", "nonce": c.nonce})
    with pytest.raises(AuthError, match="authentication failed"):
        s.check(old)
    with pytest.raises(AuthError, match="auth without a challenge"):
        s.check(old)


@pytest.mark.parametrize(
    ("client", "server", "where", "why"),
    [
        (OTHER, K, "client", "failed authentication"),  # the prefill's proof does not check here
        (None, K, "client", f"requires the shared secret: set {SECRET_ENV}"),
        (K, OTHER, "server", "authentication failed"),  # a client that skips its check
    ],
)
def test_exchange_refusals(client, server, where, why):
    c, s = ClientAuth(client), ServerAuth(server)
    ch = s.challenge({"type": "hello", "nonce": c.nonce})
    if where == "client":
        with pytest.raises(AuthError, match=why):
            c.answer(ch, "p0")
    else:
        forged = {"type": "auth", "proof": _proof(client, "decode", c.nonce, ch["nonce"])}  # its own key's proof
        with pytest.raises(AuthError, match=why):
            s.check(forged)


def test_a_welcome_without_challenge_is_refused_by_a_client_with_a_secret():
    with pytest.raises(AuthError, match="answered without authenticating"):
        ClientAuth(K).answer({"type": "welcome", "staging": {"addr": 1}}, "p0")
    assert ClientAuth(None).answer({"type": "welcome"}, "p0") is None


def test_hello_without_nonce_gets_no_challenge():
    with pytest.raises(AuthError, match="requires the shared secret"):
        ServerAuth(K).challenge({"type": "hello"})


def test_secret_and_bind_rules():
    assert load_secret(environ={}) is None
    assert load_secret(environ={SECRET_ENV: "s" * 16}) == b"s" * 16
    assert load_secret("x" * 20, environ={SECRET_ENV: "s" * 16}) == b"x" * 20  # the config key wins
    with pytest.raises(ValueError, match="has 5 characters; use at least 16"):
        load_secret(environ={SECRET_ENV: "short"})
    for host in ("127.0.0.1", "localhost", "::1", "127.0.0.2"):
        check_bind(host, None, "x")
    for host in ("0.0.0.0", "", "10.1.2.3"):
        with pytest.raises(ValueError, match=rf"would listen on '{host}', which is not a loopback.*{SECRET_ENV}"):
            check_bind(host, None, "prefill rank 0's side channel")
        check_bind(host, K, "x")


# ---- real endpoints --------------------------------------------------------------------------------------


@pytest.fixture
def sides(tmp_path):
    return transport_sides(tmp_path, 1, 2, 2, 300, SEED)


def test_transfer_with_a_shared_secret(sides, monkeypatch):
    pcfg, dcfg, reqs = sides
    monkeypatch.setenv(SECRET_ENV, K.decode())
    src = LoopSource(pcfg)
    try:
        src.call(lambda: src.ep.fill(SEED, reqs, dcfg.layouts()[0].block_size))
        dec = DecodeEndpoint(dcfg, 1, pcfg, [("127.0.0.1", src.ep.port)], DecodeOptions(request_timeout_s=20))
        try:
            dec.reset(SEED)
            dec.configure("packed", reqs, 2)
            src.call(lambda: src.ep.prefilled(reqs))
            done = {r.id: r for r in dec.run("packed", reqs, 2)}
            assert all(r.error is None for r in done.values()), [r.error for r in done.values()]
            assert dec.mismatches(SEED, reqs, set(done)) == []
        finally:
            dec.close()
        assert src.ep.stats["refused_auth"] == 0
    finally:
        src.close()


def _exchange(port: int, msg: dict, payload: bytes = b"") -> list[dict]:
    """Send `msg`, collect what comes back until the prefill rank closes the connection."""
    got = []
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        send_msg(s, msg, payload)
        try:
            while True:
                head, _ = recv_msg(s, 10)
                got.append(head)
                if head["type"] == "challenge":  # answer with a forged proof
                    send_msg(s, {"type": "auth", "proof": "0" * 64}, b"metadata")
        except (ConnectionError, OSError, RuntimeError):
            pass
    return got


def test_hostile_peer_learns_no_address(sides, monkeypatch):
    """A peer that copied the decode fingerprint (public: it follows from the model config) but lacks
    the secret gets a challenge or an error, never the welcome, and nothing is registered for it."""
    pcfg, dcfg, _ = sides
    monkeypatch.setenv(SECRET_ENV, K.decode())
    src = LoopSource(pcfg)
    try:
        lay = dcfg.layouts()[1]
        hello = {"type": "hello", **hello_fields(lay, dcfg), "agent": "intruder"}
        for msg in (hello, {**hello, "nonce": "ab" * 16}):
            replies = _exchange(src.ep.port, msg, b"intruder-metadata")
            assert replies and replies[-1]["type"] == "error", replies
            assert all(r["type"] in ("challenge", "error") for r in replies), replies
            text = repr(replies)
            assert "staging" not in text and "cache" not in text and "addr" not in text
        src.call(lambda: None)
        c = src.ep.counts()
        assert c["refused_auth"] == 2 and c["remote_agents"] == 0 and c["peers"] == 0, c
    finally:
        src.close()


@pytest.mark.parametrize(
    ("p_secret", "d_secret", "why"),
    [
        (K, None, "requires the shared secret"),
        (None, K, "this prefill rank has no shared secret"),
        (K, OTHER, "failed authentication"),
    ],
)
def test_endpoints_refuse_a_missing_or_different_secret(sides, monkeypatch, p_secret, d_secret, why):
    pcfg, dcfg, _ = sides
    if p_secret:
        monkeypatch.setenv(SECRET_ENV, p_secret.decode())
    else:
        monkeypatch.delenv(SECRET_ENV, raising=False)
    src = LoopSource(pcfg)
    try:
        if d_secret:
            monkeypatch.setenv(SECRET_ENV, d_secret.decode())
        else:
            monkeypatch.delenv(SECRET_ENV, raising=False)
        with pytest.raises((AuthError, RuntimeError), match=why):
            DecodeEndpoint(dcfg, 1, pcfg, [("127.0.0.1", src.ep.port)], DecodeOptions(handshake_timeout_s=10))
        src.call(lambda: None)
        assert src.ep.counts()["remote_agents"] == 0
    finally:
        src.close()


def test_non_loopback_bind_without_secret_does_not_start(sides, monkeypatch):
    pcfg, _, _ = sides
    monkeypatch.delenv(SECRET_ENV, raising=False)
    with pytest.raises(ValueError, match=r"would listen on '0.0.0.0'.*HYBRID_KV_SECRET"):
        LoopSource(pcfg, host="0.0.0.0")
