"""Build a `ModelSpec` from a Hugging Face `config.json` (a path, a dict, or a shipped preset name).

State dtypes follow vLLM 0.32's defaults: conv = model dtype; SSM = model dtype, except Qwen3.5's
`mamba_ssm_dtype` and Nemotron-H's float32 (`mamba_ssm_cache_dtype` when the config sets it).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Mapping
from importlib import resources
from pathlib import Path
from typing import Any

from hybrid_kv.spec import AttentionDims, CacheLayer, LayerKind, ModelSpec, StateDims, normalize_dtype

Config = Mapping[str, Any]

MAX_LAYERS = 4096  # decoder layers (released hybrid models have at most a few hundred)
MAX_DIM = 1 << 20  # any one head count, head or state dim, kernel or hidden size


def list_presets() -> list[str]:
    """Names of the model presets shipped inside the package."""
    root = resources.files("hybrid_kv") / "presets"
    return sorted(p.name.removesuffix(".json") for p in root.iterdir() if p.name.endswith(".json"))


def load_config(model: str | Path) -> tuple[str, dict]:
    """(name, config dict) for a preset name, a config.json path, or a folder holding one."""
    path = Path(model)
    if path.is_dir():
        path = path / "config.json"
    if path.is_file():
        name = path.parent.name if path.name == "config.json" else path.stem
        return name, _read_json(path.read_text(), str(path))
    presets = list_presets()
    if str(model) in presets:
        text = (resources.files("hybrid_kv") / "presets" / f"{model}.json").read_text()
        return str(model), _read_json(text, f"preset {model}")
    raise ValueError(f"model {str(model)!r} is neither a config.json path nor a preset (presets: {', '.join(presets)})")


def load_spec(
    model: str | Path,
    *,
    conv_dtype: str | None = None,
    ssm_dtype: str | None = None,
    kv_dtype: str | None = None,
    num_spec: int = 0,
) -> ModelSpec:
    """`ModelSpec` for a preset name or config path, with optional dtype overrides."""
    name, cfg = load_config(model)
    spec = spec_from_config(cfg, name=name)
    spec = spec.with_dtypes(conv_dtype=conv_dtype, ssm_dtype=ssm_dtype, kv_dtype=kv_dtype)
    return spec.with_num_spec(num_spec) if num_spec else spec


def spec_from_config(config: Config, *, name: str = "model") -> ModelSpec:
    if not isinstance(config, Mapping):
        raise ValueError(f"config of {name!r} must be a JSON object, got {type(config).__name__}")
    if "text_config" in config and not isinstance(config["text_config"], (Mapping, type(None))):
        raise ValueError(
            f"config of {name!r}: text_config must be an object, got {type(config['text_config']).__name__}"
        )
    archs = config.get("architectures") or []
    if isinstance(archs, str):
        raise ValueError(
            f"config of {name!r}: architectures must be a list of names, got the string {archs!r} (write [{archs!r}])"
        )
    if not isinstance(archs, (list, tuple)) or not all(isinstance(a, str) for a in archs):
        raise ValueError(f"config of {name!r}: architectures must be a list of names, got {archs!r}")
    if not archs:
        raise ValueError(f"config of {name!r} has no 'architectures' entry (supported: {', '.join(sorted(_PARSERS))})")
    arch = archs[0]
    parser = _PARSERS.get(arch)
    if parser is None:
        raise ValueError(f"unknown architecture {arch!r} in {name!r} (supported: {', '.join(sorted(_PARSERS))})")
    spec = parser(config, name, arch)
    return dataclasses.replace(spec, sharded=_sharded_dims(config.get("text_config") or config, name))


def _sharded_dims(cfg: Config, name: str) -> tuple[tuple[str, int], ...]:
    """Dims vLLM splits over TP ranks that the cache layout does not show (query heads, MLP and expert
    widths): a TP size must divide each, or vLLM cannot load the model."""
    out = []
    for key in ("num_attention_heads", "intermediate_size", "moe_intermediate_size", "shared_expert_intermediate_size"):
        value = cfg.get(key)
        if isinstance(value, (list, tuple)) and key != "num_attention_heads":  # per-layer widths
            out += [(f"{key}[{i}]", _as_int(v, f"{key}[{i}]", name)) for i, v in enumerate(value)]
        elif value is not None:
            out.append((key, _int(cfg, key, name)))
    return tuple(out)


# --------------------------------------------------------------------------------------------------------
# helpers


def _read_json(text: str, where: str) -> dict:
    try:
        # Released Nemotron-H configs carry a bare `Infinity`; Python's json accepts it.
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: not valid JSON ({e})") from e


def _req(cfg: Config, key: str, name: str) -> Any:
    if key not in cfg or cfg[key] is None:
        raise ValueError(f"config of {name!r} is missing key {key!r}")
    return cfg[key]


def _as_int(value: Any, key: str, name: str, lo: int = 1, hi: int = MAX_DIM) -> int:
    """A config integer in [lo, hi]: JSON may spell it 1e8 (a float), never a list, string or bool."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"config of {name!r}: {key}={value!r} must be an integer (got {type(value).__name__})")
    if not lo <= value <= hi:
        raise ValueError(f"config of {name!r}: {key}={value} is outside the accepted range [{lo}, {hi}]")
    return value


