"""The DESIGN.md oracle: global tensors sharded into prefill pages and, separately, into expected decode
pages; plan + pack + move + unpack (and the strided baseline) must reproduce the decode caches byte for
byte, every byte outside the write set included (decode caches start as random bytes)."""

import itertools
import math

import pytest
import torch
from conftest import preset_cases
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hybrid_kv.harness import Harness
from hybrid_kv.plan import TransferPlan
from hybrid_kv.spec import AttentionDims, CacheLayer, LayerKind, ModelSpec, StateDims
from hybrid_kv.spec_hf import load_spec

BACKEND = "torch"

TP_PAIRS = list(itertools.product((1, 2, 4, 8), repeat=2)) + [(2, 3), (3, 2), (4, 6), (6, 4)]


@pytest.mark.parametrize("name,p,d", list(preset_cases(TP_PAIRS)))
def test_presets_all_tp_pairs(name, p, d):
    """Real dims (fewer layers): both conv layouts, packed and strided, 3 requests of odd lengths."""
    spec = load_spec(name).truncated(2, 1)
    for conv_layout, mode in (("DS", "packed"), ("SD", "strided"), ("SD", "packed"), ("DS", "strided")):
        if (p * d) % 2 and mode == "strided":
            continue
        plan = TransferPlan.build(spec, p, d, 37, conv_layout=conv_layout)
        h = Harness(plan, [37, 1, 500], seed=p * 31 + d)
        getattr(h, f"run_{mode}")(backend=BACKEND)
        assert h.mismatches() == [], f"{conv_layout} {mode}"


def test_the_check_can_fail():
    plan = TransferPlan.build(load_spec("falcon-h1-0.5b").truncated(1, 1), 1, 2, 20)
    h = Harness(plan, [20], seed=3)
    assert h.mismatches() != []  # nothing moved yet: the random decode background differs
    h.run_packed(backend=BACKEND)
    assert h.mismatches() == []
    h.decode_caches[1][h.batch.decode_geom.page_bytes * 3 + 7] ^= 1
    assert h.mismatches()[0].startswith("decode rank 1: 1 bytes differ")


def test_whole_model_one_request():
    """All 64 layers of Qwen3.5-27B, P TP 2 -> D TP 4, one request."""
    plan = TransferPlan.build(load_spec("qwen3.5-27b"), 2, 4, 700)
    h = Harness(plan, [700], spare_blocks=1)
    h.run_packed(backend=BACKEND)
    assert h.mismatches() == []


def test_empty_batch_and_nhd():
    plan = TransferPlan.build(load_spec("jamba-v0.1").truncated(2, 2), 2, 1, 100, kv_layout="NHD")
    h = Harness(plan, [], spare_blocks=3)
    before = [c.clone() for c in h.decode_caches]
    h.run_packed(backend=BACKEND)
    assert all(torch.equal(a, b) for a, b in zip(before, h.decode_caches))
    h = Harness(plan, [100, 3], seed=5)
    h.run_packed(backend=BACKEND)
    assert h.mismatches() == []


# ---- random specs (hypothesis) ------------------------------------------------------------------------------

DTYPES = st.sampled_from(["bfloat16", "float32", "float16"])


@st.composite
def random_case(draw):
    p, d = draw(st.sampled_from([(1, 2), (2, 1), (2, 3), (3, 2), (4, 6), (6, 4), (2, 2), (1, 4), (4, 1), (3, 6)]))
    m = math.lcm(p, d)
    kind = draw(st.sampled_from([LayerKind.MAMBA2, LayerKind.GDN, LayerKind.MAMBA1]))
    heads = m * draw(st.integers(1, 2))
    if kind is LayerKind.MAMBA2:
        groups = draw(st.sampled_from([1, m]))
        state = StateDims(
            kind,
            draw(st.integers(2, 5)),
            heads,
            (draw(st.integers(1, 5)), draw(st.integers(1, 9))),
            groups,
            draw(st.integers(1, 9)),
            draw(DTYPES),
            draw(DTYPES),
            draw(st.integers(0, 2)),
        )
    elif kind is LayerKind.GDN:
        state = StateDims(
            kind,
            draw(st.integers(2, 5)),
            heads,
            (draw(st.integers(1, 5)), draw(st.integers(1, 5))),
            m,
            draw(st.integers(1, 5)),
            draw(DTYPES),
            draw(DTYPES),
            draw(st.integers(0, 2)),
        )
    else:
        state = StateDims(
            kind,
            draw(st.integers(2, 5)),
            heads,
            (draw(st.integers(1, 9)),),
            conv_dtype=draw(DTYPES),
            ssm_dtype=draw(DTYPES),
        )
    # kv heads: a multiple of both TPs (split), or a divisor of both (replicated where tp > heads)
    g = math.gcd(p, d)
    kv_heads = draw(st.sampled_from(sorted({m, 2 * m} | {k for k in range(1, g + 1) if g % k == 0})))
    attn = AttentionDims(kv_heads, draw(st.integers(1, 8)), draw(DTYPES))
    kinds = draw(st.lists(st.sampled_from([kind, LayerKind.ATTENTION]), min_size=1, max_size=4))
    layers = tuple(CacheLayer(i, f"layers.{i}", i, k) for i, k in enumerate(kinds))
    spec = ModelSpec(
        "random", "Random", layers, state if kind in kinds else None, attn if LayerKind.ATTENTION in kinds else None
    )
    return dict(
        spec=spec,
        p=p,
        d=d,
        conv_layout=draw(st.sampled_from(["DS", "SD"])),
        kv_layout=draw(st.sampled_from(["HND", "NHD"])),
        bs_p=draw(st.sampled_from([1, 16, 32])),
        bs_d=draw(st.sampled_from([1, 16, 48])),
        tokens=draw(st.lists(st.integers(0, 300), min_size=0, max_size=3)),
        unit=draw(st.sampled_from([16, 200, 1 << 20])),
        mode=draw(st.sampled_from(["packed", "strided"])),
        seed=draw(st.integers(0, 1000)),
    )


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(random_case())
def test_random_specs(case):
    c = case
    plan = TransferPlan.build(
        c["spec"],
        c["p"],
        c["d"],
        10,
        conv_layout=c["conv_layout"],
        kv_layout=c["kv_layout"],
        prefill_block_size=c["bs_p"],
        decode_block_size=c["bs_d"],
        max_unit_bytes=c["unit"],
    )
    h = Harness(plan, c["tokens"], seed=c["seed"])
    getattr(h, f"run_{c['mode']}")(backend=BACKEND)
    assert h.mismatches() == []
