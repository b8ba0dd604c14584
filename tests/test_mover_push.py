"""Push mode in the state mover, without an engine: the decode rank's granting and failure decisions
(`mover.push_in.PushIn`) on each side of their limits, and one request pushed end to end between two real NIXL
agents (UCX, CPU memory) through the prefill rank's `Pushes` and the decode rank's `PushIn` and `Receiver`,
byte-exact against a hand-built expectation. The same objects under vLLM: tests/test_vllm_push.py."""

import time
import types

import pytest
import torch
from test_mover import blocks, geometry

from hybrid_kv.mover.grants import GrantDesk
from hybrid_kv.mover.plans import AnyTPPlans
from hybrid_kv.mover.push_in import PushIn
from hybrid_kv.mover.push_out import Pushes
from hybrid_kv.mover.receiver import Receiver
from hybrid_kv.mover.sender import Sender
from hybrid_kv.spec_hf import load_spec
from hybrid_kv.staging import messages as M
from hybrid_kv.staging.copier import Copier
from hybrid_kv.staging.pool import LeasedPool

TIMEOUT_S, LEASE_S = 2.0, 10.0


class Link:
    """A decode rank's link to one source, as `PushIn` reads it: the clock, `push-end`s heard, alive."""

    def __init__(self) -> None:
        now = time.monotonic()
        self.clock, self.alive, self.ended = M.LeaseClock(now, now, now), True, {}

    def take_ended(self, req: str):
        return self.ended.pop(req, None)


@pytest.fixture(scope="module")
def spec():
    return load_spec("jamba-v0.1")


def push_in(spec, tp: int, capacity: int) -> PushIn:
    geom = geometry(spec, tp, 0)
    plans = AnyTPPlans(spec, "DS", "HND", 1 << 20, None, "no attention pages here")
    copier = Copier(geom.storage, geom.pages, torch.zeros(max(capacity, 1), dtype=torch.uint8), "decode", "torch")
    return PushIn(Receiver(geom, plans, LeasedPool(capacity), copier, TIMEOUT_S), TIMEOUT_S, LEASE_S)


def register(pi: PushIn, req: str, remote_tp: int, now: float, n: int = 1):
    recv = pi.rx.open(req, None, "P", remote_tp, {g: list(range(n)) for g in pi.rx.geom.groups}, {})
    pi.registered(req, recv, now)
    return recv


def test_granted_in_arrival_order_and_the_wait_bounded(spec):
    """Staging for the small request only: the large one, registered first, is not overtaken (no
    starvation); at `timeout_s` after its registration (not before) both fail, naming the full staging."""
    probe = push_in(spec, 1, 1 << 26)
    small, big = sum(register(probe, "s", 1, 0).units[0]), register(probe, "b", 2, 0, n=2)
    assert sum(map(sum, big.units.values())) > small
    pi, t0 = push_in(spec, 1, small), time.monotonic()
    links = {("P", p): Link() for p in (0, 1)}
    register(pi, "big", 2, t0, n=2)
    register(pi, "small", 1, t0)
    assert pi.due(t0, links) == ([], []) and pi.rx.pool.live == 0 and pi.waiting() == 2
    assert pi.due(t0 + TIMEOUT_S - 0.01, links) == ([], [])
    grants, fails = pi.due(t0 + TIMEOUT_S + 0.01, links)
    assert not grants and [r for r, _ in fails] == ["big", "small"]
    assert all("not granted within hybrid_kv_timeout_s=2 s: hybrid-kv receive staging full" in w for _, w in fails)


def test_a_grant_waits_for_a_link_to_every_source(spec):
    pi, t0 = push_in(spec, 1, 1 << 26), time.monotonic()
    recv = register(pi, "r", 2, t0)
    links = {("P", 0): Link()}
    assert pi.due(t0, links) == ([], []) and recv.slots  # slots held, one link missing
    fails = pi.due(t0 + TIMEOUT_S + 0.01, links)[1]
    no_link = "no hybrid-kv link to every source prefill rank"
    assert fails == [("r", f"not granted within hybrid_kv_timeout_s=2 s: {no_link}")]
    recv = register(pi, "q", 2, t0)
    links[("P", 1)] = Link()
    ((granted, msgs),) = pi.due(t0 + 1, links)[0]
    assert granted is recv and recv.push.deadline == t0 + 1 + LEASE_S and sorted(msgs) == [0, 1]
    for p, (link, msg) in msgs.items():
        assert link is links[("P", p)] and msg["type"] == M.GRANT and msg["req"] == "q"
        assert [n for _, _, n in msg["units"]] == recv.units[p] and msg["until"] == pytest.approx(t0 + 1 + LEASE_S)
    assert pi.waiting() == 0


