"""Build a `ModelSpec` from a Hugging Face `config.json` (a path, a dict, or a shipped preset name).

State dtypes follow vLLM 0.32's defaults: conv = model dtype; SSM = model dtype, except Qwen3.5's
`mamba_ssm_dtype` and Nemotron-H's float32 (`mamba_ssm_cache_dtype` when the config sets it).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from importlib import resources
from pathlib import Path

from hybrid_kv.spec import ModelSpec
from hybrid_kv.spec_families import PARSERS
from hybrid_kv.spec_fields import MAX_DIM, MAX_LAYERS, Config, as_int, int_field, read_json

__all__ = ["MAX_DIM", "MAX_LAYERS", "list_presets", "load_config", "load_spec", "spec_from_config"]


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
        return name, read_json(path.read_text(), str(path))
    presets = list_presets()
    if str(model) in presets:
        text = (resources.files("hybrid_kv") / "presets" / f"{model}.json").read_text()
        return str(model), read_json(text, f"preset {model}")
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
        raise ValueError(f"config of {name!r} has no 'architectures' entry (supported: {', '.join(sorted(PARSERS))})")
    arch = archs[0]
    parser = PARSERS.get(arch)
    if parser is None:
        raise ValueError(f"unknown architecture {arch!r} in {name!r} (supported: {', '.join(sorted(PARSERS))})")
    spec = parser(config, name, arch)
    return dataclasses.replace(spec, sharded=_sharded_dims(config.get("text_config") or config, name))


def _sharded_dims(cfg: Config, name: str) -> tuple[tuple[str, int], ...]:
    """Dims vLLM splits over TP ranks that the cache layout does not show (query heads, MLP and expert
    widths): a TP size must divide each, or vLLM cannot load the model."""
    out = []
    for key in ("num_attention_heads", "intermediate_size", "moe_intermediate_size", "shared_expert_intermediate_size"):
        value = cfg.get(key)
        if isinstance(value, (list, tuple)) and key != "num_attention_heads":  # per-layer widths
            out += [(f"{key}[{i}]", as_int(v, f"{key}[{i}]", name)) for i, v in enumerate(value)]
        elif value is not None:
            out.append((key, int_field(cfg, key, name)))
    return tuple(out)
