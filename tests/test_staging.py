"""The packed-transfer core (`hybrid_kv.staging`) against the oracle: static templates, chunks built from
block ids only, one launch per rank and side; byte-exact decode caches (random background, so every byte
outside the write set is checked too), and every bad input refused before a byte moves."""

import itertools

import numpy as np
import pytest
import torch
from bytecheck import assert_same_bytes
from conftest import preset_cases

from hybrid_kv.harness import Harness
from hybrid_kv.plan import TransferPlan
from hybrid_kv.spec import AttentionDims, CacheLayer, LayerKind, ModelSpec, StateDims
from hybrid_kv.spec_hf import load_spec
from hybrid_kv.staging.chunk import flat_chunk, flat_slots, make_chunk
from hybrid_kv.staging.copier import Copier
from hybrid_kv.staging.pagemap import PageMap
from hybrid_kv.staging.template import PlanCache, Shapes

TP_PAIRS = [(1, 2), (2, 1), (2, 4), (4, 2), (1, 8), (8, 1), (2, 3), (3, 2), (4, 6), (6, 4)]


@pytest.mark.parametrize("name,p,d", list(preset_cases(TP_PAIRS)))
def test_presets_staged_torch(name, p, d):
    """Real dims (2 state + 1 attention layers), both conv layouts, unequal block sizes, mixed lengths."""
    spec = load_spec(name).truncated(2, 1)
    for conv, bs_d in (("DS", 16), ("SD", 32)):
        plan = TransferPlan.build(spec, p, d, 10, conv_layout=conv, decode_block_size=bs_d)
        h = Harness(plan, [37, 1, 500, 16], seed=p * 31 + d)
        h.run_staged(backend="torch")
        assert h.mismatches() == [], conv


def _replicated_spec() -> ModelSpec:
    """Mamba2 with replicated B/C (one group), replicated KV heads: shards by 6, so 2 <-> 3 and 4 <-> 6."""
    st = StateDims(LayerKind.MAMBA2, 4, 12, (8, 16), 1, 16, "bfloat16", "float32")
    kinds = [LayerKind.MAMBA2, LayerKind.ATTENTION, LayerKind.MAMBA2]
    layers = tuple(CacheLayer(i, f"l{i}", i, k) for i, k in enumerate(kinds))
    return ModelSpec("r", "R", layers, st, AttentionDims(1, 64))


@pytest.mark.parametrize("p,d", [(2, 3), (3, 2), (4, 6), (6, 4), (1, 6)])
def test_non_integer_ratios_small_units(p, d):
    """Units of one or two slots: every chunk spans several descriptors and staging slots."""
    plan = TransferPlan.build(_replicated_spec(), p, d, 10, decode_block_size=32)
    h = Harness(plan, [40, 7, 100, 0], seed=d, spare_blocks=5)
    budget = 2 * max(plan.prefill[0].page_bytes, plan.decode[0].page_bytes)
    h.run_staged(backend="torch", max_unit_bytes=budget)
    assert h.mismatches() == []
    st = h.staged("torch", budget)
    assert max(len(c.units) for jobs in st["jobs_d"] for c, _ in jobs) > 1


def test_the_staged_check_can_fail():
    plan = TransferPlan.build(load_spec("falcon-h1-0.5b").truncated(1, 1), 1, 2, 20)
    h = Harness(plan, [20, 20], seed=3)
    assert h.mismatches() != []  # nothing moved: the decode background differs
    h.run_staged(backend="torch")
    assert h.mismatches() == []
    h = Harness(plan, [20, 20], seed=3)
    jobs = h.staged("torch")["jobs_d"][1]
    (c0, o0), (c1, o1) = jobs
    jobs[:] = [(c0, o1), (c1, o0)]  # each request scattered from the other's receive slot
    h.run_staged(backend="torch")
    assert h.mismatches()[0].startswith("decode rank 1:")