def granted(spec, remote_tp: int = 2):
    pi, t0 = push_in(spec, 1, 1 << 26), time.monotonic()
    links = {("P", p): Link() for p in range(remote_tp)}
    recv = register(pi, "r", remote_tp, t0)
    assert len(pi.due(t0, links)[0]) == 1
    return pi, links, recv, t0


def test_landed_only_when_every_source_and_the_engine_are_done(spec):
    pi, links, _, t0 = granted(spec)
    assert not pi.landed(0, "other") and not pi.landed(5, "r")  # matches no grant
    assert pi.landed(0, "r") and pi.step(t0 + 1, links) == ([], [])
    pi.engine_done("r")
    assert pi.step(t0 + 1, links) == ([], [])  # source 1 still writing
    assert pi.landed(1, "r") and pi.step(t0 + 1, links) == (["r"], [])


def test_fails_only_when_nothing_can_be_in_flight(spec):
    """A `push-end` from one of two sources: the other may still write, so the request fails at the
    grant's end (not before), or at once when the other ends too; a lost link counts `PUSH_MARGIN_S` after
    it was noticed (not before)."""
    pi, links, recv, t0 = granted(spec)
    pi.unsent.put(("r", 0, "grant not sent: gone"))
    assert pi.step(t0 + 1, links) == ([], [])
    assert pi.step(recv.push.deadline - 0.01, links) == ([], [])
    assert pi.step(recv.push.deadline, links) == ([], [("r", "prefill rank 0: grant not sent: gone")])
    pi, links, recv, t0 = granted(spec)
    pi.unsent.put(("r", 0, "grant not sent: gone"))
    links[("P", 1)].ended["r"] = "grant refused: units"
    both = "prefill rank 0: grant not sent: gone; prefill rank 1: grant refused: units"
    assert pi.step(t0 + 1, links)[1] == [("r", both)]
    pi, links, recv, t0 = granted(spec, remote_tp=1)
    links[("P", 0)].alive = False
    assert pi.step(t0 + 1, links) == ([], [])  # noticed at t0 + 1
    assert pi.step(t0 + 1 + M.PUSH_MARGIN_S - 0.01, links) == ([], [])
    assert pi.step(t0 + 1 + M.PUSH_MARGIN_S, links) == ([], [("r", "a source's link was lost")])


def test_given_up_slots_free_at_once_or_once_quiet(spec):
    """The engine fails a request: not granted yet, its slots are free at once; granted, they stay held
    (quarantine) until its sources can no longer write, here the grant's end."""
    pi, t0 = push_in(spec, 1, 1 << 26), time.monotonic()
    register(pi, "r", 2, t0)
    pi.due(t0, {("P", 0): Link()})  # slots, no grant (a link missing)
    assert pi.rx.pool.live and pi.give_up("r") is None and pi.rx.pool.live == 0 and pi.waiting() == 0
    pi, links, recv, t0 = granted(spec)
    assert pi.give_up("r") is recv and "r" not in pi.rx.recvs
    live = pi.rx.pool.live
    assert live and pi.step(recv.push.deadline - 0.01, links) == ([], []) and pi.rx.pool.live == live
    assert pi.step(recv.push.deadline, links) == ([], []) and pi.rx.pool.live == 0 and not pi.quarantine


