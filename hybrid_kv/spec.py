"""Model specs: the cache-relevant geometry of a hybrid model, independent of TP.

A `ModelSpec` lists the model's *cache layers* (one per attention or state mixer; Falcon-H1 has two per
decoder layer) and the global, unsharded dimensions of the recurrent state and the attention KV. Every
state layer of a model shares one geometry (true of every released hybrid model, and assumed by vLLM).

Pure Python: nothing here imports torch. Parsing Hugging Face configs lives in `spec_hf.py`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from enum import Enum

# Dtypes the caches may hold, by canonical name -> bytes per element.
DTYPE_SIZES: dict[str, int] = {
    "float32": 4,
    "bfloat16": 2,
    "float16": 2,
    "float8_e4m3fn": 1,
    "float8_e5m2": 1,
}
_DTYPE_ALIASES = {
    "fp32": "float32",
    "float": "float32",
    "bf16": "bfloat16",
    "fp16": "float16",
    "half": "float16",
    "fp8": "float8_e4m3fn",
    "fp8_e4m3": "float8_e4m3fn",
    "fp8_e5m2": "float8_e5m2",
}


def normalize_dtype(name: str) -> str:
    """Canonical dtype name for `name` ("torch.bfloat16", "bf16", "bfloat16" -> "bfloat16")."""
    key = str(name).strip().lower().removeprefix("torch.")
    key = _DTYPE_ALIASES.get(key, key)
    if key not in DTYPE_SIZES:
        raise ValueError(f"unsupported dtype {name!r} (supported: {', '.join(sorted(DTYPE_SIZES))})")
    return key


class LayerKind(str, Enum):
    GDN = "gdn"
    KDA = "kda"  # Kimi Delta Attention (Kimi-Linear, BailingMoeV3): GDN's page anatomy, one head count
    MAMBA2 = "mamba2"
    MAMBA1 = "mamba1"
    ATTENTION = "attention"

    @property
    def is_state(self) -> bool:
        return self is not LayerKind.ATTENTION


@dataclass(frozen=True)
class SubProjection:
    """One channel block of the conv state: x, B, C (Mamba2), q, k, v (GDN, KDA) or x (Mamba1).

    The block is sharded over TP in whole `units` of `unit_channels` channels each (heads for x/v,
    groups for B/C/q/k, single channels for Mamba1's x).
    """

    name: str  # "x" | "B" | "C" | "q" | "k" | "v"
    units: int  # global number of shardable units
    unit_channels: int  # channels per unit
    replicate_single_unit: bool = False  # Mamba2 B/C: n_groups == 1 is copied to every rank

    @property
    def channels(self) -> int:
        return self.units * self.unit_channels


@dataclass(frozen=True)
class StateDims:
    """Global dims of one recurrent-state layer (shared by all state layers of a model).

    The SSM state is `heads` units of `head_shape` elements: Mamba2 `(H, hd, N)`, GDN `(nv, dv, dk)`,
    KDA `(H, hd, hd)`, Mamba1 `(I, N)`. Its head axis is split across TP like the x / v sub-projection.
    """

    kind: LayerKind
    conv_kernel: int  # K; the conv state keeps K-1 (+ speculative) rows
    heads: int  # H (Mamba2), num_v_heads (GDN), intermediate size I (Mamba1)
    head_shape: tuple[int, ...]  # (hd, N) | (dv, dk) | (N,)
    groups: int = 0  # n_groups (Mamba2), num_k_heads (GDN), num_heads (KDA), 0 (Mamba1)
    group_channels: int = 0  # N (Mamba2), dk (GDN), head_dim (KDA)
    conv_dtype: str = "bfloat16"
    ssm_dtype: str = "bfloat16"
    num_spec: int = 0  # speculative tokens: extra conv rows (not for Mamba1)

    def __post_init__(self) -> None:
        if self.num_spec < 0:
            raise ValueError(f"num_spec={self.num_spec} must be >= 0 (speculative tokens)")
        for field in ("conv_kernel", "heads"):
            if getattr(self, field) < 1:
                raise ValueError(f"{self.kind.value} {field}={getattr(self, field)} must be >= 1")
        if self.conv_kernel < 2:
            raise ValueError(f"conv_kernel={self.conv_kernel} must be >= 2 (the state keeps K-1 rows)")
        if self.kind is not LayerKind.MAMBA1 and (self.groups < 1 or self.group_channels < 1):
            raise ValueError(f"{self.kind.value} needs groups >= 1 and group_channels >= 1")
        object.__setattr__(self, "conv_dtype", normalize_dtype(self.conv_dtype))
        object.__setattr__(self, "ssm_dtype", normalize_dtype(self.ssm_dtype))

    @property
    def head_elems(self) -> int:
        n = 1
        for d in self.head_shape:
            n *= d
        return n

    @property
    def conv_rows(self) -> int:
        """Rows of the conv state: K-1 plus speculative rows (Mamba1 has none)."""
        spec = 0 if self.kind is LayerKind.MAMBA1 else self.num_spec
        return self.conv_kernel - 1 + spec

    @property
    def subprojections(self) -> tuple[SubProjection, ...]:
        if self.kind is LayerKind.MAMBA2:
            hd, n = self.head_shape
            return (
                SubProjection("x", self.heads, hd),
                SubProjection("B", self.groups, n, replicate_single_unit=True),
                SubProjection("C", self.groups, n, replicate_single_unit=True),
            )
        if self.kind in (LayerKind.GDN, LayerKind.KDA):
            # vLLM's KDA conv state is one fused [q | k | v] buffer, each H*hd channels (kda_state_shape)
            dv, dk = self.head_shape
            return (
                SubProjection("q", self.groups, dk),
                SubProjection("k", self.groups, dk),
                SubProjection("v", self.heads, dv),
            )
        return (SubProjection("x", self.heads, 1),)

    @property
    def conv_channels(self) -> int:
        return sum(s.channels for s in self.subprojections)


@dataclass(frozen=True)
class AttentionDims:
    """Global dims of a full-attention layer's paged KV (K and V packed per token, vLLM style).

    `latent`: multi-head latent attention (MLA: Kimi-Linear, BailingMoeV3). vLLM caches one vector of
    `kv_lora_rank + qk_rope_head_dim` elements per token, no separate V, as one "head" that every TP
    rank holds whole (MLAAttentionSpec: num_kv_heads 1, head_size_v 0).
    """

    num_kv_heads: int
    head_dim: int
    dtype: str = "bfloat16"
    latent: bool = False

    def __post_init__(self) -> None:
        if self.num_kv_heads < 1 or self.head_dim < 1:
            raise ValueError(f"attention num_kv_heads={self.num_kv_heads}, head_dim={self.head_dim} must be >= 1")
        if self.latent and self.num_kv_heads != 1:
            raise ValueError(f"latent (MLA) attention caches one head per token, got num_kv_heads={self.num_kv_heads}")
        object.__setattr__(self, "dtype", normalize_dtype(self.dtype))

    @property
    def token_elems(self) -> int:
        """Elements of one token of one head: K then V (MLA: the one latent vector)."""
        return (1 if self.latent else 2) * self.head_dim

    @property
    def token_head_bytes(self) -> int:
        return self.token_elems * DTYPE_SIZES[self.dtype]


@dataclass(frozen=True)
class CacheLayer:
    index: int  # position among the model's cache layers
    name: str  # e.g. "layers.3.linear_attn"
    decoder_layer: int
    kind: LayerKind


@dataclass(frozen=True)
class ModelSpec:
    name: str
    architecture: str
    layers: tuple[CacheLayer, ...]
    state: StateDims | None
    attention: AttentionDims | None
    # other dims vLLM splits over TP (query heads, MLP / expert widths): (config key, value)
    sharded: tuple[tuple[str, int], ...] = ()

    def __post_init__(self) -> None:
        kinds = {layer.kind for layer in self.layers}
        if not self.layers:
            raise ValueError(f"model {self.name!r} has no cache layers")
        state_kinds = {k for k in kinds if k.is_state}
        if len(state_kinds) > 1:
            raise ValueError(f"model {self.name!r} mixes state layer kinds {sorted(k.value for k in state_kinds)}")
        if state_kinds and (self.state is None or self.state.kind not in state_kinds):
            raise ValueError(f"model {self.name!r}: state layers {state_kinds} need matching StateDims")
        if LayerKind.ATTENTION in kinds and self.attention is None:
            raise ValueError(f"model {self.name!r}: attention layers need AttentionDims")
        for i, layer in enumerate(self.layers):
            if layer.index != i:
                raise ValueError(f"cache layer {layer.name!r} has index {layer.index}, expected {i}")

    @property
    def state_layers(self) -> tuple[CacheLayer, ...]:
        return tuple(layer for layer in self.layers if layer.kind.is_state)

    @property
    def attention_layers(self) -> tuple[CacheLayer, ...]:
        return tuple(layer for layer in self.layers if layer.kind is LayerKind.ATTENTION)

    def with_dtypes(
        self, *, conv_dtype: str | None = None, ssm_dtype: str | None = None, kv_dtype: str | None = None
    ) -> ModelSpec:
        """A copy with cache dtypes overridden (None keeps the current one)."""
        state, attn = self.state, self.attention
        if state is not None and (conv_dtype or ssm_dtype):
            state = dataclasses.replace(
                state, conv_dtype=conv_dtype or state.conv_dtype, ssm_dtype=ssm_dtype or state.ssm_dtype
            )
        if attn is not None and kv_dtype:
            attn = dataclasses.replace(attn, dtype=kv_dtype)
        return dataclasses.replace(self, state=state, attention=attn)

    def with_num_spec(self, num_spec: int) -> ModelSpec:
        if self.state is None:
            return self
        return dataclasses.replace(self, state=dataclasses.replace(self.state, num_spec=num_spec))

    def truncated(self, max_state: int, max_attention: int) -> ModelSpec:
        """Keep the first `max_state` state and `max_attention` attention layers (for quick tests)."""
        keep, n_state, n_attn = [], 0, 0
        for layer in self.layers:
            if layer.kind.is_state and n_state < max_state:
                n_state += 1
            elif layer.kind is LayerKind.ATTENTION and n_attn < max_attention:
                n_attn += 1
            else:
                continue
            keep.append(dataclasses.replace(layer, index=len(keep)))
        return dataclasses.replace(self, layers=tuple(keep))

    def fingerprint(self) -> dict:
        """Everything that shapes a page, as plain data (for handshakes and mismatch messages)."""
        return {
            "model": self.name,
            "architecture": self.architecture,
            "layer_kinds": [layer.kind.value for layer in self.layers],
            "state": None if self.state is None else _plain(dataclasses.asdict(self.state)),
            "attention": None if self.attention is None else dataclasses.asdict(self.attention),
        }


def _plain(d: dict) -> dict:
    return {k: (v.value if isinstance(v, Enum) else list(v) if isinstance(v, tuple) else v) for k, v in d.items()}
