"""Plans against vLLM's worked examples (reference §3.4), write-set coverage, descriptor counts, errors."""

import itertools
from itertools import pairwise

import pytest
from conftest import PRESETS, fits

from hybrid_kv.harness import Harness
from hybrid_kv.layout import Shard, cdiv
from hybrid_kv.plan import PackedLayout, TransferPlan, assign_sources, split_piece
from hybrid_kv.spec_hf import load_spec


def reads(plan, d, layer):
    return [
        (p.src_rank, p.component, p.src.offset, p.dst.offset, p.nbytes)
        for p in plan.pieces
        if p.dst_rank == d and p.layer == layer
    ]


def first(spec, kind):
    return next(layer.index for layer in spec.layers if layer.kind.value == kind)


@pytest.mark.parametrize("r", range(4))
def test_nemotron_h_8b_2_to_4(r):
    spec = load_spec("nemotron-h-8b")
    plan = TransferPlan.build(spec, 2, 4, 1040)
    lo, src = r % 2, r // 2
    assert reads(plan, r, first(spec, "mamba2")) == [
        (src, "conv.x", lo * 12288, 0, 12288),
        (src, "conv.B", 24576 + lo * 1536, 12288, 1536),
        (src, "conv.C", 27648 + lo * 1536, 13824, 1536),
        (src, "ssm", 30720 + lo * 1_048_576, 15360, 1_048_576),
    ]
    assert reads(plan, r, first(spec, "attention")) == [(src, "kv", lo * 1_064_960, 0, 1_064_960)]


@pytest.mark.parametrize("r", range(2))
def test_nemotron_h_8b_4_to_2(r):
    spec = load_spec("nemotron-h-8b")
    plan = TransferPlan.build(spec, 4, 2, 1040)
    got = sorted(reads(plan, r, first(spec, "mamba2")), key=lambda x: (x[1], x[0]))
    want = []
    for p in range(2):
        want += [
            (2 * r + p, "conv.x", 0, p * 12288, 12288),
            (2 * r + p, "conv.B", 12288, 24576 + p * 1536, 1536),
            (2 * r + p, "conv.C", 13824, 27648 + p * 1536, 1536),
            (2 * r + p, "ssm", 15360, 30720 + p * 1_048_576, 1_048_576),
        ]
    assert got == sorted(want, key=lambda x: (x[1], x[0]))
    assert sorted(reads(plan, r, first(spec, "attention"))) == [
        (2 * r + p, "kv", 0, p * 1_064_960, 1_064_960) for p in range(2)
    ]
    assert plan.sources_of(r) == [2 * r, 2 * r + 1]


