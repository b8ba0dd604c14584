"""The decode side checks every unit a source announces against its own plan before it posts a READ: a real
prefill endpoint (its loop on a thread) and a real decode endpoint in this process, NIXL over UCX; the
source's announcements are rewritten on the wire. A lying source fails exactly the requests it lied about,
naming the values, no decode page is written for them, and nothing stays held on either side."""

import time
from dataclasses import replace

import pytest
from bytecheck import assert_same_bytes
from transport_util import LoopSource as Source
from transport_util import sides

import hybrid_kv.transport.prefill as prefill_mod
from hybrid_kv.staging.wire import send_msg
from hybrid_kv.transport.decode import DecodeEndpoint, DecodeOptions

pytestmark = pytest.mark.timeout(240)
SEED = 5


@pytest.fixture
def pair(tmp_path):
    pcfg, dcfg, reqs = sides(tmp_path, 1, 2, 3, 700, SEED)
    src = Source(pcfg)
    bs_d = dcfg.layouts()[0].block_size
    src.call(lambda: src.ep.fill(SEED, reqs, bs_d))
    dec = DecodeEndpoint(dcfg, 1, pcfg, [("127.0.0.1", src.ep.port)], DecodeOptions(request_timeout_s=10))
    yield src, dec, reqs
    dec.close()
    src.close()


def run(src: Source, dec: DecodeEndpoint, reqs: list[dict]):
    dec.reset(SEED)
    dec.configure("packed", reqs, 2)
    src.call(lambda: src.ep.prefilled(reqs))
    return {r.id: r for r in dec.run("packed", reqs, 2)}


def test_honest_source_verifies(pair):
    src, dec, reqs = pair
    done = run(src, dec, reqs)
    assert all(r.error is None for r in done.values()), [r.error for r in done.values()]
    assert dec.mismatches(SEED, reqs, set(done)) == []


def _units(f):
    return lambda units: [f(*u) for u in units]


LIES = {
    "nbytes": _units(lambda u, o, n: [u, o, n + 16]),
    "offset": _units(lambda u, o, n: [u, o + (1 << 40), n]),
    "negative-offset": _units(lambda u, o, n: [u, -1, n]),
    "unit": _units(lambda u, o, n: [7, o, n]),
    "twice": lambda units: units + units,
    "not-ints": _units(lambda u, o, n: [u, str(o), n]),
}


@pytest.mark.parametrize("lie", sorted(LIES))
def test_lying_source_fails_only_its_requests(pair, monkeypatch, lie):
    src, dec, reqs = pair
    real = prefill_mod.send_msg
    victim = reqs[1]["id"]

    def send(sock, header, payload=b""):
        if header.get("type") == "ready" and header.get("req") == victim:
            header = {**header, "units": LIES[lie](header["units"])}
        return real(sock, header, payload)

    monkeypatch.setattr(prefill_mod, "send_msg", send)
    dec.reset(SEED)
    background = dec.cache.clone()
    done = run(src, dec, reqs)
    assert done[victim].error is not None and "announced units=" in done[victim].error
    assert "which its plan for this rank does not hold" in done[victim].error
    ok = {i for i, r in done.items() if r.error is None}
    assert ok == {r["id"] for r in reqs} - {victim}
    assert dec.mismatches(SEED, reqs, ok) == []  # the honest requests are byte-exact
    # the victim's pages were never written: the whole cache equals the oracle with only `ok` received,
    # and the victim's pages still hold the background
    got = dec.cache.view(-1, dec.geom.page_bytes)
    want = background.view(-1, dec.geom.page_bytes)
    blocks = victim_pages(dec, reqs[1])
    assert_same_bytes(got[blocks], want[blocks], "the victim's pages")
    assert dec.pool.live == 0 and dec.counts()["in_flight_reads"] == 0
    deadline = time.monotonic() + 10
    while src.ep.pool.live and time.monotonic() < deadline:  # the decode rank released the victim's units
        time.sleep(0.01)
    assert src.ep.pool.live == 0


