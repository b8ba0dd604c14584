"""The slot-copy kernel both shells launch (`hybrid_kv.kernels.slot_copy`, through the staging copier),
under TRITON_INTERPRET=1 on CPU and natively on CUDA: every layout family against the oracle through the
copier, and the kernel alone against its torch reference (`kernels/tiles.copy_reference`) on hand-built
tables of awkward sizes and offsets, with nothing outside the write set changed."""

import subprocess
import sys

import numpy as np
import pytest
import torch
from bytecheck import assert_same_bytes
from hybrid_kv.kernels.tiles import TILE_BYTES, TileTable, copy_reference, cut_tiles, element_size, with_first

from hybrid_kv import ops
from hybrid_kv.harness import Harness
from hybrid_kv.plan import TransferPlan
from hybrid_kv.spec import AttentionDims, CacheLayer, LayerKind, ModelSpec, StateDims
from hybrid_kv.spec_hf import load_spec

DEVICES = [pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=pytest.mark.cuda)]

# Every layout family, integer ratios both ways, both conv layouts; one state and one attention layer at
# real dims, decode blocks of another size than the prefill's.
CASES = [
    pytest.param("qwen3.5-0.8b", 1, 2, "DS", id="gdn-P1-D2-DS"),
    pytest.param("qwen3.5-0.8b", 4, 2, "SD", id="gdn-P4-D2-SD"),
    pytest.param("nemotron-h-8b", 2, 4, "SD", id="mamba2-P2-D4-SD"),
    pytest.param("falcon-h1-0.5b", 1, 2, "DS", id="mamba2-ng1-P1-D2-DS"),
    pytest.param("falcon-h1-0.5b", 2, 1, "SD", id="mamba2-ng1-P2-D1-SD"),
    pytest.param("jamba-v0.1", 2, 4, "DS", id="mamba1-P2-D4-DS"),
    pytest.param("jamba-v0.1", 8, 2, "SD", id="mamba1-P8-D2-SD"),
    pytest.param("kimi-linear-48b-a3b", 2, 4, "DS", id="kda-mla-P2-D4-DS"),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name,p,d,conv", CASES)
def test_slot_copy_every_family(name, p, d, conv, device):
    spec = load_spec(name).truncated(1, 1)
    plan = TransferPlan.build(spec, p, d, 10, conv_layout=conv, decode_block_size=48)
    h = Harness(plan, [37, 1, 100], seed=p * 7 + d, device=device)
    tm = h.run_staged(backend="triton")
    assert h.mismatches() == []
    assert tm.launches == p + d  # one launch per rank and side for the whole batch


def _replicated_spec() -> ModelSpec:
    """Mamba2 with replicated B/C (one group) and replicated KV heads: shards by 6, so 2 <-> 3."""
    st = StateDims(LayerKind.MAMBA2, 4, 12, (8, 16), 1, 16, "bfloat16", "float32")
    layers = tuple(CacheLayer(i, f"l{i}", i, k) for i, k in enumerate([LayerKind.MAMBA2, LayerKind.ATTENTION] * 2))
    return ModelSpec("r", "R", layers, st, AttentionDims(1, 64))


@pytest.mark.parametrize("device", DEVICES)
def test_slot_copy_non_integer_ratios_random_ids(device):
    """2 -> 3 and 3 -> 2, both conv layouts, random block ids (the harness draws them), spare blocks that
    must stay untouched, a request of no tokens."""
    for p, d in ((2, 3), (3, 2)):
        for conv in ("DS", "SD"):
            plan = TransferPlan.build(_replicated_spec(), p, d, 40, conv_layout=conv, decode_block_size=32)
            h = Harness(plan, [40, 7, 100, 0], seed=d, device=device, spare_blocks=5)
            h.run_staged(backend="triton")
            assert h.mismatches() == [], (p, d, conv)


def _launch(page, stage, table, rows, pack, elem, align):
    from hybrid_kv.kernels.slot_copy import launch

    full, programs = with_first(np.asarray(rows, dtype=np.int64).reshape(-1, 4))
    launch(page, stage, table, torch.from_numpy(full).to(page.device), programs, pack=pack, elem=elem, align=align)
    return full


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("unit", [1, 2, 4, 16])
@pytest.mark.parametrize("pack", [True, False], ids=["pack", "unpack"])
def test_kernel_matches_its_reference_on_awkward_tables(device, unit, pack):
    """Offsets and lengths that are multiples of `unit` bytes only (the 1-, 2- and 4-byte element paths and
    the 16-byte hint), tiles from one element to a whole tile plus one block, slots of no tiles between
    others (the flat grid's search must skip them), more slots than one search step resolves; poisoned
    buffers: every byte the reference does not write keeps its value."""
    g = np.random.default_rng(unit)
    page = torch.from_numpy(g.integers(0, 256, 300_000, dtype=np.uint8)).to(device)
    stage = torch.full((200_000,), 0xAB, dtype=torch.uint8, device=device)
    if not pack:
        page, stage = torch.full_like(page, 0xAB), torch.from_numpy(g.integers(0, 256, 200_000, dtype=np.uint8))
        stage = stage.to(device)
    table = TileTable(torch.device(device))
    lengths = [unit, 3 * unit, 1000 * unit + unit, TILE_BYTES + 1024]  # the last: a tile and a block
    runs = np.array([[17 * unit * i, 5 * unit * i, n] for i, n in enumerate(lengths)], dtype=np.int64)
    lo, n = table.add("t", cut_tiles(runs[:, 0], runs[:, 1], runs[:, 2]))
    rows = [[0, 0, lo, n], [50_000, 60_000, lo, 0], [100_000 + unit, 100_000, lo + 1, n - 1]]
    rows += [[200_000 + 3 * unit * i, 150_000 + unit * i, lo, 2] for i in range(9)]  # many small slots
    elem, align = element_size(table.offset_gcd, table.length_gcd, 16 * unit, unit)
    want_page, want_stage = page.cpu().clone(), stage.cpu().clone()
    full = _launch(page, stage, table, rows, pack, elem, align)
    copy_reference(want_page, want_stage, table.host, full, pack)
    assert_same_bytes(stage.cpu(), want_stage, f"staging (unit {unit}, element {elem} B)")
    assert_same_bytes(page.cpu(), want_page, f"pages (unit {unit}, element {elem} B)")
    assert not torch.equal(want_stage if pack else want_page, torch.full_like(want_stage if pack else want_page,
                                                                               0xAB))  # fmt: skip


@pytest.mark.parametrize("device", DEVICES)
def test_kernel_with_nothing_to_copy(device):
    page = torch.arange(64, dtype=torch.uint8, device=device)
    stage = torch.zeros(64, dtype=torch.uint8, device=device)
    table = TileTable(torch.device(device))
    lo, n = table.add("empty", np.zeros((0, 3), dtype=np.int64))
    _launch(page, stage, table, [[0, 0, lo, n]], True, 4, 4)
    _launch(page, stage, table, np.zeros((0, 4)), True, 4, 4)
    assert not stage.any()


def test_tiles_cover_runs_exactly():
    t = cut_tiles(np.array([0, 100]), np.array([7, 0]), np.array([TILE_BYTES + 1, 0]))
    assert t.tolist() == [[0, 7, TILE_BYTES], [TILE_BYTES, TILE_BYTES + 7, 1]]  # the empty run: no tile
    rows, programs = with_first(np.array([[0, 0, 0, 3], [0, 0, 3, 0], [0, 0, 3, 2]], dtype=np.int64))
    assert rows[:, 4].tolist() == [0, 3, 3] and programs == 5


def test_staging_imports_without_triton():
    """The staging core (templates, chunks, the copier's torch path) needs no triton: an optional extra."""
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import hybrid_kv.staging, hybrid_kv.staging.copier, hybrid_kv.staging.template\n"
        "from hybrid_kv.harness import Harness\n"
        "from hybrid_kv.plan import TransferPlan\n"
        "from hybrid_kv.spec_hf import load_spec\n"
        "h = Harness(TransferPlan.build(load_spec('falcon-h1-0.5b').truncated(1, 1), 1, 2, 10), [10])\n"
        "h.run_staged(backend='torch'); assert h.mismatches() == []; print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]


def test_bad_segment_table_writes_nothing():
    """The plan-level reference (`ops`, torch only) validates a whole table before any write."""
    backend = "torch"
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
