"""Page anatomy against the worked examples of vLLM 0.32 (reference/vllm_hybrid_layout.md §1.6, §2.2)."""

import pytest

from hybrid_kv.layout import RankLayout, Region
from hybrid_kv.spec_hf import load_spec


def parts(lay):
    return [(p.sub.name, p.channels, lay.conv_region(p, 0, p.channels).nbytes) for p in lay.conv_parts]


@pytest.mark.parametrize(
    "tp,conv,ssm_shape,ssm_bytes,state_bytes,page",
    [
        (2, [("x", 4096, 24576), ("B", 512, 3072), ("C", 512, 3072)], (64, 64, 128), 2_097_152, 2_127_872, 2_129_920),
        (4, [("x", 2048, 12288), ("B", 256, 1536), ("C", 256, 1536)], (32, 64, 128), 1_048_576, 1_063_936, 1_064_960),
    ],
)
def test_nemotron_h_8b(tp, conv, ssm_shape, ssm_bytes, state_bytes, page):
    lay = RankLayout(load_spec("nemotron-h-8b"), tp, 0)
    assert parts(lay) == conv
    assert (lay.ssm_shard.size, *lay.spec.state.head_shape) == ssm_shape
    assert (lay.ssm_bytes, lay.state_bytes) == (ssm_bytes, state_bytes)
    assert (lay.block_size, lay.page_bytes, lay.padding_bytes) == (1040, page, page - state_bytes)


@pytest.mark.parametrize(
    "tp,conv,ssm_bytes,state_bytes,block",
    [
        (1, [("q", 2048, 12288), ("k", 2048, 12288), ("v", 6144, 36864)], 3_145_728, 3_207_168, 784),
        (2, None, None, None, 784),
        (4, None, None, None, 784),
        (8, [("q", 256, 1536), ("k", 256, 1536), ("v", 768, 4608)], 393_216, 400_896, 400),
    ],
)
def test_qwen35_27b(tp, conv, ssm_bytes, state_bytes, block):
    lay = RankLayout(load_spec("qwen3.5-27b"), tp, 0)
    if conv:
        assert parts(lay) == conv
        assert (lay.ssm_bytes, lay.state_bytes) == (ssm_bytes, state_bytes)
    assert lay.block_size == block


def test_explicit_block_size_1024():
    # vLLM with --block-size 1024: every TP keeps 1024; TP1 page 4 MiB with 987,136 B of padding.
    spec = load_spec("qwen3.5-27b")
    assert {RankLayout(spec, tp, 0, cache_block_size=1024).block_size for tp in (1, 2, 4, 8)} == {1024}
    lay = RankLayout(spec, 1, 0, cache_block_size=1024)
    assert (lay.page_bytes, lay.padding_bytes) == (4_194_304, 987_136)
    lay8 = RankLayout(spec, 8, 0, cache_block_size=1024)
    assert (lay8.page_bytes, lay8.padding_bytes) == (1_048_576, 647_680)


def test_sd_layout_regions():
    lay = RankLayout(load_spec("nemotron-h-8b"), 4, 1, conv_layout="SD")
    x, b, _ = lay.conv_parts
    # (rows=3, channels=2560) bf16: a channel range is 3 runs, 2560*2 bytes apart
    assert lay.conv_region(b, 0, 256) == Region(2048 * 2, 3, 512, 5120)
    assert lay.conv_region(x, 10, 20) == Region(20, 3, 20, 5120)
    ds = RankLayout(load_spec("nemotron-h-8b"), 4, 1)
    assert ds.conv_region(ds.conv_parts[1], 0, 256) == Region(12288, 1, 1536, 1536)