def test_a_unit_announced_again_fails_only_its_request(pair, monkeypatch):
    """A source that sends a request's `ready` a second time (each message well formed): the second names
    units this rank already holds, so that request fails naming them; the others are byte-exact and no
    receive slot, READ or source slot is left."""
    src, dec, reqs = pair
    real = prefill_mod.send_msg
    victim = reqs[1]["id"]

    def send(sock, header, payload=b""):
        real(sock, header, payload)
        if header.get("type") == "ready" and header.get("req") == victim:
            real(sock, header, payload)

    monkeypatch.setattr(prefill_mod, "send_msg", send)
    done = run(src, dec, reqs)
    assert "announced units" in (done[victim].error or "") and "again" in done[victim].error, done[victim].error
    ok = {i for i, r in done.items() if r.error is None}
    assert ok == {r["id"] for r in reqs} - {victim}
    assert dec.mismatches(SEED, reqs, ok) == []
    assert dec.pool.live == 0 and dec.counts()["in_flight_reads"] == 0
    deadline = time.monotonic() + 10
    while src.ep.pool.live and time.monotonic() < deadline:
        time.sleep(0.01)
    assert src.ep.pool.live == 0


def victim_pages(dec: DecodeEndpoint, req: dict) -> list[int]:
    state, kv = req["decode_blocks"]
    n = dec.geom.num_blocks
    out = []
    for layer in dec.spec.layers:
        ids = kv if layer.kind.value == "attention" else [state]
        out += [layer.index * n + b for b in ids]
    return out


def test_new_run_drops_what_the_source_held_for_the_last(pair):
    """A decode rank that starts a new run (`mode`) gets nothing of the last one: units packed and
    announced for requests it never read are freed at once, not when their lease expires (30 s)."""
    src, dec, reqs = pair
    dec.reset(SEED)
    dec.configure("packed", reqs, 2)
    src.call(lambda: src.ep.prefilled(reqs))  # packed and announced; this rank never reads them
    deadline = time.monotonic() + 30
    while src.ep.stats["packed_units"] < len(reqs):
        assert time.monotonic() < deadline, src.ep.counts()
        time.sleep(0.01)
    held = src.ep.pool.live
    assert held >= len(reqs)
    dec.configure("packed", reqs, 2)  # the next run
    src.call(lambda: None)  # the source's loop has handled the mode
    assert src.ep.pool.live == 0 and not src.ep.waiting, src.ep.counts()
    done = run(src, dec, reqs)  # and the new run is whole: the stale announcements were not used
    assert all(r.error is None for r in done.values()), [r.error for r in done.values()]
    assert dec.mismatches(SEED, reqs, set(done)) == []


def test_a_partial_frame_delays_no_other_peer(pair, monkeypatch):
    """3 header bytes and silence from one connection: the prefill loop keeps serving the decode rank
    (a round trip stays under 100 ms; the blocking read it replaced stalled every peer for 10 s), and the
    stuck connection alone is dropped once its message is overdue."""
    import socket

    import hybrid_kv.transport.prefill_channel as chan
    from hybrid_kv.staging.wire import recv_msg

    src, dec, reqs = pair
    monkeypatch.setattr(chan, "MSG_TIMEOUT_S", 0.5)
    stuck = socket.create_connection(("127.0.0.1", src.ep.port), timeout=10)
    stuck.sendall(b"HKV")
    time.sleep(0.05)
    rtts = []
    for _ in range(5):
        t = time.monotonic()
        dec.configure("packed", reqs, 2)  # mode -> mode-ok through the same loop
        rtts.append(time.monotonic() - t)
    assert sorted(rtts)[2] < 0.1, rtts
    head, _ = recv_msg(stuck, 10)  # overdue: told why, then closed
    assert head["type"] == "error" and "incomplete after 0.5 s" in head["message"]
    assert stuck.recv(1) == b""
    stuck.close()
    done = run(src, dec, reqs)  # the decode rank's own connection was never disturbed
    assert all(r.error is None for r in done.values()), [r.error for r in done.values()]