@pytest.mark.parametrize("r", range(8))
def test_qwen35_27b_1_to_8(r):
    spec = load_spec("qwen3.5-27b")
    plan = TransferPlan.build(spec, 1, 8, 1024, prefill_block_size=1024, decode_block_size=1024)
    assert reads(plan, r, first(spec, "gdn")) == [
        (0, "conv.q", 1536 * r, 0, 1536),
        (0, "conv.k", 12288 + 1536 * r, 1536, 1536),
        (0, "conv.v", 24576 + 4608 * r, 3072, 4608),
        (0, "ssm", 61440 + 393216 * r, 7680, 393216),
    ]
    assert reads(plan, r, first(spec, "attention")) == [(0, "kv", (r // 2) * 1_048_576, 0, 1_048_576)]


def test_replicated_bc_read_from_the_right_bytes():
    """The stock 3-read path reads SSM bytes here (reference §4); the plan reads P's real B and C."""
    spec = load_spec("falcon-h1-0.5b")  # x 1536 ch, B = C = 128 ch (n_groups 1), rows 3, bf16
    plan = TransferPlan.build(spec, 1, 2, 800)
    for r in range(2):
        got = reads(plan, r, 0)
        assert got[:3] == [
            (0, "conv.x", r * 768 * 6, 0, 768 * 6),
            (0, "conv.B", 1536 * 6, 768 * 6, 128 * 6),
            (0, "conv.C", 1664 * 6, 896 * 6, 128 * 6),
        ]
    # 2 -> 1: B and C come from one prefill rank only, never twice.
    back = TransferPlan.build(spec, 2, 1, 800)
    comps = [(p.src_rank, p.component) for p in back.pieces if p.layer == 0]
    assert comps.count((0, "conv.B")) + comps.count((1, "conv.B")) == 1


def test_replicated_reads_spread_and_stay_local():
    # 4 kv heads: P TP 8 -> D TP 8 (each head held by 2 P ranks): every D rank reads its own P rank.
    spec = load_spec("qwen3.5-27b")
    plan = TransferPlan.build(spec, 8, 8, 400)
    assert {(p.src_rank, p.dst_rank) for p in plan.pieces} == {(r, r) for r in range(8)}
    # n_groups 1, P TP 2 -> D TP 4: D rank 2 takes B/C from P1, which it reads x from anyway.
    f = TransferPlan.build(load_spec("falcon-h1-0.5b"), 2, 4, 800)
    assert f.sources_of(2) == [1] and f.sources_of(1) == [0]
    # candidates outside the preferred set are spread by destination rank
    assert assign_sources(Shard(0, 1, True), [Shard(0, 1, True)] * 4, [], 3) == [(3, 0, 1)]


def test_descriptor_counts_qwen_1_to_8():
    spec = load_spec("qwen3.5-27b")
    for tokens in (512, 8192):
        plan = TransferPlan.build(spec, 1, 8, tokens, prefill_block_size=1024, decode_block_size=1024)
        per_rank = 48 * 4 + 16 * cdiv(tokens, 1024)
        assert plan.strided_descriptors() == 8 * per_rank
        # by hand (reads of test_qwen35_27b_1_to_8): each decode rank takes 48 GDN states of
        # 1536 + 1536 + 4608 + 393216 B and 16 KV layers of 1 MiB a 1024-token block; units of 64 MiB
        staged = 48 * (1536 + 1536 + 4608 + 393216) + 16 * cdiv(tokens, 1024) * (1 << 20)
        assert plan.staging[(0, 0)].nbytes == staged == {512: 36_020_224, 8192: 153_460_736}[tokens]
        assert plan.packed_descriptors() == 8 * {512: 1, 8192: 3}[tokens]
        assert plan.strided_descriptors() >= 50 * plan.packed_descriptors()


def _intervals(region, base=0):
    return [
        (base + region.offset + i * region.stride, base + region.offset + i * region.stride + region.row_bytes)
        for i in range(region.rows)
    ]


PAIRS = [(p, d) for p, d in itertools.product((1, 2, 4, 8), repeat=2)]


@pytest.mark.parametrize("name", PRESETS)
@pytest.mark.parametrize("conv_layout", ["DS", "SD"])
def test_write_set_is_exact(name, conv_layout):
    """Every decode state byte [0, state_bytes) written exactly once, no source byte from the padding,
    attention written exactly for its heads x copied tokens."""
    spec = load_spec(name).truncated(2, 1)
    for p, d in PAIRS:
        if not (fits(spec, p) and fits(spec, d)):
            continue
        plan = TransferPlan.build(spec, p, d, 1000, conv_layout=conv_layout)
        for r, dec in enumerate(plan.decode):
            for layer in spec.layers:
                pcs = [x for x in plan.pieces if x.dst_rank == r and x.layer == layer.index]
                dst = sorted(iv for x in pcs for iv in _intervals(x.dst, x.dst_block * dec.page_bytes))
                assert all(a[1] <= b[0] for a, b in pairwise(dst)), "overlapping writes"
                total = sum(b - a for a, b in dst)
                if layer.kind.is_state:
                    assert (dst[0][0], dst[-1][1], total) == (0, dec.state_bytes, dec.state_bytes)
                    for x in pcs:
                        assert all(b <= plan.prefill[x.src_rank].state_bytes for _, b in _intervals(x.src))
                else:
                    assert total == dec.kv_heads_local * plan.copied_tokens * dec.kv_token_head_bytes
        assert _applied(plan) == [], (p, d)  # and from the right source bytes


def _applied(plan) -> list[str]:
    """Copy exactly the plan's pieces, row by row, from oracle-filled prefill caches into random decode
    caches: what differs from the oracle's decode caches (a piece read from the wrong source bytes, or a
    byte outside the write set written)."""
    h = Harness(plan, [plan.tokens], seed=3, spare_blocks=1)
    gp, gd = h.batch.prefill_geom, h.batch.decode_geom
    pb, db = h.batch.prefill_blocks[0], h.batch.decode_blocks[0]
    state = {x.index for x in plan.spec.layers if x.kind.is_state}
    for x in plan.pieces:
        kv = x.layer not in state
        s0 = gp.block_offset(x.layer, pb.kv[x.src_block] if kv else pb.state)
        d0 = gd.block_offset(x.layer, db.kv[x.dst_block] if kv else db.state)
        src, dst = h.prefill_caches[x.src_rank], h.decode_caches[x.dst_rank]
        for a, b in zip(_intervals(x.src, s0), _intervals(x.dst, d0)):
            dst[b[0] : b[1]] = src[a[0] : a[1]]
    return h.mismatches()


def test_mismatch_refused():
    spec = load_spec("nemotron-h-8b")
    other = spec.with_dtypes(ssm_dtype="bfloat16")
    pre = TransferPlan.build(spec, 2, 2, 16).prefill
    dec = TransferPlan.build(other, 2, 2, 16).decode
    with pytest.raises(ValueError, match=r"state.ssm_dtype: prefill 'float32' vs decode 'bfloat16'"):
        TransferPlan(pre, dec, 16)
    sd = TransferPlan.build(spec, 2, 2, 16, conv_layout="SD").decode
    with pytest.raises(ValueError, match=r"conv_layout: prefill 'DS' vs decode 'SD'"):
        TransferPlan(pre, sd, 16)
    q = TransferPlan.build(load_spec("qwen3.5-0.8b"), 2, 2, 16).decode
    with pytest.raises(ValueError, match=r"architecture: prefill 'NemotronHForCausalLM' vs decode"):
        TransferPlan(pre, q, 16)
    with pytest.raises(ValueError, match=r"decode_tp=0 must be a positive integer"):
        TransferPlan.build(spec, 2, 0, 16)
    with pytest.raises(ValueError, match=r"tokens=-1 must be >= 0"):
        TransferPlan.build(spec, 2, 2, -1)


def test_different_block_sizes():
    # Qwen3.5-27B TP1 (784-token blocks) -> TP8 (400): vLLM refuses; the plan cuts at both boundaries.
    spec = load_spec("qwen3.5-27b").truncated(1, 1)
    plan = TransferPlan.build(spec, 1, 8, 1000)
    assert (plan.prefill[0].block_size, plan.decode[0].block_size, plan.copied_tokens) == (784, 400, 1200)
    kv = [(x.src_block, x.dst_block) for x in plan.pieces if x.dst_rank == 0 and x.component == "kv"]
    assert kv == [(0, 0), (0, 1), (1, 1), (1, 2)]  # cuts at 400, 784, 800


def test_units_respect_budget():
    spec = load_spec("qwen3.5-27b").truncated(3, 2)
    plan = TransferPlan.build(spec, 1, 1, 3000, max_unit_bytes=1 << 20)
    lay = plan.staging[(0, 0)]
    assert all(b - a <= 1 << 20 for a, b in lay.units)
    # by hand: 3 GDN layers at TP 1 (conv q|k|v 12288 + 12288 + 36864 B, SSM 8 x 393216 B) and 2 KV
    # layers of 4 blocks of 784 tokens x 4096 B (3000 tokens open 4 blocks)
    assert sum(x.nbytes for x in lay.pieces) == 3 * (61_440 + 3_145_728) + 2 * 4 * 784 * 4096 == 35_311_616
    # units: per GDN layer one for conv q|k|v and three 1 MiB SSM parts; per KV block (3 MiB + 64 KiB)
    # four, as a unit never takes the head of a piece it cannot hold whole: 3 * 4 + 2 * 4 * 4
    assert len(lay.units) == plan.packed_descriptors() == 44
    # the units tile the staging bytes in order
    assert lay.units[0][0] == 0 and lay.units[-1][1] == lay.nbytes
    assert all(a[1] <= b[0] for a, b in zip(lay.units, lay.units[1:]))
    big = next(x for x in plan.pieces if x.component == "ssm")
    parts = split_piece(big, 100_000)
    assert sum(x.nbytes for x in parts) == big.nbytes and max(x.nbytes for x in parts) <= 100_000
    assert PackedLayout.of([big], 1 << 30).units == ((0, big.nbytes),)


def test_split_by_run_size():
    plan = TransferPlan.build(load_spec("qwen3.5-27b").truncated(2, 1), 2, 4, 1000, conv_layout="SD")
    # by hand, at decode TP 4 (SD: one run per conv row and component): conv.q and conv.k rows of
    # 512 ch x 2 B = 1024 B, conv.v 1536 ch x 2 B = 3072 B; SSM and KV runs are hundreds of KiB
    small = {0: set(), 2000: {"conv.q", "conv.k"}, 10_000: {"conv.q", "conv.k", "conv.v"}}
    small[1 << 30] = {"conv.q", "conv.k", "conv.v", "ssm", "kv"}
    for th, want in small.items():
        packed, direct = plan.split(th)
        for pair, ps in plan.pairs.items():
            a, b = packed[pair].pieces, direct[pair].pieces
            assert sorted(map(id, a + b)) == sorted(map(id, ps))  # a partition of the pair's pieces
            assert {x.component for x in a} == want and not want & {x.component for x in b}
    assert {k: v.units for k, v in plan.split(None)[0].items()} == {k: v.units for k, v in plan.staging.items()}
