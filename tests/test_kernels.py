"""The Triton segment-copy kernel against the oracle (under TRITON_INTERPRET=1 on CPU, natively on CUDA),
plus table-level checks: poisoned staging, nothing outside the write set changed, bad tables refused
before any write."""

import numpy as np
import pytest
import torch
from bytecheck import assert_same_bytes
from hybrid_kv.kernels.segment_copy import TILE_BYTES, expand_tiles

from hybrid_kv import ops
from hybrid_kv.plan import TransferPlan
from hybrid_kv.spec_hf import load_spec
from hybrid_kv.testing.harness import Harness

DEVICES = [pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=pytest.mark.cuda)]

# One case per family, integer and non-integer ratios, both conv layouts; few layers at real dims.
CASES = [
    pytest.param("qwen3.5-0.8b", 1, 2, "DS", id="gdn-P1-D2-DS"),
    pytest.param("qwen3.5-0.8b", 4, 2, "SD", id="gdn-P4-D2-SD"),
    pytest.param("nemotron-h-8b", 2, 4, "SD", id="mamba2-P2-D4-SD"),
    pytest.param("falcon-h1-0.5b", 1, 2, "DS", id="mamba2-ng1-P1-D2-DS"),
    pytest.param("falcon-h1-0.5b", 2, 1, "SD", id="mamba2-ng1-P2-D1-SD"),
    pytest.param("jamba-v0.1", 2, 4, "DS", id="mamba1-P2-D4-DS"),
    pytest.param("jamba-v0.1", 8, 2, "SD", id="mamba1-P8-D2-SD"),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name,p,d,conv_layout", CASES)
def test_triton_oracle(name, p, d, conv_layout, device):
    spec = load_spec(name).truncated(1, 1)
    plan = TransferPlan.build(spec, p, d, 50, conv_layout=conv_layout)
    h = Harness(plan, [50, 1], seed=p * 7 + d, device=device)
    h.run_packed(backend="triton")
    assert h.mismatches() == []


@pytest.mark.parametrize("device", DEVICES)
def test_triton_non_integer_ratio_random_ids(device):
    """2 -> 3 on a spec that shards by 6 (Mamba2 with replicated B/C, replicated KV heads)."""
    from hybrid_kv.spec import AttentionDims, CacheLayer, LayerKind, ModelSpec, StateDims

    st = StateDims(
        LayerKind.MAMBA2,
        4,
        heads=12,
        head_shape=(8, 16),
        groups=1,
        group_channels=16,
        conv_dtype="bfloat16",
        ssm_dtype="float32",
    )
    layers = tuple(CacheLayer(i, f"l{i}", i, k) for i, k in enumerate([LayerKind.MAMBA2, LayerKind.ATTENTION] * 2))
    spec = ModelSpec("r", "R", layers, st, AttentionDims(1, 64))
    for p, d in ((2, 3), (3, 2)):
        for conv in ("DS", "SD"):
            plan = TransferPlan.build(spec, p, d, 40, conv_layout=conv, decode_block_size=32)
            h = Harness(plan, [40, 7, 100], seed=d, device=device, spare_blocks=5)
            h.run_packed(backend="triton")
            assert h.mismatches() == []


@pytest.mark.parametrize("device", DEVICES)
def test_triton_strided_mode_and_empty(device):
    plan = TransferPlan.build(load_spec("falcon-h1-0.5b").truncated(1, 1), 2, 4, 10)
    h = Harness(plan, [10], device=device)
    h.run_strided(backend="triton")
    assert h.mismatches() == []
    h = Harness(plan, [], device=device)
    before = [c.clone() for c in h.decode_caches]
    h.run_packed(backend="triton")
    assert all(torch.equal(a, b) for a, b in zip(before, h.decode_caches))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("offset", [0, 1, 2, 3, 16])
def test_alignment_and_write_set(device, offset):
    """Odd offsets and lengths (byte path), aligned ones (wide path), a row longer than a tile."""
    g = np.random.default_rng(offset)
    src = torch.from_numpy(g.integers(0, 256, 300_000, dtype=np.uint8)).to(device)
    dst = torch.full((200_000,), 0xAB, dtype=torch.uint8, device=device)
    table = np.array(
        [
            [offset, 5, 1, 17, 17, 17],  # tiny
            [1000 + offset, 100, 3, 64 + offset, 96, 80],  # 2-D, different strides
            [5000 + offset, 1000, 1, TILE_BYTES * 2 + 48, 0, 0],  # crosses tiles
            [0, 150_000, 0, 100, 1, 1],  # zero rows: nothing
        ],
        dtype=np.int64,
    )
    want = dst.cpu().clone()
    s = src.cpu()
    for so, do, rows, rb, ss, ds in table.tolist():
        for r in range(rows):
            want[do + r * ds : do + r * ds + rb] = s[so + r * ss : so + r * ss + rb]
    ops.copy_segments(src, dst, table, backend="triton")
    assert_same_bytes(dst.cpu(), want, "destination")


def test_tiles_cover_rows_exactly():
    table = np.array([[0, 0, 2, TILE_BYTES + 1, TILE_BYTES + 8, TILE_BYTES + 16]], dtype=np.int64)
    t = expand_tiles(table)
    assert t.tolist() == [
        [0, 0, TILE_BYTES],
        [TILE_BYTES, TILE_BYTES, 1],
        [TILE_BYTES + 8, TILE_BYTES + 16, TILE_BYTES],
        [2 * TILE_BYTES + 8, 2 * TILE_BYTES + 16, 1],
    ]


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_bad_table_writes_nothing(backend):
    src = torch.arange(100, dtype=torch.uint8)
    dst = torch.zeros(50, dtype=torch.uint8)
    bad = np.array([[0, 0, 1, 10, 10, 10], [0, 45, 1, 10, 10, 10]], dtype=np.int64)
    with pytest.raises(ValueError, match=r"segment 1 writes up to byte 55 of a 50-byte destination"):
        ops.copy_segments(src, dst, bad, backend=backend)
    assert not dst.any()  # the first, valid segment was not applied either
    with pytest.raises(ValueError, match=r"reads up to byte 105 of a 100-byte source"):
        ops.copy_segments(src, dst, np.array([[95, 0, 1, 10, 10, 10]]), backend=backend)
    # a negative stride would write before the destination; 2**62 rows would wrap int64 arithmetic
    with pytest.raises(ValueError, match=r"segment 0: dst_stride=-16 is negative"):
        ops.copy_segments(src, dst, np.array([[0, 32, 2, 16, 16, -16]]), backend=backend)
    with pytest.raises(ValueError, match=r"segment 0 reads up to byte 4611686018427387907 of a 100-byte source"):
        ops.copy_segments(src, dst, np.array([[0, 0, 2**62, 4, 1, 0]]), backend=backend)
    with pytest.raises(ValueError, match=r"segment 0 writes up to byte 1180591620717411303169 of a 50-byte"):
        ops.copy_segments(src, dst, np.array([[0, 0, 2**62, 1, 0, 256]]), backend=backend)
    assert not dst.any()
    with pytest.raises(ValueError, match=r"shape \(n, 6\)"):
        ops.copy_segments(src, dst, np.zeros((2, 5), dtype=np.int64), backend=backend)
    with pytest.raises(ValueError, match=r"not contiguous"):
        ops.copy_segments(src, torch.zeros(10, 10, dtype=torch.uint8)[:, ::2], np.zeros((0, 6)), backend=backend)


def test_backend_selection(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.delenv("HYBRID_KV_BACKEND", raising=False)
    assert ops.resolve_backend(None, cpu) == "torch"
    assert ops.resolve_backend(None, torch.device("cuda")) == "triton"
    monkeypatch.setenv("HYBRID_KV_BACKEND", "triton")
    assert ops.resolve_backend(None, cpu) == "triton"  # TRITON_INTERPRET=1 is set by conftest
    monkeypatch.setenv("HYBRID_KV_BACKEND", "cutlass")
    with pytest.raises(ValueError, match=r"backend 'cutlass' \(from HYBRID_KV_BACKEND\) is not one of"):
        ops.resolve_backend(None, cpu)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match=r"needs TRITON_INTERPRET=1"):
        ops.resolve_backend("triton", cpu)
