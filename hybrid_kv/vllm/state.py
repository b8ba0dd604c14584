"""hybrid-kv's view of one vLLM rank's recurrent state: which vLLM layer is which hybrid-kv layer, where
each Mamba layer's pages sit in vLLM's single backing allocation, and the segment tables that gather a
request's state slices for one decode rank into one contiguous chunk (prefill) or scatter it back
(decode).

vLLM aliases its KV cache groups from byte 0 of one buffer (reference §2.3): the page of Mamba layer `n`
for block `b` sits at `offset(n) + b * stride(n)`, where `offset`/`stride` are read from the layer's own
tensor view, so nothing here re-derives vLLM's allocator. Every Mamba layer of a model shares one state
geometry, so a (prefill rank -> decode rank) pair needs one *template* (the hybrid-kv plan's pieces of
one state layer); a request's chunk is the template repeated for each (group, block, layer) in the
order both sides compute from the same layer names.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from hybrid_kv.layout import RankLayout, cdiv
from hybrid_kv.oracle import TORCH_DTYPES
from hybrid_kv.plan import STAGING_ALIGN, PackedLayout, TransferPlan
from hybrid_kv.spec import LayerKind, ModelSpec
from hybrid_kv.spec_hf import spec_from_config

_DTYPE_NAMES = {v: k for k, v in TORCH_DTYPES.items()}


def _dtype_name(dt: torch.dtype, what: str) -> str:
    if dt not in _DTYPE_NAMES:
        raise ValueError(f"{what} dtype {dt} is not supported by hybrid-kv (supported: {', '.join(TORCH_DTYPES)})")
    return _DTYPE_NAMES[dt]


def _layer_index(name: str) -> int:
    for part in name.split("."):
        if part.isdigit():
            return int(part)
    raise ValueError(f"vLLM layer name {name!r} carries no layer index")


def flat_storage(t: torch.Tensor) -> torch.Tensor:
    """The whole storage behind `t` as one flat uint8 tensor (vLLM views one backing buffer per rank)."""
    st = t.untyped_storage()
    return torch.empty(0, dtype=torch.uint8, device=t.device).set_(st, 0, (st.nbytes(),), (1,))


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


@dataclass(frozen=True)
class StateLayer:
    name: str  # vLLM layer name
    index: int  # hybrid-kv layer index
    group: int  # vLLM transfer group
    offset: int  # byte offset of block 0's page in the rank's backing storage
    stride: int  # bytes between consecutive blocks' pages


class StateGeometry:
    """One rank's Mamba layers in vLLM's memory, checked against hybrid-kv's page anatomy."""

    def __init__(
        self,
        spec: ModelSpec,
        layout: RankLayout,
        groups: Sequence[tuple[int, Sequence[str]]],
        kv_caches: Mapping[str, torch.Tensor],
        layer_specs: Mapping[str, object],
        num_blocks: int,
    ) -> None:
        self.spec, self.layout, self.num_blocks = spec, layout, num_blocks
        state_idx = [layer.index for layer in spec.layers if layer.kind is not LayerKind.ATTENTION]
        names = sorted((n for _, ns in groups for n in ns), key=lambda n: (_layer_index(n), n))
        if len(names) != len(state_idx):
            raise ValueError(
                f"vLLM has {len(names)} Mamba layers but {spec.name} has {len(state_idx)} state layers "
                "in hybrid-kv's spec"
            )
        index_of = dict(zip(names, state_idx))
        storage = {t.untyped_storage().data_ptr() for n, t in kv_caches.items() if n in index_of}
        if len(storage) != 1:
            raise ValueError(f"Mamba layers live in {len(storage)} allocations; vLLM's layout has exactly one")
        self.storage = flat_storage(kv_caches[names[0]])
        base = self.storage.data_ptr()
        want_conv = (
            (layout.conv_channels, layout.conv_rows)
            if layout.conv_layout == "DS"
            else (layout.conv_rows, layout.conv_channels)
        )
        want_ssm = (layout.ssm_shard.size, *spec.state.head_shape)
        self.layers: list[StateLayer] = []
        for g, ns in groups:
            for n in ns:
                vs = layer_specs[n]
                if len(vs.shapes) != 2:
                    raise ValueError(f"{n}: {len(vs.shapes)} state tensors; hybrid-kv moves conv + SSM only")
                got = (tuple(vs.shapes[0]), tuple(vs.shapes[1]))
                if got != (want_conv, want_ssm):
                    raise ValueError(
                        f"{n}: vLLM's state shapes {got} differ from hybrid-kv's {(want_conv, want_ssm)} "
                        f"for {spec.name} at TP {layout.tp_size} ({layout.conv_layout})"
                    )
                t = kv_caches[n]
                stride = t.stride(0) * t.element_size()
                if stride < layout.state_bytes:
                    raise ValueError(f"{n}: page stride {stride} B < state bytes {layout.state_bytes}")
                self.layers.append(StateLayer(n, index_of[n], g, t.data_ptr() - base, stride))
        self.groups = [g for g, _ in groups]

    def fingerprint(self) -> dict:
        return {
            **self.layout.fingerprint(),
            "block_size": None,  # vLLM's, checked by its own handshake
            "page_bytes": None,
            "state_layers": [[s.group, s.name] for s in self.layers],
        }

    def order(self, blocks: Mapping[int, Sequence[int]]) -> list[tuple[StateLayer, int]]:
        """(layer, block) of a request's chunk, in the order both sides use."""
        out = []
        for g in self.groups:
            for b in blocks.get(g, ()):
                out += [(s, b) for s in self.layers if s.group == g]
        return out

    def check_blocks(self, blocks: Mapping[int, Sequence[int]], side: str) -> None:
        for g, ids in blocks.items():
            if g not in self.groups:
                raise ValueError(f"{side} group {g} is not a Mamba group (Mamba groups: {self.groups})")
            for b in ids:
                if not isinstance(b, int) or isinstance(b, bool) or not 0 <= b < self.num_blocks:
                    raise ValueError(f"{side} block id {b!r} of group {g} out of range [0, {self.num_blocks})")