def test_lease_race_never_delivers_wrong_bytes(tmp_path):
    """The race of a staging lease that ends before the decode rank READs (10 runs): a source pool of one
    unit and a 0.2 s lease; A is announced, its lease runs out while this rank has not started it, the
    source packs B into the same slot. A READ of A's announcement would deliver B's bytes as A's: the
    fence fails A instead, naming the lease, and B arrives byte-exact. (Without the fence A is
    "received" with B's state: the oracle check below fails.)"""
    from hybrid_kv.batch import blocks_from
    from hybrid_kv.staging.pool import LeasedPool
    from hybrid_kv.staging.template import ALL

    pcfg, dcfg, reqs = sides(tmp_path, 1, 2, 2, 300, SEED)
    src = Source(pcfg, lease_s=0.2)
    try:
        src.call(lambda: src.ep.fill(SEED, reqs, dcfg.layouts()[0].block_size))
        dec = DecodeEndpoint(dcfg, 1, pcfg, [("127.0.0.1", src.ep.port)], DecodeOptions(request_timeout_s=10))
        try:
            r0 = reqs[0]
            chunk = dec.runs._chunk(0, ALL, 300, blocks_from(r0["prefill_blocks"]), blocks_from(r0["decode_blocks"]))[0]
            assert len(chunk.units) == 1
            src.call(lambda: setattr(src.ep.sender, "pool", LeasedPool(chunk.unit_bytes[0])))  # one unit: A, then B
            a, b = reqs[0]["id"], reqs[1]["id"]
            for _ in range(10):
                dec.reset(SEED)
                dec.configure("packed", reqs, 2)
                src.call(lambda: src.ep.prefilled(reqs))
                deadline = time.monotonic() + 10  # A's lease ends, B is packed into its slot and announced
                while src.ep.stats["packed_units"] % 2 or src.ep.waiting:
                    assert time.monotonic() < deadline, src.ep.counts()
                    time.sleep(0.01)
                done = {r.id: r for r in dec.run("packed", reqs, 2)}
                assert done[a].error is not None and "staging lease" in done[a].error, done[a].error
                assert done[b].error is None, done[b].error
                assert dec.mismatches(SEED, reqs, {b}) == []  # B exact, A's pages untouched
        finally:
            dec.close()
    finally:
        src.close()


def test_page_to_page_reads_use_the_sources_own_block_count(tmp_path, monkeypatch):
    """The prefill cache holds 3 more blocks than this rank's configuration of the prefill says: page
    offsets past layer 0 come from the welcome's num_blocks, so a strided run is byte-exact (with the
    configured count every READ of layer 1 lands 3 pages early: the oracle check fails). A welcome whose
    num_blocks does not match the cache it registered, or with any value out of type or range, is refused
    at the handshake, naming the value; nothing of the refused source stays registered."""
    import hybrid_kv.transport.prefill_channel as chan

    told, dcfg, reqs = sides(tmp_path, 1, 2, 3, 700, SEED)  # what the decode rank was configured with
    pcfg = replace(told, num_blocks=told.num_blocks + 3)
    src = Source(pcfg)
    try:
        src.call(lambda: src.ep.fill(SEED, reqs, dcfg.layouts()[0].block_size))
        dec = DecodeEndpoint(dcfg, 1, told, [("127.0.0.1", src.ep.port)], DecodeOptions(request_timeout_s=10))
        try:
            dec.reset(SEED)
            dec.configure("strided", reqs, 2)
            done = {r.id: r for r in dec.run("strided", reqs, 2)}
            assert all(r.error is None for r in done.values()), [r.error for r in done.values()]
            assert dec.mismatches(SEED, reqs, set(done)) == []
        finally:
            dec.close()
        real = chan.send_msg
        lies = [
            (dict(num_blocks=told.num_blocks), rf"num_blocks={told.num_blocks} x page_bytes=\d+ make \d+ B"),
            (dict(num_blocks="9"), r"num_blocks='9' \(accepted: an integer"),
            (dict(max_unit_bytes="64M"), r"max_unit_bytes='64M' \(accepted: an integer in \[4096"),
            (dict(lease_s=-1), r"lease_s=-1 \(accepted: seconds"),
            (dict(cache={"addr": "0x10", "nbytes": 1, "dev": 0, "mem": "DRAM"}), r"cache=\{'addr': '0x10'"),
            (dict(staging={"addr": 4096, "nbytes": -5, "dev": 0, "mem": "DRAM"}), r"staging=\{.*'nbytes': -5"),
            (dict(staging={"addr": 4096, "nbytes": 5, "dev": 0, "mem": "GPU"}), r"mem: DRAM or VRAM"),
        ]
        for lie, msg in lies:

            def send(sock, header, payload=b"", lie=lie):
                if header.get("type") == "welcome":
                    header = {**header, **lie}
                return real(sock, header, payload)

            monkeypatch.setattr(chan, "send_msg", send)
            with pytest.raises(ValueError, match=msg):
                DecodeEndpoint(dcfg, 1, told, [("127.0.0.1", src.ep.port)], DecodeOptions(handshake_timeout_s=5))
        src.call(lambda: None)
        deadline = time.monotonic() + 10
        while src.ep.counts()["peers"] and time.monotonic() < deadline:  # each refusing rank said bye
            time.sleep(0.01)
        assert src.ep.counts()["peers"] == 0
    finally:
        src.close()