def test_plans_keyed_by_tp_pair_not_tokens_and_bounded():
    spec = load_spec("qwen3.5-0.8b").truncated(2, 1)
    cache = PlanCache(spec, "DS", "HND", 64 << 20, max_pairs=4)
    pair = cache.pair(2, 4, 0, 1)
    assert cache.pair(2, 4, 0, 1) is pair  # reused, whatever the request's length
    bs = (16, 16)
    lay = TransferPlan.build(spec, 2, 4, 1).prefill[0]
    bsz = (lay.block_size, lay.block_size)
    a = flat_slots(pair, "prefill", 100, 0, list(range(50)), bsz)
    b = flat_slots(pair, "prefill", 3000, 0, list(range(500)), bsz)
    assert len(b[0]) > len(a[0]) and len(cache) == 1
    for d in range(4):
        for p in range(2):
            cache.pair(2, 4, p, d, bs)
    assert len(cache) == 4  # the memo never grows past its bound


def test_chunk_units_respect_the_budget():
    plan = TransferPlan.build(_replicated_spec(), 2, 3, 10)
    for budget in (4096, 10_000, 1 << 20):
        cache = PlanCache(plan.spec, "DS", "HND", budget)
        pair = cache.pair(2, 3, 0, 0)
        lay = plan.prefill[0]
        tpl, _, _ = flat_slots(pair, "prefill", 300, 1, list(range(40)), (lay.block_size,) * 2)
        c = make_chunk(pair, tpl, np.zeros(len(tpl), dtype=np.int64))
        sizes = c.units[:, 1] - c.units[:, 0]
        assert (sizes <= budget).all() and (sizes > 0).all()
        assert c.units[0, 0] == 0 and (c.units[1:, 0] == c.units[:-1, 1]).all()  # back to back, no gap
        assert c.nbytes == int(pair.strides[tpl].sum())


def test_slot_larger_than_the_unit_budget_is_refused():
    spec = load_spec("nemotron-h-8b").truncated(1, 1)
    with pytest.raises(ValueError, match=r"more than the transfer unit budget max_unit_bytes=4096; use at least"):
        PlanCache(spec, "DS", "HND", 4096).pair(1, 2, 0, 0)


def _one_copier(backend="torch"):
    spec = load_spec("falcon-h1-0.5b").truncated(1, 1)
    lay = TransferPlan.build(spec, 1, 2, 10).prefill[0]
    pages = PageMap.flat(len(spec.layers), 4, lay.page_bytes)
    cache = torch.zeros(pages.storage_bytes, dtype=torch.uint8)
    pair = PlanCache(spec, "DS", "HND", 64 << 20).pair(1, 2, 0, 1)
    staging = torch.zeros(1 << 20, dtype=torch.uint8)
    return Copier(cache, pages, staging, "prefill", backend), pair, pages, cache, staging, lay


def test_bad_block_ids_and_staging_ranges_are_refused_before_any_write():
    copier, pair, pages, cache, staging, lay = _one_copier()
    bs = (lay.block_size, lay.block_size)
    shapes = Shapes()
    with pytest.raises(ValueError, match=r"prefill block id 4 out of range \[0, 4\)"):
        flat_chunk(shapes, pair, pages, "prefill", 10, 4, [0], bs)
    with pytest.raises(ValueError, match=r"prefill block id -1 out of range"):
        flat_chunk(shapes, pair, pages, "prefill", 10, 0, [-1], bs)
    with pytest.raises(ValueError, match=rf"1 kv block ids for {2 * lay.block_size + 1} tokens \(need 3\)"):
        flat_chunk(shapes, pair, pages, "prefill", 2 * lay.block_size + 1, 0, [0], bs)
    cache.copy_(torch.randint(0, 256, cache.shape, dtype=torch.uint8))
    chunk = flat_chunk(shapes, pair, pages, "prefill", 10, 1, [2], bs)
    before = staging.clone()
    for offs in ([staging.numel() - 16], [-16]):
        with pytest.raises(ValueError, match=r"outside the 1048576-byte staging buffer"):
            copier.run([(chunk, offs)])
    with pytest.raises(ValueError, match=r"2 unit offsets for a chunk of 1 units"):
        copier.run([(chunk, [0, 64])])
    assert_same_bytes(staging, before, "staging after refused runs")
    copier.run([(chunk, [0])]).wait()
    assert not torch.equal(staging, before)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_pack_on_another_thread_waits_for_the_step_that_wrote_the_pages(backend):
    """The model step writes the pages on the engine's stream (here: after a 0.2 s device sleep); a pack on
    another thread, whose current stream is not that one, must see the final bytes when given the step's
    event (without it, the copy reads the pages before the step wrote them)."""
    from concurrent.futures import ThreadPoolExecutor

    _, pair, pages, cache, staging, lay = _one_copier()
    cache, staging = cache.cuda(), staging.cuda()
    copier = Copier(cache, pages, staging, "prefill", backend)
    chunk = flat_chunk(Shapes(), pair, pages, "prefill", 10, 1, [2], (lay.block_size, lay.block_size))
    engine = torch.cuda.Stream()
    with torch.cuda.stream(engine):
        torch.cuda._sleep(200_000_000)
        cache.fill_(7)
        step = torch.cuda.Event()
        step.record(engine)
    with ThreadPoolExecutor(1) as pool:
        pool.submit(lambda: copier.run([(chunk, [0])], after=[step]).wait()).result()
    torch.cuda.synchronize()
    staged = staging[: int(chunk.unit_bytes[0])]
    assert_same_bytes(staged, torch.full_like(staged, 7), "the pack read the pages before the step that wrote them")