def test_one_request_pushed_between_two_nixl_agents(spec):
    """Prefill TP 1 -> decode TP 1 over UCX (CPU memory): grant, stage, one WRITE per unit with the state
    notification, poll, scatter. Every state byte of the request's decode pages equals the prefill's, and
    nothing else of the decode cache changed; no slot, handle or grant is left on either side."""
    nixl = pytest.importorskip("nixl._api")
    pgeom, dgeom = geometry(spec, 1, 0), geometry(spec, 1, 0)
    gen = torch.Generator().manual_seed(7)
    pgeom.storage.copy_(torch.randint(0, 256, pgeom.storage.shape, dtype=torch.uint8, generator=gen))
    dgeom.storage.copy_(torch.randint(0, 256, dgeom.storage.shape, dtype=torch.uint8, generator=gen))
    before = dgeom.storage.clone()
    plans = AnyTPPlans(spec, "DS", "HND", 1 << 20, None, "no attention pages here")
    p_stage, d_stage = torch.zeros(1 << 24, dtype=torch.uint8), torch.zeros(1 << 24, dtype=torch.uint8)
    sender = Sender(Copier(pgeom.storage, pgeom.pages, p_stage, "prefill", "torch"), LEASE_S, TIMEOUT_S,
                    geometry=pgeom, plans=plans)  # fmt: skip
    sent = []
    server = types.SimpleNamespace(sender=sender, grants=GrantDesk(sender, lambda cid, m: sent.append(m) or True))
    pushes = Pushes(server)
    rx = Receiver(dgeom, plans, LeasedPool(d_stage.numel()),
                  Copier(dgeom.storage, dgeom.pages, d_stage, "decode", "torch"), TIMEOUT_S)  # fmt: skip
    pi = PushIn(rx, TIMEOUT_S, LEASE_S)
    cfg = nixl.nixl_agent_config(enable_prog_thread=False, backends=["UCX"])
    pa, da = nixl.nixl_agent("P", cfg), nixl.nixl_agent("D", cfg)
    regs = [(pa, pa.register_memory([(p_stage.data_ptr(), p_stage.numel(), 0, "")], "DRAM")),
            (da, da.register_memory([(d_stage.data_ptr(), d_stage.numel(), 0, "")], "DRAM"))]  # fmt: skip
    assert pa.add_remote_agent(da.get_agent_metadata()) == b"D"
    mine, theirs, now = blocks(pgeom, 2), blocks(dgeom, 3), time.monotonic()
    recv = pi.rx.open("d1", None, "P", 1, theirs, {})
    pi.registered("d1", recv, now)
    links = {("P", 0): Link()}
    ((_, msgs),) = pi.due(now, links)[0]
    server.grants.hello({"engine_id": "D", "staging": [d_stage.data_ptr(), d_stage.numel(), 0], "tp_size": 1,
                         "tp_rank": 0}, 1)  # fmt: skip
    server.grants.grant(msgs[0][1], 1)
    assert not sent and pushes.match("p1", "D", "d1", [0], ("p1",))
    out = pushes.write("p1", "D", "d1", [0], 1, mine, theirs, lambda: {0: "D"}, pa, "DRAM", M.state_notif(0, "d1"))
    assert pushes.descriptors == {"p1": len(recv.units[0])} and sender.live_slots == len(recv.units[0])
    pushes.stock_ended(out, issued=False)
    deadline, ended, notes = time.monotonic() + 30, {}, []
    while not ended or not notes:
        assert time.monotonic() < deadline, "the WRITE did not end within 30 s"
        ended = ended or pushes.poll(pa, set(), lambda h: None)[0]
        notes += [n for ns in da.get_new_notifs().values() for n in ns]
    assert list(ended) == ["p1"] and not ended["p1"].failed and sender.live_slots == 0 and not sent
    assert pi.landed(*M.parse_state_notif(notes[0]))
    pi.engine_done("d1")
    assert pi.step(time.monotonic(), links) == (["d1"], [])
    assert rx.scatter(["d1"]) == [] and rx.scattered() == ["d1"]
    lay, want, src = dgeom.layout, before.clone(), pgeom.storage
    for d, p in zip(dgeom.layers, pgeom.layers):  # block 2 of every state layer -> block 3, conv and SSM
        for off, n in ((0, lay.conv_bytes), (lay.ssm_offset, lay.ssm_bytes)):
            at, to = p.offset + 2 * p.stride + off, d.offset + 3 * d.stride + off
            want[to : to + n] = src[at : at + n]
    assert torch.equal(dgeom.storage, want)
    rx.drop("d1")
    assert rx.pool.live == 0 and server.grants.kept == 0 and not pushes.live()
    for agent, reg in regs:
        agent.deregister_memory(reg)
    pa.remove_remote_agent("D")


