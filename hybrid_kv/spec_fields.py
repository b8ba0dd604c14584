"""Reading Hugging Face config fields: typed, range-checked, with messages naming the key and the model.
Shared by the family parsers (`spec_families`) and `spec_hf`."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from hybrid_kv.spec import AttentionDims, CacheLayer, LayerKind, ModelSpec, StateDims, normalize_dtype

Config = Mapping[str, Any]

MAX_LAYERS = 4096  # decoder layers (released hybrid models have at most a few hundred)
MAX_DIM = 1 << 20  # any one head count, head or state dim, kernel or hidden size


def read_json(text: str, where: str) -> dict:
    try:
        # Released Nemotron-H configs carry a bare `Infinity`; Python's json accepts it.
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: not valid JSON ({e})") from e


def req(cfg: Config, key: str, name: str) -> Any:
    if key not in cfg or cfg[key] is None:
        raise ValueError(f"config of {name!r} is missing key {key!r}")
    return cfg[key]


def as_int(value: Any, key: str, name: str, lo: int = 1, hi: int = MAX_DIM) -> int:
    """A config integer in [lo, hi]: JSON may spell it 1e8 (a float), never a list, string or bool."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"config of {name!r}: {key}={value!r} must be an integer (got {type(value).__name__})")
    if not lo <= value <= hi:
        raise ValueError(f"config of {name!r}: {key}={value} is outside the accepted range [{lo}, {hi}]")
    return value


def int_field(cfg: Config, key: str, name: str, lo: int = 1, hi: int | None = None) -> int:
    if hi is None:
        hi = MAX_LAYERS if key == "num_hidden_layers" else MAX_DIM
    return as_int(req(cfg, key, name), key, name, lo, hi)


def layer_list(cfg: Config, key: str, name: str) -> list:
    value = req(cfg, key, name)
    if isinstance(value, str) or not isinstance(value, (list, tuple)):
        raise ValueError(f"config of {name!r}: {key} must be a list (got {type(value).__name__})")
    if len(value) > MAX_LAYERS:
        raise ValueError(
            f"config of {name!r}: {key} has {len(value)} entries; at most {MAX_LAYERS} layers are accepted"
        )
    return list(value)


def model_dtype(cfg: Config, outer: Config) -> str:
    for c in (cfg, outer):
        for key in ("torch_dtype", "dtype"):
            if c.get(key):
                d = normalize_dtype(c[key])
                # vLLM serves float32 checkpoints in bfloat16 ("auto" dtype).
                return "bfloat16" if d == "float32" else d
    return "bfloat16"


def attn_head_dim(cfg: Config, name: str, *keys: str) -> int:
    for key in keys:
        if cfg.get(key) is not None:
            return int_field(cfg, key, name)
    return int_field(cfg, "hidden_size", name) // int_field(cfg, "num_attention_heads", name)


def attention(cfg: Config, name: str, dtype: str, *head_dim_keys: str) -> AttentionDims:
    key = "num_key_value_heads" if cfg.get("num_key_value_heads") is not None else "num_attention_heads"
    return AttentionDims(int_field(cfg, key, name), attn_head_dim(cfg, name, *head_dim_keys), dtype)


def build(
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


def mamba2_state(
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
    n_heads = int_field(cfg, heads, name)
    hd = cfg.get(head_dim)
    if hd in (None, "auto"):  # Granite / Bamba allow head_dim = expand * hidden / heads
        hd = int_field(cfg, expand or "mamba_expand", name) * int_field(cfg, "hidden_size", name) // n_heads
    else:
        hd = int_field(cfg, head_dim, name)
    return StateDims(
        kind=LayerKind.MAMBA2,
        conv_kernel=int_field(cfg, kernel, name),
        heads=n_heads,
        head_shape=(hd, int_field(cfg, state, name)),
        groups=int_field(cfg, groups, name),
        group_channels=int_field(cfg, state, name),
        conv_dtype=conv_dtype,
        ssm_dtype=ssm_dtype,
    )