def test_page_map_checks_the_buffer_once():
    with pytest.raises(ValueError, match=r"layer 1's last page ends at byte 4096 of a 4000-byte buffer"):
        PageMap.of_views([(0, 1024), (1024, 1024)], 1024, 3, 4000)
    with pytest.raises(ValueError, match=r"block stride shorter than the page"):
        PageMap.of_views([(0, 512)], 1024, 3, 4096)
    _, _, pages, cache, staging, _ = _one_copier()
    with pytest.raises(ValueError, match=r"page map spans"):
        Copier(cache[:100], pages, staging, "prefill", "torch")


@pytest.mark.parametrize("p,d", list(itertools.product((1, 2, 3), repeat=2)))
def test_both_sides_agree_on_the_layout(p, d):
    """A decode rank rebuilds the prefill rank's chunk from its own block ids (other ids, other block
    size): same templates, stage offsets and units; only the page offsets differ."""
    plan = TransferPlan.build(_replicated_spec(), p, d, 10, decode_block_size=32)
    cache = PlanCache(plan.spec, "DS", "HND", 8192)
    bs = (plan.prefill[0].block_size, plan.decode[0].block_size)
    for dd, sources in cache.sources(p, d, (16, 32)).items():
        for pp in sources:
            pair = cache.pair(p, d, pp, dd, (16, 32))
            for tokens in (1, 77, 300):
                kp = list(range(100, 100 + plan.for_tokens(tokens).num_kv_blocks("prefill")))
                kd = list(range(plan.for_tokens(tokens).num_kv_blocks("decode")))[::-1]
                a = make_chunk(pair, *flat_slots(pair, "prefill", tokens, 7, kp, bs)[:1], np.zeros(0))
                b = make_chunk(pair, *flat_slots(pair, "decode", tokens, 3, kd, bs)[:1], np.zeros(0))
                assert np.array_equal(a.tpl, b.tpl) and np.array_equal(a.stage, b.stage)
                assert np.array_equal(a.units, b.units) and np.array_equal(a.unit_of, b.unit_of)


@pytest.mark.parametrize("threshold", [0, 600, 1 << 40])
@pytest.mark.parametrize("p,d", [(1, 2), (2, 3), (4, 2)])
def test_direct_runs_and_auto_split(p, d, threshold):
    """threshold 0: every run read page to page (strided); 600: small runs packed, large ones direct
    (auto); huge: everything packed. Byte-exact in each case."""
    plan = TransferPlan.build(_replicated_spec(), p, d, 10, decode_block_size=32, conv_layout="SD")
    h = Harness(plan, [40, 7, 100], seed=p + d)
    h.run_staged(backend="torch", threshold=threshold)
    assert h.mismatches() == []
    st = h.staged("torch", None, threshold)
    n_direct = sum(len(r) for _, _, r in st["direct"])
    n_units = len(st["moves"])
    if threshold == 0:
        assert n_units == 0 and n_direct == plan.for_tokens(40).strided_descriptors() + sum(
            plan.for_tokens(t).strided_descriptors() for t in (7, 100)
        )
    elif threshold == 1 << 40:
        assert n_direct == 0
    else:
        assert n_direct and n_units