def _int(cfg: Config, key: str, name: str, lo: int = 1, hi: int | None = None) -> int:
    if hi is None:
        hi = MAX_LAYERS if key == "num_hidden_layers" else MAX_DIM
    return _as_int(_req(cfg, key, name), key, name, lo, hi)


def _layer_list(cfg: Config, key: str, name: str) -> list:
    value = _req(cfg, key, name)
    if isinstance(value, str) or not isinstance(value, (list, tuple)):
        raise ValueError(f"config of {name!r}: {key} must be a list (got {type(value).__name__})")
    if len(value) > MAX_LAYERS:
        raise ValueError(
            f"config of {name!r}: {key} has {len(value)} entries; at most {MAX_LAYERS} layers are accepted"
        )
    return list(value)


def _model_dtype(cfg: Config, outer: Config) -> str:
    for c in (cfg, outer):
        for key in ("torch_dtype", "dtype"):
            if c.get(key):
                d = normalize_dtype(c[key])
                # vLLM serves float32 checkpoints in bfloat16 ("auto" dtype).
                return "bfloat16" if d == "float32" else d
    return "bfloat16"


def _attn_head_dim(cfg: Config, name: str, *keys: str) -> int:
    for key in keys:
        if cfg.get(key) is not None:
            return _int(cfg, key, name)
    return _int(cfg, "hidden_size", name) // _int(cfg, "num_attention_heads", name)


def _attention(cfg: Config, name: str, dtype: str, *head_dim_keys: str) -> AttentionDims:
    key = "num_key_value_heads" if cfg.get("num_key_value_heads") is not None else "num_attention_heads"
    return AttentionDims(_int(cfg, key, name), _attn_head_dim(cfg, name, *head_dim_keys), dtype)


def _build(
    name: str, arch: str, mixers: list[list[LayerKind]], state: StateDims | None, attn: AttentionDims | None
) -> ModelSpec:
    """`mixers[i]` are the cache-layer kinds of decoder layer i, in vLLM's layer-name order."""
    layers: list[CacheLayer] = []
    suffix = {
        LayerKind.ATTENTION: "self_attn",
        LayerKind.GDN: "linear_attn",
        LayerKind.KDA: "self_attn",
        LayerKind.MAMBA2: "mamba",
        LayerKind.MAMBA1: "mamba",
    }
    for i, kinds in enumerate(mixers):
        for kind in kinds:
            layers.append(CacheLayer(len(layers), f"layers.{i}.{suffix[kind]}", i, kind))
    used = {layer.kind for layer in layers}
    return ModelSpec(
        name=name,
        architecture=arch,
        layers=tuple(layers),
        state=state if state is not None and state.kind in used else None,
        attention=attn if LayerKind.ATTENTION in used else None,
    )


