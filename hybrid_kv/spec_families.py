"""One parser per model family: its HF `config.json` -> `ModelSpec`, with vLLM 0.32's layer kinds, shapes
and state dtypes (see `spec_hf` for the dtype rules). `PARSERS` maps each architecture name to its parser."""

from __future__ import annotations

from collections.abc import Callable, Mapping

from hybrid_kv.spec import AttentionDims, LayerKind, ModelSpec, StateDims, normalize_dtype
from hybrid_kv.spec_fields import (
    MAX_LAYERS,
    Config,
    as_int,
    attention,
    build,
    int_field,
    layer_list,
    mamba2_state,
    model_dtype,
    req,
)


def _qwen_gdn(config: Config, name: str, arch: str) -> ModelSpec:
    cfg = config.get("text_config") or config
    dtype = model_dtype(cfg, config)
    n = int_field(cfg, "num_hidden_layers", name)
    if cfg.get("layer_types"):
        types = layer_list(cfg, "layer_types", name)
        if len(types) != n:
            raise ValueError(f"config of {name!r}: layer_types has {len(types)} entries, num_hidden_layers={n}")
    else:
        interval = int_field(cfg, "full_attention_interval", name)
        types = ["full_attention" if (i + 1) % interval == 0 else "linear_attention" for i in range(n)]
    mixers = []
    for t in types:
        if t not in ("full_attention", "linear_attention"):
            raise ValueError(f"config of {name!r}: layer type {t!r} (supported: full_attention, linear_attention)")
        mixers.append([LayerKind.ATTENTION if t == "full_attention" else LayerKind.GDN])
    ssm_dtype = normalize_dtype(cfg.get("mamba_ssm_dtype") or config.get("mamba_ssm_dtype") or dtype)
    state = StateDims(
        kind=LayerKind.GDN,
        conv_kernel=int_field(cfg, "linear_conv_kernel_dim", name),
        heads=int_field(cfg, "linear_num_value_heads", name),
        head_shape=(int_field(cfg, "linear_value_head_dim", name), int_field(cfg, "linear_key_head_dim", name)),
        groups=int_field(cfg, "linear_num_key_heads", name),
        group_channels=int_field(cfg, "linear_key_head_dim", name),
        conv_dtype=dtype,
        ssm_dtype=ssm_dtype,
    )
    return build(name, arch, mixers, state, attention(cfg, name, dtype, "head_dim"))


def _nemotron_h(cfg: Config, name: str, arch: str) -> ModelSpec:
    dtype = model_dtype(cfg, cfg)
    if "hybrid_override_pattern" not in cfg and "layers_block_type" in cfg:
        # transformers' NemotronHConfig (what vLLM holds in memory) replaces the pattern with names
        names = {"mamba": "M", "linear_attention": "M", "attention": "*", "full_attention": "*", "mlp": "-", "moe": "E"}
        kinds = layer_list(cfg, "layers_block_type", name)
        unknown = sorted({k for k in kinds if k not in names})
        if unknown:
            raise ValueError(f"config of {name!r}: layers_block_type has {unknown} (supported: {', '.join(names)})")
        pattern = "".join(names[k] for k in kinds)
    else:
        pattern = req(cfg, "hybrid_override_pattern", name)
        if not isinstance(pattern, str):
            raise ValueError(f"config of {name!r}: hybrid_override_pattern must be a string like 'M-M*'")
        if len(pattern) > MAX_LAYERS:
            raise ValueError(
                f"config of {name!r}: hybrid_override_pattern has {len(pattern)} layers; "
                f"at most {MAX_LAYERS} are accepted"
            )
    table = {"M": [LayerKind.MAMBA2], "*": [LayerKind.ATTENTION], "-": [], "E": []}
    bad = sorted(set(pattern) - set(table))
    if bad:
        raise ValueError(f"config of {name!r}: hybrid_override_pattern has {bad} (supported: M, *, -, E)")
    state = mamba2_state(
        cfg,
        name,
        dtype,
        normalize_dtype(cfg.get("mamba_ssm_cache_dtype") or "float32"),
        heads="mamba_num_heads",
        head_dim="mamba_head_dim",
        groups="n_groups",
        state="ssm_state_size",
        kernel="conv_kernel",
        expand="expand",
    )
    attn = attention(cfg, name, dtype, "head_dim", "attention_head_dim")
    return build(name, arch, [table[c] for c in pattern], state, attn)