def test_leased_pool_all_or_none_and_expiry():
    from hybrid_kv.staging.pool import LeasedPool

    pool = LeasedPool(1024)
    assert pool.alloc_all([("a", 0), ("a", 1)], [512, 512], until=10.0) is not None
    assert pool.alloc_all([("b", 0), ("b", 1)], [16, 16]) is None  # full: nothing of b is held
    assert pool.held(("b", 0)) is None and pool.in_use == 1024
    assert pool.expire(now=9.0) == 0 and pool.live == 2  # leases not over yet
    assert pool.expire(now=11.0) == 2 and pool.live == 0 and pool.in_use == 0  # expiry frees the bytes
    got = pool.alloc_all([("c", 0)], [1024])
    assert got is not None and got[0].offset == 0  # the freed ranges coalesced back into one
    assert pool.release(("c", 0)) and not pool.release(("c", 0))  # a second release is a no-op
    pool.alloc_all([("d", 0)], [100], until=1.0)
    pool.free(("d", 0))
    assert pool.expire(now=5.0) == 0  # freeing drops the lease too


def test_alloc_all_rolls_back_a_partial_allocation():
    """Bug caught: `alloc_all` returning None without freeing the slots it already took (the first slot fits,
    the second does not). Also: a later key `alloc` refuses (already held, larger than the pool) frees what
    the call took before raising; the capacity limit on each side (a set of exactly 1024 bytes fits)."""
    from hybrid_kv.staging.pool import LeasedPool

    pool = LeasedPool(1024)
    assert pool.alloc_all([("a", 0), ("a", 1)], [512, 1024]) is None  # 512 fits, then 1024 cannot
    assert (pool.live, pool.in_use, pool.held(("a", 0))) == (0, 0, None)
    got = pool.alloc_all([("b", 0), ("b", 1)], [512, 512])  # exactly the capacity: fits
    assert got is not None and pool.in_use == 1024
    pool.free_where(lambda k: k[0] == "b")
    assert pool.alloc_all([("c", 0), ("c", 1)], [512, 513]) is None and pool.in_use == 0  # 16 B over (aligned)
    pool.alloc_all([("held", 0)], [16])
    with pytest.raises(ValueError, match=r"staging slot \('held', 0\) is already held"):
        pool.alloc_all([("d", 0), ("held", 0)], [16, 16])
    with pytest.raises(ValueError, match="can never fit the 1024-byte staging pool"):
        pool.alloc_all([("e", 0), ("e", 1)], [16, 1025])
    with pytest.raises(ValueError, match="2 keys but 1 sizes"):
        pool.alloc_all([("f", 0), ("f", 1)], [16])
    assert (pool.live, pool.in_use) == (1, 16), "a refused call left slots held"
    assert pool.alloc_all([("g", 0)], [1024 - 16]) is not None  # and the freed ranges coalesced


def test_packing_pays_hand_built():
    """The shared auto formula on hand-computed numbers: 10 descriptors x 1 µs saved against two copies of
    1000 B at 1 GB/s (1 µs each) at load 1, 5 and 4 (with one 2 µs round trip)."""
    from hybrid_kv.staging.cost import packing_pays

    cost = {"desc_cost_us": 1.0, "copy_gbps": 1.0, "rtt_us": 2.0}
    assert packing_pays(10, 1000, cost, 1)  # 10 > 2
    assert not packing_pays(10, 1000, cost, 5)  # 10 == 10: not more
    assert packing_pays(10, 1000, cost, 4)  # 10 > 8
    assert not packing_pays(10, 1000, cost, 4, round_trips=1)  # 10 == 8 + 2: not more
    assert not packing_pays(0, 0, cost, 1)  # nothing saved
