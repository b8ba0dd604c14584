import json

import pytest

from hybrid_kv.spec import LayerKind, StateDims, normalize_dtype
from hybrid_kv.spec_hf import list_presets, load_config, load_spec, spec_from_config

# (preset, state kind, #state layers, #attention layers, conv dtype, ssm dtype, kv heads, head_dim)
EXPECTED = [
    ("qwen3.5-0.8b", "gdn", 18, 6, "bfloat16", "float32", 2, 256),
    ("qwen3.5-27b", "gdn", 48, 16, "bfloat16", "float32", 4, 256),
    ("qwen3.5-397b-a17b", "gdn", 45, 15, "bfloat16", "float32", 2, 256),
    ("qwen3-next-80b-a3b", "gdn", 36, 12, "bfloat16", "bfloat16", 2, 256),
    ("nemotron-h-8b", "mamba2", 24, 4, "bfloat16", "float32", 8, 128),
    ("nemotron-3-nano-30b-a3b", "mamba2", 23, 6, "bfloat16", "float32", 2, 128),
    ("falcon-h1-0.5b", "mamba2", 36, 36, "bfloat16", "bfloat16", 2, 64),
    ("jamba-v0.1", "mamba1", 28, 4, "bfloat16", "bfloat16", 8, 128),
    # MLA: one latent of kv_lora_rank 512 + qk_rope_head_dim 64 a token; KDA state float32 (vLLM's "auto")
    ("kimi-linear-48b-a3b", "kda", 20, 7, "bfloat16", "float32", 1, 576),
    ("ling-3.0-tiny", "kda", 18, 6, "bfloat16", "float32", 1, 576),
]


def test_every_shared_model_has_a_preset():
    assert sorted(e[0] for e in EXPECTED) == list_presets()


@pytest.mark.parametrize(
    "name,kind,n_state,n_attn,conv_dt,ssm_dt,kv_heads,head_dim", EXPECTED, ids=[e[0] for e in EXPECTED]
)
def test_presets(name, kind, n_state, n_attn, conv_dt, ssm_dt, kv_heads, head_dim):
    spec = load_spec(name)
    assert spec.state.kind.value == kind
    assert len(spec.state_layers) == n_state
    assert len(spec.attention_layers) == n_attn
    assert (spec.state.conv_dtype, spec.state.ssm_dtype) == (conv_dt, ssm_dt)
    assert (spec.attention.num_kv_heads, spec.attention.head_dim) == (kv_heads, head_dim)


def test_family_dims():
    q = load_spec("qwen3.5-27b").state
    assert [(s.name, s.channels) for s in q.subprojections] == [("q", 2048), ("k", 2048), ("v", 6144)]
    assert (q.heads, q.head_shape, q.conv_rows) == (48, (128, 128), 3)
    n = load_spec("nemotron-h-8b").state
    assert [(s.name, s.channels) for s in n.subprojections] == [("x", 8192), ("B", 1024), ("C", 1024)]
    # Nemotron-3-Nano: heads x head_dim (4096), not expand x hidden (5376)
    nano = load_spec("nemotron-3-nano-30b-a3b").state
    assert nano.subprojections[0].channels == 64 * 64
    j = load_spec("jamba-v0.1").state
    assert (j.heads, j.head_shape, j.conv_channels) == (8192, (16,), 8192)
    f = load_spec("falcon-h1-0.5b")
    assert f.state.groups == 1 and f.state.subprojections[1].replicate_single_unit
    # Falcon-H1: every decoder layer has a Mamba2 and an attention cache layer
    assert [layer.kind for layer in f.layers[:4]] == [LayerKind.MAMBA2, LayerKind.ATTENTION] * 2
    assert {layer.decoder_layer for layer in f.layers} == set(range(36))


def test_layer_patterns():
    nh = load_spec("nemotron-h-8b")
    assert [layer.decoder_layer for layer in nh.attention_layers] == [7, 18, 29, 40]
    qn = load_spec("qwen3-next-80b-a3b")  # full_attention_interval = 4
    assert [layer.decoder_layer for layer in qn.attention_layers][:3] == [3, 7, 11]
    jb = load_spec("jamba-v0.1")  # period 8 offset 4
    assert [layer.decoder_layer for layer in jb.attention_layers] == [4, 12, 20, 28]


def test_dtype_overrides():
    s = load_spec("qwen3.5-27b", conv_dtype="fp16", ssm_dtype="bf16", kv_dtype="float16", num_spec=2)
    assert (s.state.conv_dtype, s.state.ssm_dtype, s.attention.dtype) == ("float16", "bfloat16", "float16")
    assert s.state.conv_rows == 5
    assert load_spec("jamba-v0.1", num_spec=2).state.conv_rows == 3  # Mamba1 has no spec rows
    with pytest.raises(ValueError, match=r"unsupported dtype 'int7'.*supported: .*bfloat16"):
        normalize_dtype("int7")


