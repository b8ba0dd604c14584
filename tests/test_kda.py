"""KDA layers (Kimi-Linear, BailingMoeV3) and their MLA attention: specs from the released configs, page
anatomy by hand from vLLM 0.32's kda_state_shape / MLAAttentionSpec, refusals, and the oracle round trip
(plan, pack, move, unpack; strided too) at TP pairs either way."""

import copy

import pytest

from hybrid_kv.harness import Harness
from hybrid_kv.layout import RankLayout, tp_problem
from hybrid_kv.plan import TransferPlan
from hybrid_kv.spec import LayerKind
from hybrid_kv.spec_hf import load_config, load_spec, spec_from_config


def test_kimi_linear_layers_are_one_based_as_published():
    s = load_spec("kimi-linear-48b-a3b")
    # linear_attn_config full_attn_layers [4, 8, ..., 24, 27] are 1-based: decoder layers 3, 7, ..., 23, 26
    assert [x.decoder_layer for x in s.attention_layers] == [3, 7, 11, 15, 19, 23, 26]
    assert [x.decoder_layer for x in s.state_layers][:4] == [0, 1, 2, 4]
    assert {x.name for x in s.layers} == {f"layers.{i}.self_attn" for i in range(27)}
    st = s.state
    assert [(p.name, p.channels) for p in st.subprojections] == [("q", 4096), ("k", 4096), ("v", 4096)]
    assert (st.heads, st.head_shape, st.conv_rows, st.ssm_dtype) == (32, (128, 128), 3, "float32")
    assert s.attention.latent and s.attention.token_head_bytes == 576 * 2


def test_ling_mla_is_the_last_layer_of_each_group():
    s = load_spec("ling-3.0-tiny")  # layer_group_size 4, 24 layers
    assert [x.decoder_layer for x in s.attention_layers] == [3, 7, 11, 15, 19, 23]
    assert (s.state.heads, s.state.head_shape) == (16, (128, 128))
    _, cfg = load_config("ling-3.0-tiny")
    tail = spec_from_config({**cfg, "num_hidden_layers": 10})  # 2 whole groups, then 2 layers past them: MLA
    assert [x.decoder_layer for x in tail.attention_layers] == [3, 7, 8, 9]


def test_kimi_page_anatomy_tp2_by_hand():
    lay = RankLayout(load_spec("kimi-linear-48b-a3b"), 2, 1, "DS", "HND")
    # conv: (3 * 4096 / 2 channels, 3 rows) bf16; each of q, k, v is 2048 channels = 12,288 B
    parts = [(p.sub.name, p.channel_offset, p.channels, p.shard.start, p.shard.stop) for p in lay.conv_parts]
    assert parts == [("q", 0, 2048, 16, 32), ("k", 2048, 2048, 16, 32), ("v", 4096, 2048, 16, 32)]
    assert lay.conv_bytes == 6144 * 3 * 2 == 36_864
    assert lay.ssm_bytes == 16 * 128 * 128 * 4 == 1_048_576  # heads [16, 32) on rank 1, float32
    assert (lay.ssm_shard.start, lay.ssm_shard.stop) == (16, 32)
    # MLA: 1 head of 576 bf16 a token, every rank; block = 16 * cdiv(1,085,440, 16 * 1152) = 944
    assert (lay.kv_heads_local, lay.attn_token_bytes, lay.kv_shard.replicated) == (1, 1152, True)
    assert (lay.block_size, lay.page_bytes) == (944, 944 * 1152)


@pytest.mark.parametrize(
    "name,tp,msg",
    [
        ("kimi-linear-48b-a3b", 3, r"tp=3 does not divide KDA num_heads=32"),
        ("kimi-linear-48b-a3b", 64, r"tp=64 does not divide KDA num_heads=32"),
        ("ling-3.0-tiny", 32, r"tp=32 does not divide KDA num_heads=16"),
    ],
)
def test_tp_the_heads_do_not_allow(name, tp, msg):
    with pytest.raises(ValueError, match=msg):
        RankLayout(load_spec(name), tp, 0)
    assert tp_problem(load_spec(name), 8) is None


def test_bad_kimi_configs():
    _, cfg = load_config("kimi-linear-48b-a3b")

    def edited(**lac):
        c = copy.deepcopy(cfg)
        c["linear_attn_config"].update(lac)
        return c

    with pytest.raises(ValueError, match=r"layers \[4\] are in both kda_layers and full_attn_layers"):
        spec_from_config(edited(kda_layers=[1, 2, 3, 4]))
    with pytest.raises(ValueError, match=r"kda_layers\[1\]=28 is outside the accepted range \[1, 27\]"):
        spec_from_config(edited(kda_layers=[1, 28]))
    with pytest.raises(ValueError, match=r"kda_layers\[0\]=0 is outside"):
        spec_from_config(edited(kda_layers=[0]))
    with pytest.raises(ValueError, match=r"missing key 'num_heads'"):
        c = copy.deepcopy(cfg)
        del c["linear_attn_config"]["num_heads"]
        spec_from_config(c)
    with pytest.raises(ValueError, match=r"linear_attn_config must be an object, got list"):
        spec_from_config({**cfg, "linear_attn_config": [1, 2]})
    with pytest.raises(ValueError, match=r"missing key 'kv_lora_rank'"):
        spec_from_config({k: v for k, v in cfg.items() if k != "kv_lora_rank"})
    no_kda = spec_from_config(edited(kda_layers=[]), name="mla-only")
    assert no_kda.state is None and len(no_kda.attention_layers) == 27


@pytest.mark.parametrize("p,d", [(1, 2), (4, 2), (2, 8), (8, 1)])
def test_round_trip_byte_exact(p, d):
    """Both models' dims, 2 KDA + 1 MLA layers, odd request lengths: packed and strided, DS and SD."""
    for name in ("kimi-linear-48b-a3b", "ling-3.0-tiny"):
        spec = load_spec(name).truncated(2, 1)
        assert [x.kind for x in spec.layers] == [LayerKind.KDA, LayerKind.KDA, LayerKind.ATTENTION]
        for conv_layout, mode in (("DS", "packed"), ("SD", "strided"), ("SD", "packed")):
            plan = TransferPlan.build(spec, p, d, 37, conv_layout=conv_layout)
            h = Harness(plan, [37, 1, 70], seed=p * 31 + d)
            getattr(h, f"run_{mode}")(backend="torch")
            assert h.mismatches() == [], f"{name} {conv_layout} {mode}"