def _mamba2_hf_state(cfg: Config, name: str, dtype: str, heads: str = "mamba_n_heads") -> StateDims:
    return mamba2_state(
        cfg,
        name,
        dtype,
        normalize_dtype(cfg.get("mamba_ssm_cache_dtype") or dtype),
        heads=heads,
        head_dim="mamba_d_head",
        groups="mamba_n_groups",
        state="mamba_d_state",
        kernel="mamba_d_conv",
    )


def _granite_h(cfg: Config, name: str, arch: str) -> ModelSpec:
    dtype = model_dtype(cfg, cfg)
    table = {"mamba": [LayerKind.MAMBA2], "attention": [LayerKind.ATTENTION]}
    mixers = []
    for t in layer_list(cfg, "layer_types", name):
        if t not in table:
            raise ValueError(f"config of {name!r}: layer type {t!r} (supported: mamba, attention)")
        mixers.append(table[t])
    return build(name, arch, mixers, _mamba2_hf_state(cfg, name, dtype), attention(cfg, name, dtype, "head_dim"))


def _bamba(cfg: Config, name: str, arch: str) -> ModelSpec:
    dtype = model_dtype(cfg, cfg)
    attn_idx = set(layer_list(cfg, "attn_layer_indices", name))
    n = int_field(cfg, "num_hidden_layers", name)
    mixers = [[LayerKind.ATTENTION] if i in attn_idx else [LayerKind.MAMBA2] for i in range(n)]
    return build(name, arch, mixers, _mamba2_hf_state(cfg, name, dtype), attention(cfg, name, dtype, "head_dim"))


def _falcon_h1(cfg: Config, name: str, arch: str) -> ModelSpec:
    dtype = model_dtype(cfg, cfg)
    n = int_field(cfg, "num_hidden_layers", name)
    state = _mamba2_hf_state(cfg, name, dtype)
    d_ssm = cfg.get("mamba_d_ssm")
    if d_ssm is not None and int_field(cfg, "mamba_d_ssm", name) != state.heads * state.head_shape[0]:
        raise ValueError(f"config of {name!r}: mamba_d_ssm={d_ssm} != mamba_n_heads*mamba_d_head")
    # Every decoder layer runs attention and Mamba2 in parallel: two cache layers each.
    mixers = [[LayerKind.MAMBA2, LayerKind.ATTENTION] for _ in range(n)]
    return build(name, arch, mixers, state, attention(cfg, name, dtype, "head_dim"))


def _zamba2(cfg: Config, name: str, arch: str) -> ModelSpec:
    dtype = model_dtype(cfg, cfg)
    table = {"mamba": [LayerKind.MAMBA2], "hybrid": [LayerKind.MAMBA2, LayerKind.ATTENTION]}
    mixers = []
    for t in layer_list(cfg, "layers_block_type", name):
        if t not in table:
            raise ValueError(f"config of {name!r}: layer block type {t!r} (supported: mamba, hybrid)")
        mixers.append(table[t])
    state = mamba2_state(
        cfg,
        name,
        dtype,
        dtype,
        heads="n_mamba_heads",
        head_dim="mamba_headdim",
        groups="mamba_ngroups",
        state="mamba_d_state",
        kernel="mamba_d_conv",
    )
    heads = int_field(cfg, "num_attention_heads", name)
    if cfg.get("attention_head_dim") is not None:
        head_dim = int_field(cfg, "attention_head_dim", name)
    else:
        head_dim = 2 * int_field(cfg, "hidden_size", name) // heads
    kv = int_field(cfg, "num_key_value_heads", name) if cfg.get("num_key_value_heads") is not None else heads
    attn = AttentionDims(kv, head_dim, dtype)
    return build(name, arch, mixers, state, attn)


def _jamba(cfg: Config, name: str, arch: str) -> ModelSpec:
    dtype = model_dtype(cfg, cfg)
    n = int_field(cfg, "num_hidden_layers", name)
    period, offset = int_field(cfg, "attn_layer_period", name), int_field(cfg, "attn_layer_offset", name, lo=0)
    mixers = [[LayerKind.ATTENTION] if i % period == offset else [LayerKind.MAMBA1] for i in range(n)]
    state = StateDims(
        kind=LayerKind.MAMBA1,
        conv_kernel=int_field(cfg, "mamba_d_conv", name),
        heads=int_field(cfg, "mamba_expand", name) * int_field(cfg, "hidden_size", name),
        head_shape=(int_field(cfg, "mamba_d_state", name),),
        conv_dtype=dtype,
        ssm_dtype=normalize_dtype(cfg.get("mamba_ssm_cache_dtype") or dtype),
    )
    return build(name, arch, mixers, state, attention(cfg, name, dtype))