@dataclass(frozen=True)
class Unit:
    """One transfer unit of a request's chunk: layer slots [first, stop) -> `nbytes` of staging."""

    first: int
    stop: int
    nbytes: int


class PairTemplate:
    """The pieces of one state layer for one (prefill rank -> decode rank) pair, packed end to end."""

    def __init__(self, plan: TransferPlan, src_rank: int, dst_rank: int, max_unit_bytes: int) -> None:
        first = next(layer.index for layer in plan.spec.layers if layer.kind is not LayerKind.ATTENTION)
        pieces = [p for p in plan.pairs.get((src_rank, dst_rank), []) if p.layer == first]
        lay = PackedLayout.of(pieces, 1 << 62)
        self.pieces = lay.pieces
        self.stride = cdiv(lay.nbytes, STAGING_ALIGN) * STAGING_ALIGN  # bytes per layer slot
        if self.stride > max_unit_bytes:
            raise ValueError(
                f"one layer's state for rank {src_rank} -> {dst_rank} is {self.stride} B, more than the "
                f"transfer unit budget hybrid_kv_max_unit_bytes={max_unit_bytes}"
            )
        self.per_unit = max(1, max_unit_bytes // self.stride) if self.stride else 1
        cols = ("src_off", "dst_off", "rows", "row_bytes", "src_stride", "dst_stride")
        arr = np.array(
            [
                (p.src.offset, p.dst.offset, p.src.rows, p.src.row_bytes, p.src.stride, p.dst.stride)
                for p in self.pieces
            ],
            dtype=np.int64,
        ).reshape(-1, len(cols))
        self.a = dict(zip(cols, arr.T))
        self.stage_off = np.array(lay.offsets, dtype=np.int64)

    def units(self, n_slots: int) -> list[Unit]:
        k = self.per_unit
        return [Unit(i, min(i + k, n_slots), (min(i + k, n_slots) - i) * self.stride) for i in range(0, n_slots, k)]

    def _rows(self, slots: Sequence[tuple[StateLayer, int]], stage_base: int, prefill: bool) -> np.ndarray:
        a = self.a
        page = np.array([s.offset + b * s.stride for s, b in slots], dtype=np.int64)
        stage = stage_base + np.arange(len(slots), dtype=np.int64) * self.stride
        cache = (page[:, None] + (a["src_off"] if prefill else a["dst_off"])[None, :]).reshape(-1)
        stg = (stage[:, None] + self.stage_off[None, :]).reshape(-1)
        n = len(slots)
        rows, rb = np.tile(a["rows"], n), np.tile(a["row_bytes"], n)
        stride = np.tile(a["src_stride"] if prefill else a["dst_stride"], n)
        if prefill:  # cache -> staging
            return np.stack([cache, stg, rows, rb, stride, rb], axis=1)
        return np.stack([stg, cache, rows, rb, rb, stride], axis=1)  # staging -> cache

    def pack_table(self, slots: Sequence[tuple[StateLayer, int]], stage_base: int) -> np.ndarray:
        return self._rows(slots, stage_base, prefill=True)

    def unpack_table(self, slots: Sequence[tuple[StateLayer, int]], stage_base: int) -> np.ndarray:
        return self._rows(slots, stage_base, prefill=False)


@dataclass
class PlanCache:
    """Templates per (prefill TP, decode TP, src, dst), built once from hybrid-kv's plan."""

    spec: ModelSpec
    conv_layout: str
    max_unit_bytes: int

    _memo: dict = field(default_factory=dict, init=False, repr=False)

    def plan(self, prefill_tp: int, decode_tp: int) -> TransferPlan:
        key = (prefill_tp, decode_tp)
        if key not in self._memo:
            self._memo[key] = TransferPlan.build(self.spec, prefill_tp, decode_tp, 0, conv_layout=self.conv_layout)
        return self._memo[key]

    def template(self, prefill_tp: int, decode_tp: int, src: int, dst: int) -> PairTemplate:
        key = (prefill_tp, decode_tp, src, dst)
        if key not in self._memo:
            self._memo[key] = PairTemplate(self.plan(prefill_tp, decode_tp), src, dst, self.max_unit_bytes)
        return self._memo[key]
