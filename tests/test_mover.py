"""The state mover's one sender and one receiver (`hybrid_kv.mover`), without an engine or NIXL: all-or-none
slots on each side of the pool's limit, the lease a `ready` carries, what frees slots, the checks of an
announcement against the receiver's own chunk, and the batched scatter. Bytes moved through them are checked
against the oracle end to end (tests/test_vllm_*.py); here, their bookkeeping."""

import time
import types

import pytest
import torch

from hybrid_kv.layout import RankLayout
from hybrid_kv.mover.geometry import StateGeometry
from hybrid_kv.mover.plans import AnyTPPlans
from hybrid_kv.mover.receiver import Receiver
from hybrid_kv.mover.sender import Sender
from hybrid_kv.spec_hf import load_spec
from hybrid_kv.staging import messages as M
from hybrid_kv.staging.copier import Copier
from hybrid_kv.staging.pool import LeasedPool

BLOCKS = 4


def geometry(spec, tp: int, rank: int) -> StateGeometry:
    """Mamba layers in one backing buffer, one group per layer, as vLLM lays them out (reference §2.3)."""
    lay = RankLayout(spec, tp, rank)
    state = [layer for layer in spec.layers if layer.kind.value != "attention"]
    buf = torch.zeros(len(state) * BLOCKS * lay.page_bytes, dtype=torch.uint8)
    shapes = types.SimpleNamespace(
        shapes=((lay.conv_channels, lay.conv_rows), (lay.ssm_shard.size, *spec.state.head_shape))
    )
    groups, caches, specs = [], {}, {}
    for k, layer in enumerate(state):
        name = f"model.layers.{layer.index}.mixer"
        caches[name] = buf[k * BLOCKS * lay.page_bytes :].as_strided((BLOCKS, lay.page_bytes), (lay.page_bytes, 1))
        specs[name] = shapes
        groups.append((k + 1, [name]))
    return StateGeometry(spec, lay, groups, caches, specs, BLOCKS)


@pytest.fixture(scope="module")
def world():
    spec = load_spec("jamba-v0.1")
    plans = AnyTPPlans(spec, "DS", "HND", 1 << 20, None, "no attention pages here")
    return spec, plans, geometry(spec, 1, 0), geometry(spec, 2, 0)


def sender(world, capacity: int) -> Sender:
    _, plans, pgeom, _ = world
    copier = Copier(pgeom.storage, pgeom.pages, torch.zeros(capacity, dtype=torch.uint8), "prefill", "torch")
    return Sender(copier, lease_s=4.0, timeout_s=2.0, geometry=pgeom, plans=plans)


def blocks(geom: StateGeometry, b: int) -> dict[int, list[int]]:
    return {g: [b] for g in geom.groups}


def test_stage_is_all_or_none_at_the_pool_limit(world):
    """Two decode ranks' chunks of one request need `need` bytes: a pool of exactly that stages both, one
    byte less stages neither (refused after the bounded wait, naming the request) and holds nothing."""
    _, _, pgeom, _ = world
    probe = sender(world, 1 << 24)
    chunks = [probe.chunk(2, r, blocks(pgeom, 1)) for r in (0, 1)]
    need = sum(sum(c.unit_bytes) for c in chunks)
    ok = sender(world, need)
    offs = ok.stage([(("c", "r1", r), c) for r, c in enumerate(chunks)], ["r1"], wait_s=0)
    assert [len(o) for o in offs] == [len(c.unit_bytes) for c in chunks] and ok.live_slots == sum(map(len, offs))
    short = sender(world, need - 1)
    with pytest.raises(TimeoutError, match=r"staging pool full: request r1 needs"):
        short.stage([(("c", "r1", r), c) for r, c in enumerate(chunks)], ["r1"], wait_s=0)
    assert short.live_slots == 0
    # item by item (packing at finish): what fits is staged, the rest is left to be asked for
    each = short.stage([(("c", "r1", r), c) for r, c in enumerate(chunks)], ["r1"], fit="each")
    assert each[0] is not None and each[1] is None and short.live_slots == len(each[0])
    roomy = sender(world, need)
    each = roomy.stage([(("c", "r1", r), c) for r, c in enumerate(chunks)], ["r1"], fit="each")
    assert [len(o) for o in each] == [len(c.unit_bytes) for c in chunks]
    # staged by another thread meanwhile (a decode rank asked): skipped, not an error, nothing else lost
    roomy.free_where(lambda k: k[2] == 1)
    again = roomy.stage([(("c", "r1", r), c) for r, c in enumerate(chunks)], ["r1"], fit="each")
    assert again[0] is None and [len(o) for o in again[1:]] == [len(chunks[1].unit_bytes)]