def _kda_state(cfg: Config, name: str, dtype: str, heads: str, head_dim: str, kernel: str) -> StateDims:
    """vLLM's kda_state_shape: conv over [q | k | v] (H*hd channels each), recurrent state (H, hd, hd),
    float32 unless `mamba_ssm_cache_dtype` says otherwise (kda_state_dtype's "auto")."""
    h, hd = int_field(cfg, heads, name), int_field(cfg, head_dim, name)
    return StateDims(
        kind=LayerKind.KDA,
        conv_kernel=int_field(cfg, kernel, name),
        heads=h,
        head_shape=(hd, hd),
        groups=h,
        group_channels=hd,
        conv_dtype=dtype,
        ssm_dtype=normalize_dtype(cfg.get("mamba_ssm_cache_dtype") or "float32"),
    )


def _mla(cfg: Config, name: str, dtype: str) -> AttentionDims:
    """vLLM's MLA cache: one latent of kv_lora_rank + qk_rope_head_dim per token, whole on every rank."""
    width = int_field(cfg, "kv_lora_rank", name) + int_field(cfg, "qk_rope_head_dim", name, lo=0)
    return AttentionDims(1, width, dtype, latent=True)


def _kimi_linear(config: Config, name: str, arch: str) -> ModelSpec:
    cfg = config.get("text_config") or config
    dtype = model_dtype(cfg, config)
    n = int_field(cfg, "num_hidden_layers", name)
    lac = req(cfg, "linear_attn_config", name)
    if not isinstance(lac, Mapping):
        raise ValueError(f"config of {name!r}: linear_attn_config must be an object, got {type(lac).__name__}")
    where = f"{name}' linear_attn_config"
    sets = {}
    for key in ("kda_layers", "full_attn_layers"):
        entries = layer_list(lac, key, where) if key == "kda_layers" or key in lac else []
        sets[key] = {as_int(v, f"{key}[{i}]", name, 1, n) for i, v in enumerate(entries)}  # 1-based, as published
    both = sorted(sets["kda_layers"] & sets["full_attn_layers"])
    if both:
        raise ValueError(f"config of {name!r}: layers {both} are in both kda_layers and full_attn_layers")
    # vLLM (KimiLinearConfig.is_kda_layer): layer i is KDA iff i + 1 is in kda_layers, else MLA
    mixers = [[LayerKind.KDA] if i + 1 in sets["kda_layers"] else [LayerKind.ATTENTION] for i in range(n)]
    state = _kda_state(lac, where, dtype, "num_heads", "head_dim", "short_conv_kernel_size")
    return build(name, arch, mixers, state, _mla(cfg, name, dtype))


def _bailing_v3(cfg: Config, name: str, arch: str) -> ModelSpec:
    dtype = model_dtype(cfg, cfg)
    n, g = int_field(cfg, "num_hidden_layers", name), int_field(cfg, "layer_group_size", name)
    # vLLM's _is_kda_layer: the last layer of each group, and every layer past the last whole group, are MLA
    mixers = [[LayerKind.ATTENTION] if (i + 1) % g == 0 or i >= n // g * g else [LayerKind.KDA] for i in range(n)]
    state = _kda_state(cfg, name, dtype, "num_attention_heads", "head_dim", "short_conv_kernel_size")
    return build(name, arch, mixers, state, _mla(cfg, name, dtype))


PARSERS: dict[str, Callable[[Config, str, str], ModelSpec]] = {
    "KimiLinearForCausalLM": _kimi_linear,
    "BailingMoeV3ForCausalLM": _bailing_v3,
    "Qwen3_5ForConditionalGeneration": _qwen_gdn,
    "Qwen3_5MoeForConditionalGeneration": _qwen_gdn,
    "Qwen3_5ForCausalLM": _qwen_gdn,
    "Qwen3_5MoeForCausalLM": _qwen_gdn,
    "Qwen3NextForCausalLM": _qwen_gdn,
    "NemotronHForCausalLM": _nemotron_h,
    "GraniteMoeHybridForCausalLM": _granite_h,
    "BambaForCausalLM": _bamba,
    "FalconH1ForCausalLM": _falcon_h1,
    "Zamba2ForCausalLM": _zamba2,
    "JambaForCausalLM": _jamba,
}