def test_a_stalled_source_delays_no_other_source(tmp_path, monkeypatch):
    """P TP 2 -> D TP 1 (the decode rank reads both sources): prefill rank 1 sends 3 header bytes and
    stalls. Prefill rank 0's units are still READ as they are announced: every one of them is READ and its
    slot freed while rank 1's message is still pending (the decode rank's run has not ended, which it does
    only once rank 1 is dropped; the blocking read this replaced held the loop until that deadline). Then
    rank 1 alone is dropped once its message is overdue, failing the requests that needed it, naming why."""
    import threading

    import hybrid_kv.transport.request as recv_mod

    monkeypatch.setattr(recv_mod, "MSG_TIMEOUT_S", 10.0)  # rank 0's five READs end well inside it, loaded too
    pcfg, dcfg, reqs = sides(tmp_path, 2, 1, 5, 700, SEED)
    srcs = [Source(pcfg, rank=r) for r in range(2)]
    try:
        for s in srcs:
            s.call(lambda s=s: s.ep.fill(SEED, reqs, dcfg.layouts()[0].block_size))
        addrs = [("127.0.0.1", s.ep.port) for s in srcs]
        dec = DecodeEndpoint(dcfg, 0, pcfg, addrs, DecodeOptions(request_timeout_s=30))
        try:
            assert sorted(dec.sources) == [0, 1]
            dec.reset(SEED)
            dec.configure("packed", reqs, 1)
            srcs[1].call(lambda: [p.sock.sendall(b"HKV") for p in srcs[1].ep.channel.peers.values()])
            out: list = []
            worker = threading.Thread(target=lambda: out.extend(dec.run("packed", reqs, len(reqs))), daemon=True)
            worker.start()
            time.sleep(0.2)  # the decode loop has seen rank 1's bytes
            for r in reqs:  # one request at a time: announced by rank 0, READ, its slot freed
                packed = srcs[0].ep.stats["packed_units"]
                t = time.monotonic()
                srcs[0].call(lambda r=r: srcs[0].ep.prefilled([r]))
                while srcs[0].ep.stats["packed_units"] == packed or srcs[0].ep.pool.live:
                    assert time.monotonic() - t < 60, srcs[0].ep.counts()
                    time.sleep(0.001)
            assert worker.is_alive(), "rank 0's units were READ only once rank 1's overdue message was dropped"
            worker.join(60)
            assert not worker.is_alive()
            assert len(out) == len(reqs)
            for r in out:
                assert r.error is not None and "prefill rank 1 lost (a message incomplete after 10 s)" in r.error
            assert dec.pool.live == 0 and dec.counts()["in_flight_reads"] == 0
        finally:
            dec.close()
    finally:
        for s in srcs:
            s.close()


def test_slot_of_an_unreleasable_read_is_never_reused(pair):
    """A READ still in flight when its request times out, whose handle NIXL refuses to release: its
    receive slot stays quarantined (a late write could still land there) until the handle ends, so no
    later READ is given those bytes; then it is freed. (UCX here cannot be made to hold a READ or refuse
    a release on demand: the endpoint's agent reports that one handle as in flight and refuses to
    release it while `hold` is set; the transfer itself is real.)"""
    src, dec, reqs = pair
    victim, hold, posted = reqs[0]["id"], [True], []
    agent = dec.agent
    read, poll, release = agent.read, agent.poll, agent.release
    held: list = []

    def fake_read(local, remote, *a, **kw):
        h = read(local, remote, *a, **kw)
        notif = a[1].decode()
        posted.append((notif, [(int(x), int(x + n)) for x, n in local]))
        if not held and notif.startswith(f"done:{victim}:"):
            held.append(h)
        return h

    def fake_poll(h):
        state = poll(h)
        return "PROC" if hold[0] and held and h == held[0] else state

    def fake_release(h):
        if hold[0] and held and h == held[0]:
            raise RuntimeError("handle still in flight")
        return release(h)

    agent.read, agent.poll, agent.release = fake_read, fake_poll, fake_release
    dec.opts.request_timeout_s = 1.0
    done = run(src, dec, reqs)
    assert "timed out" in done[victim].error, done[victim].error
    ok = {i for i, r in done.items() if r.error is None}
    assert ok == {r["id"] for r in reqs} - {victim}
    assert dec.counts()["quarantined_slots"] == 1 and dec.pool.live == 1  # kept, not freed
    base = dec.recv_reg["addr"]
    stuck = next(rng for n, rngs in posted if n.startswith(f"done:{victim}:") for rng in rngs)
    posted.clear()
    done = run(src, dec, reqs)  # the next run: no READ lands in the quarantined bytes
    assert posted and all(b <= stuck[0] or a >= stuck[1] for _, rngs in posted for a, b in rngs if a >= base)
    assert {i for i, r in done.items() if r.error is None} == {r["id"] for r in reqs}
    assert dec.mismatches(SEED, reqs, set(done)) == []
    hold[0] = False  # the handle ends: its slot is freed on the next step
    dec.runs._poll_stuck()
    assert dec.counts()["quarantined_slots"] == 0 and dec.pool.live == 0
    assert dec.agent.counts()["xfer_handles"] == 0