def test_a_failed_copy_frees_every_slot_it_had(world, monkeypatch):
    _, _, pgeom, _ = world
    s = sender(world, 1 << 24)

    def broken(*a, **k):
        raise RuntimeError("launch failed")

    monkeypatch.setattr(s.copier, "run", broken)
    with pytest.raises(RuntimeError, match="launch failed"):
        s.stage([(("c", "r1", 0), s.chunk(1, 0, blocks(pgeom, 1)))], ["r1"])
    assert s.live_slots == 0


def test_announce_leases_from_now_and_what_frees_the_slots(world):
    """`announce` leases every unit until now + lease and returns the `ready` of exactly those units; a slot
    freed meanwhile gives None; `staged` finds the same blocks and units only; `forget` frees one request,
    `reap` what outlived its lease."""
    _, _, pgeom, _ = world
    s = sender(world, 1 << 26)
    b1 = blocks(pgeom, 1)
    chunk = s.chunk(1, 0, b1)
    sizes = chunk.unit_bytes
    offs = s.stage([(("c", "r1", 0), chunk), (("c", "r2", 0), s.chunk(1, 0, blocks(pgeom, 2)))], ["r1", "r2"])
    before = time.monotonic()
    ready = s.announce(("c", "r1", 0), b1, offs[0], sizes)
    assert ready["type"] == M.READY and ready["req"] == "r1" and M.blocks_of(ready["blocks"]) == b1
    assert [tuple(u) for u in ready["units"]] == [(u, o, n) for u, (o, n) in enumerate(zip(offs[0], sizes))]
    assert before + 4.0 <= ready["until"] <= time.monotonic() + 4.0
    assert s.staged(("c", "r1", 0), b1, sizes) == offs[0]
    assert s.staged(("c", "r1", 0), blocks(pgeom, 3), sizes) is None  # other block ids: staged again
    assert s.staged(("c", "r1", 0), b1, sizes[:-1] + [sizes[-1] + 1]) is None
    s.forget("r1")
    assert s.announce(("c", "r1", 0), b1, offs[0], sizes) is None and s.staged(("c", "r1", 0), b1, sizes) is None
    assert s.live_slots == len(offs[1])  # r2's, untouched
    assert s.reap() == 0  # r2 is leased until now + 4 s (stage's own lease)
    s.pool.lease(("c", "r2", 0, 0), time.monotonic() - 1)
    assert s.reap() == 1 and s.live_slots == len(offs[1]) - 1


class Link:
    """A decode rank's view of one source: its registered staging and its clock (the same as ours)."""

    def __init__(self, staging_bytes: int, lease_s: float = 40.0) -> None:
        self.peer = {"staging": (0, staging_bytes, 0), "lease_s": lease_s}
        now = time.monotonic()
        self.clock = M.LeaseClock(now, now, now)


def receiver(world, capacity: int) -> Receiver:
    _, plans, _, dgeom = world
    copier = Copier(dgeom.storage, dgeom.pages, torch.zeros(capacity, dtype=torch.uint8), "decode", "torch")
    return Receiver(dgeom, plans, LeasedPool(capacity), copier, timeout_s=2.0)


def test_receive_slots_all_or_none_and_announcements_checked(world):
    """A 1 -> 2 request's receive on decode rank 0: slots for every unit or none (the limit on both sides);
    its source's `ready` accepted only when it names every unit of this rank's own chunk at its planned size,
    inside the source's staging, for the same blocks; the fence is the lease's end less a quarter of it."""
    _, _, pgeom, dgeom = world
    probe = receiver(world, 1 << 24)
    recv = probe.open("r1", None, "e", 1, blocks(dgeom, 2), blocks(pgeom, 1))
    need = sum(recv.units[0])
    for cap, fits in ((need, True), (need - 1, False)):
        rx = receiver(world, cap)
        recv = rx.open("r1", None, "e", 1, blocks(dgeom, 2), blocks(pgeom, 1))
        if fits:
            rx.alloc("r1", recv)
            assert [s.nbytes for s in recv.slots[0]] == recv.units[0]
        else:
            with pytest.raises(RuntimeError, match=r"receive staging full: request r1 needs .*hybrid_kv_staging_bytes"):
                rx.alloc("r1", recv)
            assert rx.pool.live == 0 and not recv.slots
    # 2 -> 1: two sources, the second one's slots do not fit: the first one's are freed too
    _, plans, pgeom_, _ = world
    one = Receiver(pgeom_, plans, LeasedPool(1 << 24), probe.copier, timeout_s=2.0)
    two = one.open("r2", None, "e", 2, blocks(pgeom_, 2), blocks(dgeom, 1))
    one.pool = LeasedPool(sum(two.units[0]) + sum(two.units[1]) - 1)
    with pytest.raises(RuntimeError, match="receive staging full: request r2 needs"):
        one.alloc("r2", two)
    assert one.pool.live == 0 and not two.slots
    sizes, link = recv.units[0], Link(1 << 24)
    until = time.monotonic() + 40.0
    good = M.ready("r", [(u, 4096 * u, n) for u, n in enumerate(sizes)], until, blocks(pgeom, 1))
    assert rx.check_ready(recv, 0, good, link) == [(u, 4096 * u, n) for u, n in enumerate(sizes)]
    assert recv.read_by[0] == pytest.approx(until - 10.0)
    bad = [
        (M.ready("r", [(0, 0, sizes[0] + 1)], until, blocks(pgeom, 1)), "size"),
        (M.ready("r", [(0, 0, sizes[0])], until, blocks(pgeom, 1)), "units"),
        (M.ready("r", [(u, 4096 * u, n) for u, n in enumerate(sizes)], until, blocks(pgeom, 3)), "blocks"),
        (M.ready("r", [(u, (1 << 24) - n + 1, n) for u, n in enumerate(sizes)], until, blocks(pgeom, 1)), "staging"),
    ]
    if len(sizes) == 1:
        bad.pop(1)  # (one unit: "every unit" is the first case)
    for msg, _what in bad:
        with pytest.raises(ValueError):
            rx.check_ready(recv, 0, msg, link)
    # pushed unasked: used only if its lease leaves the whole wait for the READ (2 x the timeout) ...
    assert rx.fresh(recv, 0, good, link)
    assert not rx.fresh(recv, 0, {**good, "until": time.monotonic() + 3.9}, link)
    assert not rx.fresh(recv, 0, {**good, "blocks": [[g, [3]] for g in pgeom.groups]}, link)