def test_config_path_and_folder(tmp_path):
    _, cfg = load_config("nemotron-h-8b")
    text = json.dumps(cfg).replace('"time_step_limit": [0.0, 1e309]', '"time_step_limit": [0.0, Infinity]')
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(text)
    assert load_spec(tmp_path / "m").state == load_spec("nemotron-h-8b").state
    assert load_spec(str(tmp_path / "m" / "config.json")).name == "m"


def test_infinity_in_config(tmp_path):
    _, cfg = load_config("nemotron-h-8b")
    p = tmp_path / "config.json"
    p.write_text(json.dumps(cfg)[:-1] + ', "time_step_limit": [0.0, Infinity]}')
    assert load_spec(p).state.kind is LayerKind.MAMBA2


GRANITE = {
    "architectures": ["GraniteMoeHybridForCausalLM"],
    "torch_dtype": "bfloat16",
    "hidden_size": 1536,
    "num_attention_heads": 12,
    "num_key_value_heads": 4,
    "layer_types": ["mamba"] * 3 + ["attention"],
    "mamba_n_heads": 48,
    "mamba_d_head": 64,
    "mamba_n_groups": 1,
    "mamba_d_state": 128,
    "mamba_d_conv": 4,
    "mamba_expand": 2,
}


def test_granite_bamba_zamba2():
    g = spec_from_config(GRANITE, name="granite-4.0-h-tiny")
    assert (len(g.state_layers), len(g.attention_layers)) == (3, 1)
    assert [s.channels for s in g.state.subprojections] == [3072, 128, 128]
    assert g.attention.head_dim == 128
    auto = spec_from_config({**GRANITE, "mamba_d_head": "auto"})
    assert auto.state.head_shape == (64, 128)  # 2 * 1536 / 48
    bamba = {**GRANITE, "architectures": ["BambaForCausalLM"], "num_hidden_layers": 4, "attn_layer_indices": [2]}
    del bamba["layer_types"]
    b = spec_from_config(bamba)
    assert [layer.kind for layer in b.layers][2] is LayerKind.ATTENTION
    zamba = {
        "architectures": ["Zamba2ForCausalLM"],
        "hidden_size": 2048,
        "num_attention_heads": 32,
        "layers_block_type": ["mamba", "hybrid", "mamba"],
        "n_mamba_heads": 64,
        "mamba_headdim": 64,
        "mamba_ngroups": 1,
        "mamba_d_state": 64,
        "mamba_d_conv": 4,
    }
    z = spec_from_config(zamba)
    assert [layer.kind.value for layer in z.layers] == ["mamba2", "mamba2", "attention", "mamba2"]
    assert z.attention.head_dim == 128


def test_bad_configs():
    with pytest.raises(ValueError, match=r"unknown architecture 'LlamaForCausalLM'.*supported:.*JambaForCausalLM"):
        spec_from_config({"architectures": ["LlamaForCausalLM"]})
    with pytest.raises(ValueError, match=r"no 'architectures'"):
        spec_from_config({})
    cfg = dict(GRANITE)
    del cfg["mamba_d_state"]
    with pytest.raises(ValueError, match=r"missing key 'mamba_d_state'"):
        spec_from_config(cfg, name="g")
    with pytest.raises(ValueError, match=r"layer type 'moe'"):
        spec_from_config({**GRANITE, "layer_types": ["moe"]})
    with pytest.raises(ValueError, match=r"hybrid_override_pattern has \['X'\]"):
        spec_from_config({**load_config("nemotron-h-8b")[1], "hybrid_override_pattern": "MX*"})
    with pytest.raises(ValueError, match=r"neither a config.json path nor a preset \(presets: falcon-h1-0.5b"):
        load_spec("no-such-model")


def test_bad_dims():
    with pytest.raises(ValueError, match=r"conv_kernel=1 must be >= 2"):
        StateDims(LayerKind.MAMBA1, conv_kernel=1, heads=8, head_shape=(4,))
    with pytest.raises(ValueError, match=r"needs groups >= 1"):
        StateDims(LayerKind.GDN, conv_kernel=4, heads=8, head_shape=(4, 4))


def test_truncated_keeps_order():
    s = load_spec("qwen3.5-27b").truncated(2, 1)
    assert [layer.kind.value for layer in s.layers] == ["gdn", "gdn", "attention"]
    assert [layer.index for layer in s.layers] == [0, 1, 2]


def test_nemotron_h_layers_block_type_equals_pattern():
    """transformers' NemotronHConfig (what vLLM holds in memory) names the layers instead of the pattern."""
    _, cfg = load_config("nemotron-h-8b")
    names = {"M": "mamba", "*": "attention", "-": "mlp", "E": "moe"}
    alt = {k: v for k, v in cfg.items() if k != "hybrid_override_pattern"}
    alt["layers_block_type"] = [names[c] for c in cfg["hybrid_override_pattern"]]
    assert spec_from_config(alt).fingerprint() == spec_from_config(cfg).fingerprint()
    alt["layers_block_type"][0] = "conv"
    with pytest.raises(ValueError, match=r"layers_block_type has \['conv'\]"):
        spec_from_config(alt)