def test_malformed_messages_after_the_handshake(pair):
    """Every message type a decode rank can send, malformed, after a good handshake (and notifications
    the source cannot parse): each is refused naming the value, the source keeps serving the connection
    (a run afterwards is byte-exact), and a message outside the protocol closes that connection only."""
    src, dec, reqs = pair
    s = dec.sources[0]
    bad = [
        ({"type": "mode", "part": "all"}, "mode part='all' (accepted: null"),
        ({"type": "mode", "part": ["all", 5]}, "takes no threshold"),
        ({"type": "mode", "part": ["small", -1]}, "mode part=['small', -1]"),
        ({"type": "mode", "part": ["small", True]}, "mode part=['small', True]"),
        ({"type": "release", "req": 7}, "request id 7 (accepted: a string of 1 to"),
        ({"type": "release", "req": "x" * 600}, "request id 'xxxx"),
        ({"type": "release"}, "request id None"),
    ]
    for msg, why in bad:
        send_msg(s.sock, msg)
        (head, _), *_ = s.reader.wait(time.monotonic() + 10, "source")
        assert head["type"] == "error" and why in head["message"], (msg, head)
    for junk in (b"done:x:notanint", b"done:x", b"done:a:b:c", b"\xff\xfe", b""):
        dec.agent.nx.send_notif(s.agent, junk)
    src.call(lambda: None)
    done = run(src, dec, reqs)  # the connection still serves, byte-exact
    assert all(r.error is None for r in done.values()), [r.error for r in done.values()]
    assert dec.mismatches(SEED, reqs, set(done)) == []
    for msg, why in [({"type": "hello"}, "second hello"), ({"type": "frobnicate"}, "unknown message type")]:
        other = DecodeEndpoint(dec.cfg, 1, dec.pcfg, [("127.0.0.1", src.ep.port)], DecodeOptions())
        try:
            o = other.sources[0]
            send_msg(o.sock, msg)
            (head, _), *_ = o.reader.wait(time.monotonic() + 10, "source")
            assert head["type"] == "error" and why in head["message"], head
            o.sock.settimeout(10)
            assert o.sock.recv(1) == b""  # that connection closed
        finally:
            other.close()
    done = run(src, dec, reqs)  # and the first decode rank's connection was not disturbed
    assert all(r.error is None for r in done.values()), [r.error for r in done.values()]


def test_decode_agent_name_already_held_is_refused_and_the_source_keeps_serving(pair, monkeypatch):
    """A second decode endpoint whose NIXL agent bears the name of one the prefill rank holds already (NIXL
    refuses to load it): its hello is refused naming the agent, and the prefill rank's loop goes on serving
    the first decode rank byte-exact (the refusal used to escape the loop and stop the prefill rank)."""
    import uuid

    import hybrid_kv.transport.common as common

    src, dec, reqs = pair
    taken = dec.agent.name.rsplit("-", 1)[1]
    monkeypatch.setattr(common.uuid, "uuid4", lambda: uuid.UUID(hex=taken + "0" * 16))
    with pytest.raises(RuntimeError, match=f"decode agent '{dec.agent.name}': NIXL refused its metadata"):
        DecodeEndpoint(dec.cfg, 1, dec.pcfg, [("127.0.0.1", src.ep.port)], DecodeOptions(handshake_timeout_s=20))
    monkeypatch.undo()
    done = run(src, dec, reqs)
    assert all(r.error is None for r in done.values()), [r.error for r in done.values()]
    assert dec.mismatches(SEED, reqs, set(done)) == []