def _mamba2_state(
    cfg: Config,
    name: str,
    conv_dtype: str,
    ssm_dtype: str,
    *,
    heads: str,
    head_dim: str,
    groups: str,
    state: str,
    kernel: str,
    expand: str | None = None,
) -> StateDims:
    n_heads = _int(cfg, heads, name)
    hd = cfg.get(head_dim)
    if hd in (None, "auto"):  # Granite / Bamba allow head_dim = expand * hidden / heads
        hd = _int(cfg, expand or "mamba_expand", name) * _int(cfg, "hidden_size", name) // n_heads
    else:
        hd = _int(cfg, head_dim, name)
    return StateDims(
        kind=LayerKind.MAMBA2,
        conv_kernel=_int(cfg, kernel, name),
        heads=n_heads,
        head_shape=(hd, _int(cfg, state, name)),
        groups=_int(cfg, groups, name),
        group_channels=_int(cfg, state, name),
        conv_dtype=conv_dtype,
        ssm_dtype=ssm_dtype,
    )


# --------------------------------------------------------------------------------------------------------
# families


def _qwen_gdn(config: Config, name: str, arch: str) -> ModelSpec:
    cfg = config.get("text_config") or config
    dtype = _model_dtype(cfg, config)
    n = _int(cfg, "num_hidden_layers", name)
    if cfg.get("layer_types"):
        types = _layer_list(cfg, "layer_types", name)
        if len(types) != n:
            raise ValueError(f"config of {name!r}: layer_types has {len(types)} entries, num_hidden_layers={n}")
    else:
        interval = _int(cfg, "full_attention_interval", name)
        types = ["full_attention" if (i + 1) % interval == 0 else "linear_attention" for i in range(n)]
    mixers = []
    for t in types:
        if t not in ("full_attention", "linear_attention"):
            raise ValueError(f"config of {name!r}: layer type {t!r} (supported: full_attention, linear_attention)")
        mixers.append([LayerKind.ATTENTION if t == "full_attention" else LayerKind.GDN])
    ssm_dtype = normalize_dtype(cfg.get("mamba_ssm_dtype") or config.get("mamba_ssm_dtype") or dtype)
    state = StateDims(
        kind=LayerKind.GDN,
        conv_kernel=_int(cfg, "linear_conv_kernel_dim", name),
        heads=_int(cfg, "linear_num_value_heads", name),
        head_shape=(_int(cfg, "linear_value_head_dim", name), _int(cfg, "linear_key_head_dim", name)),
        groups=_int(cfg, "linear_num_key_heads", name),
        group_channels=_int(cfg, "linear_key_head_dim", name),
        conv_dtype=dtype,
        ssm_dtype=ssm_dtype,
    )
    return _build(name, arch, mixers, state, _attention(cfg, name, dtype, "head_dim"))