def prefill_side(spec, decode_ranks: int = 1):
    """A prefill rank's `Pushes` over a real `GrantDesk` with `decode_ranks` push decode ranks said hello
    (connection r + 1 each), and the messages it sent them."""
    pgeom = geometry(spec, 1, 0)
    plans = AnyTPPlans(spec, "DS", "HND", 1 << 20, None, "no attention pages here")
    stage = torch.zeros(1 << 24, dtype=torch.uint8)
    sender = Sender(Copier(pgeom.storage, pgeom.pages, stage, "prefill", "torch"), LEASE_S, TIMEOUT_S,
                    geometry=pgeom, plans=plans)  # fmt: skip
    sent = []
    desk = GrantDesk(sender, lambda cid, m: sent.append((cid, m)) or True)
    for r in range(decode_ranks):
        desk.hello({"engine_id": "D", "staging": [1 << 30, 1 << 24, 0], "tp_size": decode_ranks, "tp_rank": r}, r + 1)
    return Pushes(types.SimpleNamespace(sender=sender, grants=desk)), desk, sent, pgeom


def grant_of(pushes: Pushes, pgeom, d_tp: int, rank: int, req: str) -> dict:
    sizes = pushes.sender.chunk(d_tp, rank, blocks(pgeom, 1)).unit_bytes
    offs = [sum(sizes[:u]) for u in range(len(sizes))]
    return M.grant(req, [(u, o, n) for u, (o, n) in enumerate(zip(offs, sizes))], time.monotonic() + LEASE_S,
                   blocks(pgeom, 1))  # fmt: skip


def test_the_match_waits_for_every_grant_and_a_withdrawal_ends_the_push(spec):
    """Two decode ranks: the match waits while one grant is missing (the entry handed back by `on_grant`
    once both came, not before); a decode rank that withdraws before the match makes the push give up and
    the other rank's unused grant end with `push-end`, nothing written."""
    pushes, desk, sent, pgeom = prefill_side(spec, 2)
    d_tp = 2
    desk.grant(grant_of(pushes, pgeom, d_tp, 0, "d1"), 1)
    assert not pushes.match("p1", "D", "d1", [0, 1], ("p1", "ids", "reg")) and pushes.awaiting
    assert pushes.on_grant("D", "d1") is None  # rank 1's grant still missing
    desk.grant(grant_of(pushes, pgeom, d_tp, 1, "d1"), 2)
    assert pushes.on_grant("D", "d1") == ("p1", "ids", "reg") and not pushes.awaiting and not sent
    # withdrawn before the match: given up, the other rank's grant ended, nothing staged
    desk.grant(grant_of(pushes, pgeom, d_tp, 0, "d2"), 1)
    pushes.on_withdraw("D", 1, "d2")
    assert not pushes.match("p2", "D", "d2", [0, 1], ("p2",))
    assert [(cid, m["type"], m["req"]) for cid, m in sent] == [(1, M.PUSH_END, "d2")] and desk.kept == 2
    assert pushes.poll(None, set(), lambda h: None) == ({}, {"p2"}) and pushes.sender.live_slots == 0


def test_withdrawals_before_the_match_are_remembered_up_to_the_bound(spec, monkeypatch):
    """At most MAX_WITHDRAWN withdrawals wait for their match (the oldest forgotten beyond it)."""
    import hybrid_kv.mover.push_out as P

    monkeypatch.setattr(P, "MAX_WITHDRAWN", 3)
    pushes, *_ = prefill_side(spec)
    for i in range(3):
        pushes.on_withdraw("D", 0, f"d{i}")
    assert list(pushes.withdrawn) == [("D", "d0"), ("D", "d1"), ("D", "d2")]
    pushes.on_withdraw("D", 0, "d3")
    assert list(pushes.withdrawn) == [("D", "d1"), ("D", "d2"), ("D", "d3")]