def test_replication():
    f = load_spec("falcon-h1-0.5b")  # n_groups = 1, 2 kv heads
    for r in range(4):
        lay = RankLayout(f, 4, r)
        assert [p.channels for p in lay.conv_parts] == [384, 128, 128]
        assert lay.conv_parts[1].shard.replicated and not lay.conv_parts[0].shard.replicated
        assert (lay.kv_shard.start, lay.kv_heads_local, lay.kv_shard.replicated) == (r * 2 // 4, 1, True)
    assert not RankLayout(f, 1, 0).conv_parts[1].shard.replicated
    q = load_spec("qwen3.5-27b")  # 4 kv heads
    assert [RankLayout(q, 8, r).kv_shard.start for r in range(8)] == [0, 0, 1, 1, 2, 2, 3, 3]
    assert RankLayout(q, 2, 1).kv_shard.start == 2 and RankLayout(q, 2, 1).kv_heads_local == 2


def test_nhd():
    lay = RankLayout(load_spec("nemotron-h-8b"), 2, 0, kv_layout="NHD")
    c = 2 * 128 * 2
    assert lay.kv_region(1, 3, 5, 9) == Region(5 * 4 * c + c, 4, 2 * c, 4 * c)
    hnd = RankLayout(load_spec("nemotron-h-8b"), 2, 0)
    assert hnd.kv_region(1, 3, 5, 9) == Region(1 * 1040 * c + 5 * c, 2, 4 * c, 1040 * c)


@pytest.mark.parametrize(
    "model,tp,msg",
    [
        ("qwen3.5-27b", 3, r"tp=3 does not divide GDN num_k_heads=16 .*TP sizes that work for qwen3.5-27b: 1, 2, 4, 8"),
        ("nemotron-h-8b", 3, r"tp=3 does not divide Mamba2 num_heads=128"),
        ("jamba-v0.1", 3, r"tp=3 does not divide Mamba1 intermediate_size=8192"),
        ("nemotron-h-8b", 16, r"tp=16 does not divide Mamba2 n_groups=8"),
        ("falcon-h1-0.5b", 3, r"attention num_kv_heads=2 cannot be replicated over tp=3"),
        # dims the cache does not show: query heads, MLP width
        ("falcon-h1-0.5b", 6, r"cannot run at TP 6: tp=6 does not divide num_attention_heads=8; .*: 1, 2, 4, 8$"),
        ("qwen3.5-27b", 0, r"tp_rank=0 is not in \[0, tp_size=0\)"),
    ],
)
def test_tp_that_does_not_fit(model, tp, msg):
    with pytest.raises(ValueError, match=msg):
        RankLayout(load_spec(model), tp, 0)


def test_query_heads_and_mlp_width_limit_tp():
    """A 12-head model shards at 6 but not 8, even where every cache dim would fit."""
    from hybrid_kv.spec_hf import load_config, spec_from_config

    _, cfg = load_config("qwen3.5-0.8b")
    cfg["text_config"]["num_attention_heads"] = 12
    spec = spec_from_config(cfg, name="twelve")
    with pytest.raises(ValueError, match=r"tp=8 does not divide num_attention_heads=12"):
        RankLayout(spec, 8, 0)
    cfg["text_config"]["num_attention_heads"] = 8
    cfg["text_config"]["intermediate_size"] = 3100
    with pytest.raises(ValueError, match=r"tp=8 does not divide intermediate_size=3100"):
        RankLayout(spec_from_config(cfg, name="w"), 8, 0)


def test_mamba2_groups_message():
    from hybrid_kv.spec import CacheLayer, LayerKind, ModelSpec, StateDims

    st = StateDims(LayerKind.MAMBA2, conv_kernel=4, heads=8, head_shape=(4, 8), groups=3, group_channels=8)
    spec = ModelSpec("m", "X", (CacheLayer(0, "l0", 0, LayerKind.MAMBA2),), st, None)
    with pytest.raises(
        ValueError,
        match=r"tp=2 does not divide Mamba2 n_groups=3 "
        r"\(supported: Mamba2 n_groups % tp == 0, or Mamba2 n_groups == 1\)",
    ):
        RankLayout(spec, 2, 0)


def test_bad_layout_names():
    with pytest.raises(ValueError, match=r"conv_layout='XY' \(supported: DS, SD\)"):
        RankLayout(load_spec("qwen3.5-27b"), 1, 0, conv_layout="XY")
    with pytest.raises(ValueError, match=r"kv_layout='HDN' \(supported: HND, NHD\)"):
        RankLayout(load_spec("qwen3.5-27b"), 1, 0, kv_layout="HDN")