def _nemotron_h(cfg: Config, name: str, arch: str) -> ModelSpec:
    dtype = _model_dtype(cfg, cfg)
    if "hybrid_override_pattern" not in cfg and "layers_block_type" in cfg:
        # transformers' NemotronHConfig (what vLLM holds in memory) replaces the pattern with names
        names = {"mamba": "M", "linear_attention": "M", "attention": "*", "full_attention": "*", "mlp": "-", "moe": "E"}
        kinds = _layer_list(cfg, "layers_block_type", name)
        unknown = sorted({k for k in kinds if k not in names})
        if unknown:
            raise ValueError(f"config of {name!r}: layers_block_type has {unknown} (supported: {', '.join(names)})")
        pattern = "".join(names[k] for k in kinds)
    else:
        pattern = _req(cfg, "hybrid_override_pattern", name)
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
    state = _mamba2_state(
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
    attn = _attention(cfg, name, dtype, "head_dim", "attention_head_dim")
    return _build(name, arch, [table[c] for c in pattern], state, attn)


def _mamba2_hf_state(cfg: Config, name: str, dtype: str, heads: str = "mamba_n_heads") -> StateDims:
    return _mamba2_state(
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
    dtype = _model_dtype(cfg, cfg)
    table = {"mamba": [LayerKind.MAMBA2], "attention": [LayerKind.ATTENTION]}
    mixers = []
    for t in _layer_list(cfg, "layer_types", name):
        if t not in table:
            raise ValueError(f"config of {name!r}: layer type {t!r} (supported: mamba, attention)")
        mixers.append(table[t])
    return _build(name, arch, mixers, _mamba2_hf_state(cfg, name, dtype), _attention(cfg, name, dtype, "head_dim"))


def _bamba(cfg: Config, name: str, arch: str) -> ModelSpec:
    dtype = _model_dtype(cfg, cfg)
    attn_idx = set(_layer_list(cfg, "attn_layer_indices", name))
    n = _int(cfg, "num_hidden_layers", name)
    mixers = [[LayerKind.ATTENTION] if i in attn_idx else [LayerKind.MAMBA2] for i in range(n)]
    return _build(name, arch, mixers, _mamba2_hf_state(cfg, name, dtype), _attention(cfg, name, dtype, "head_dim"))


def _falcon_h1(cfg: Config, name: str, arch: str) -> ModelSpec:
    dtype = _model_dtype(cfg, cfg)
    n = _int(cfg, "num_hidden_layers", name)
    state = _mamba2_hf_state(cfg, name, dtype)
    d_ssm = cfg.get("mamba_d_ssm")
    if d_ssm is not None and _int(cfg, "mamba_d_ssm", name) != state.heads * state.head_shape[0]:
        raise ValueError(f"config of {name!r}: mamba_d_ssm={d_ssm} != mamba_n_heads*mamba_d_head")
    # Every decoder layer runs attention and Mamba2 in parallel: two cache layers each.
    mixers = [[LayerKind.MAMBA2, LayerKind.ATTENTION] for _ in range(n)]
    return _build(name, arch, mixers, state, _attention(cfg, name, dtype, "head_dim"))


def _zamba2(cfg: Config, name: str, arch: str) -> ModelSpec:
    dtype = _model_dtype(cfg, cfg)
    table = {"mamba": [LayerKind.MAMBA2], "hybrid": [LayerKind.MAMBA2, LayerKind.ATTENTION]}
    mixers = []
    for t in _layer_list(cfg, "layers_block_type", name):
        if t not in table:
            raise ValueError(f"config of {name!r}: layer block type {t!r} (supported: mamba, hybrid)")
        mixers.append(table[t])
    state = _mamba2_state(
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
    heads = _int(cfg, "num_attention_heads", name)
    if cfg.get("attention_head_dim") is not None:
        head_dim = _int(cfg, "attention_head_dim", name)
    else:
        head_dim = 2 * _int(cfg, "hidden_size", name) // heads
    kv = _int(cfg, "num_key_value_heads", name) if cfg.get("num_key_value_heads") is not None else heads
    attn = AttentionDims(kv, head_dim, dtype)
    return _build(name, arch, mixers, state, attn)


def _jamba(cfg: Config, name: str, arch: str) -> ModelSpec:
    dtype = _model_dtype(cfg, cfg)
    n = _int(cfg, "num_hidden_layers", name)
    period, offset = _int(cfg, "attn_layer_period", name), _int(cfg, "attn_layer_offset", name, lo=0)
    mixers = [[LayerKind.ATTENTION] if i % period == offset else [LayerKind.MAMBA1] for i in range(n)]
    state = StateDims(
        kind=LayerKind.MAMBA1,
        conv_kernel=_int(cfg, "mamba_d_conv", name),
        heads=_int(cfg, "mamba_expand", name) * _int(cfg, "hidden_size", name),
        head_shape=(_int(cfg, "mamba_d_state", name),),
        conv_dtype=dtype,
        ssm_dtype=normalize_dtype(cfg.get("mamba_ssm_cache_dtype") or dtype),
    )
    return _build(name, arch, mixers, state, _attention(cfg, name, dtype))


def _kda_state(cfg: Config, name: str, dtype: str, heads: str, head_dim: str, kernel: str) -> StateDims:
    """vLLM's kda_state_shape: conv over [q | k | v] (H*hd channels each), recurrent state (H, hd, hd),
    float32 unless `mamba_ssm_cache_dtype` says otherwise (kda_state_dtype's "auto")."""
    h, hd = _int(cfg, heads, name), _int(cfg, head_dim, name)
    return StateDims(
        kind=LayerKind.KDA,
        conv_kernel=_int(cfg, kernel, name),
        heads=h,
        head_shape=(hd, hd),
        groups=h,
        group_channels=hd,
        conv_dtype=dtype,
        ssm_dtype=normalize_dtype(cfg.get("mamba_ssm_cache_dtype") or "float32"),
    )


def _mla(cfg: Config, name: str, dtype: str) -> AttentionDims:
    """vLLM's MLA cache: one latent of kv_lora_rank + qk_rope_head_dim per token, whole on every rank."""
    width = _int(cfg, "kv_lora_rank", name) + _int(cfg, "qk_rope_head_dim", name, lo=0)
    return AttentionDims(1, width, dtype, latent=True)


def _kimi_linear(config: Config, name: str, arch: str) -> ModelSpec:
    cfg = config.get("text_config") or config
    dtype = _model_dtype(cfg, config)
    n = _int(cfg, "num_hidden_layers", name)
    lac = _req(cfg, "linear_attn_config", name)
    if not isinstance(lac, Mapping):
        raise ValueError(f"config of {name!r}: linear_attn_config must be an object, got {type(lac).__name__}")
    where = f"{name}' linear_attn_config"
    sets = {}
    for key in ("kda_layers", "full_attn_layers"):
        entries = _layer_list(lac, key, where) if key == "kda_layers" or key in lac else []
        sets[key] = {_as_int(v, f"{key}[{i}]", name, 1, n) for i, v in enumerate(entries)}  # 1-based, as published
    both = sorted(sets["kda_layers"] & sets["full_attn_layers"])
    if both:
        raise ValueError(f"config of {name!r}: layers {both} are in both kda_layers and full_attn_layers")
    # vLLM (KimiLinearConfig.is_kda_layer): layer i is KDA iff i + 1 is in kda_layers, else MLA
    mixers = [[LayerKind.KDA] if i + 1 in sets["kda_layers"] else [LayerKind.ATTENTION] for i in range(n)]
    state = _kda_state(lac, where, dtype, "num_heads", "head_dim", "short_conv_kernel_size")
    return _build(name, arch, mixers, state, _mla(cfg, name, dtype))


def _bailing_v3(cfg: Config, name: str, arch: str) -> ModelSpec:
    dtype = _model_dtype(cfg, cfg)
    n, g = _int(cfg, "num_hidden_layers", name), _int(cfg, "layer_group_size", name)
    # vLLM's _is_kda_layer: the last layer of each group, and every layer past the last whole group, are MLA
    mixers = [[LayerKind.ATTENTION] if (i + 1) % g == 0 or i >= n // g * g else [LayerKind.KDA] for i in range(n)]
    state = _kda_state(cfg, name, dtype, "num_attention_heads", "head_dim", "short_conv_kernel_size")
    return _build(name, arch, mixers, state, _mla(cfg, name, dtype))


_PARSERS: dict[str, Callable[[Config, str, str], ModelSpec]] = {
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
