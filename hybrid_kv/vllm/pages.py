"""What vLLM allocated, in hybrid-kv's terms: the model spec with vLLM's cache dtypes (`model_spec`). Where
its pages are: `hybrid_kv.mover.geometry` (`StateGeometry`, `attention_pages`)."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from hybrid_kv.dtypes import TORCH_DTYPES
from hybrid_kv.spec import ModelSpec
from hybrid_kv.spec_hf import spec_from_config

_DTYPE_NAMES = {v: k for k, v in TORCH_DTYPES.items()}


def _dtype_name(dt: torch.dtype, what: str) -> str:
    if dt not in _DTYPE_NAMES:
        raise ValueError(f"{what} dtype {dt} is not supported by hybrid-kv (supported: {', '.join(TORCH_DTYPES)})")
    return _DTYPE_NAMES[dt]


def model_spec(hf_config: Mapping, mamba_spec, attn_spec, name: str) -> ModelSpec:
    """hybrid-kv's ModelSpec of a vLLM model: parsed from its HF config, with the cache dtypes and the
    speculative conv rows vLLM actually allocated (taken from its own MambaSpec / FullAttentionSpec)."""
    spec = spec_from_config(dict(hf_config), name=name)
    if spec.state is None:
        raise ValueError(f"{name}: hybrid-kv found no recurrent-state layers in this model")
    spec = spec.with_dtypes(
        conv_dtype=_dtype_name(mamba_spec.dtypes[0], "conv state"),
        ssm_dtype=_dtype_name(mamba_spec.dtypes[1], "SSM state"),
        kv_dtype=_dtype_name(attn_spec.dtype, "attention KV") if attn_spec is not None else None,
    )
    rows = min(mamba_spec.shapes[0])  # conv rows = kernel - 1 + num_spec in either conv layout
    extra = rows - spec.state.conv_rows
    if extra > 0:
        spec = spec.with_num_spec(extra)
    return spec