def test_scatter_refused_is_returned_and_completed_ones_reported(world, monkeypatch):
    _, _, pgeom, dgeom = world
    rx = receiver(world, 1 << 24)
    for r, b in (("a", 1), ("b", 2)):
        rx.alloc(r, rx.open(r, None, "e", 1, blocks(dgeom, b), blocks(pgeom, b)))
    assert rx.scatter([]) == [] and rx.scattered() == []
    assert rx.scatter(["a", "b"]) == [] and rx.in_scatter("a")
    assert sorted(rx.scattered()) == ["a", "b"] and not rx.in_scatter("a")  # torch: complete on return
    real = rx.copier.run

    def refuse_b(jobs, *a, **k):
        if any(c is rx.recvs["b"].chunks[0] for c, _ in jobs):
            raise ValueError("bad request b")
        return real(jobs, *a, **k)

    monkeypatch.setattr(rx.copier, "run", refuse_b)
    assert rx.scatter(["a", "b"]) == ["b"]  # the batch refused, then one by one: only b fails
    assert rx.scattered() == ["a"]


def test_streamed_units_checked_once_slotted_one_by_one_and_scattered(world):
    """Streaming (the CLI transport): a source may announce a request's units over several `ready`s; each
    unit once (a second announcement of it is refused, naming it); a slot per unit, None while the pool has
    no room for it (the limit on both sides); the landed units scattered in one launch and their slots freed."""
    _, _, pgeom, dgeom = world
    probe = receiver(world, 1 << 24)
    sizes = probe.open("r", None, "e", 1, blocks(dgeom, 2), blocks(pgeom, 1)).units[0]
    assert len(sizes) > 1, "the chunk must have several units"
    rx = receiver(world, sizes[0])
    recv = rx.open("r", None, "e", 1, blocks(dgeom, 2), blocks(pgeom, 1))
    link, until = Link(1 << 24), time.monotonic() + 40.0
    first = M.ready("r", [(0, 0, sizes[0])], until, {})
    units, read_by = rx.check_units(recv, 0, first, 1 << 24, link.clock, 40.0)
    assert units == [(0, 0, sizes[0])] and read_by == pytest.approx(until - 10.0)
    with pytest.raises(ValueError, match=r"prefill rank 0 announced units \[0\] again"):
        rx.check_units(recv, 0, M.ready("r", [(0, 0, sizes[0]), (1, 0, sizes[1])], until, {}), 1 << 24, link.clock, 40)
    assert rx.check_units(recv, 0, M.ready("r", [(1, 0, sizes[1])], until, {}), 1 << 24, link.clock, 40.0)[0]
    assert rx.alloc_unit("r", recv, 0, 0).nbytes == sizes[0]
    assert rx.alloc_unit("r", recv, 0, 1) is None  # the pool holds exactly unit 0
    rx.scatter_units([("r", 0, 0)]).wait()
    rx.free_unit(recv, 0, 0)
    assert rx.pool.live == 0 and rx.alloc_unit("r", recv, 0, 1) is not None
    rx.drop("r")
    assert rx.pool.live == 0 and "r" not in rx.recvs
