"""Segment tables (see `hybrid_kv.batch`) between two flat byte buffers, and the backend choice.

`copy_segments` / `Prepared` execute a plan's absolute segment tables with torch strided copies: the
plan-level reference of the harness (`run_packed`, `run_strided`) and of the round-trip tests. The shipped
copy, which both shells and `hybrid-kv repack` launch, is the staging copier's slot-copy kernel
(`hybrid_kv.staging.copier`, `hybrid_kv.kernels.slot_copy`).

Backend selection for that copier: the ``backend`` argument, else ``HYBRID_KV_BACKEND=triton|torch``, else
triton for CUDA tensors and torch for CPU tensors. A backend that cannot run is an error, never a silent
fallback.
"""

from __future__ import annotations

import os

import numpy as np
import torch

BACKENDS = ("triton", "torch")
ENV_BACKEND = "HYBRID_KV_BACKEND"


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    """A flat uint8 view of a contiguous tensor (never a copy: writes must land in `t`)."""
    if not t.is_contiguous():
        raise ValueError(f"buffer of shape {tuple(t.shape)} is not contiguous; pass a contiguous tensor")
    return t.view(torch.uint8).reshape(-1) if t.dtype != torch.uint8 else t.reshape(-1)


def resolve_backend(backend: str | None, device: torch.device) -> str:
    name = backend or os.environ.get(ENV_BACKEND) or ("triton" if device.type == "cuda" else "torch")
    if name not in BACKENDS:
        raise ValueError(f"backend {name!r} (from {'argument' if backend else ENV_BACKEND}) is not one of {BACKENDS}")
    if name == "triton":
        try:
            import triton  # noqa: F401
        except ImportError as e:
            raise RuntimeError("backend 'triton' needs the triton package: pip install 'hybrid-kv[triton]'") from e
        if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError(
                "backend 'triton' on CPU tensors needs TRITON_INTERPRET=1 set before hybrid_kv is imported "
                "(or use backend 'torch')"
            )
    return name


def check_table(table: np.ndarray | torch.Tensor, src_bytes: int, dst_bytes: int) -> np.ndarray:
    """Validate a segment table against both buffers before any byte is written."""
    t = table.cpu().numpy() if isinstance(table, torch.Tensor) else np.asarray(table)
    if t.ndim != 2 or t.shape[1] != 6:
        raise ValueError(f"segment table must have shape (n, 6), got {t.shape}")
    t = t.astype(np.int64, copy=False)
    if len(t) == 0:
        return t
    src, dst, rows, rb, ss, ds = t.T
    for name, col in (
        ("src_offset", src),
        ("dst_offset", dst),
        ("rows", rows),
        ("row_bytes", rb),
        ("src_stride", ss),
        ("dst_stride", ds),
    ):
        if (col < 0).any():
            i = int(np.argmax(col < 0))
            raise ValueError(f"segment {i}: {name}={int(col[i])} is negative (offsets, rows and strides must be >= 0)")
    nonempty = (rows > 0) & (rb > 0)
    # Bounds without int64 overflow: every term is checked against the buffer before it is multiplied.
    for what, buf, off, stride, size in (
        ("reads", "source", src, ss, src_bytes),
        ("writes", "destination", dst, ds, dst_bytes),
    ):
        room = size - rb  # >= 0 needed; then off <= room, then (rows - 1) * stride <= room - off
        bad = nonempty & ((rb > size) | (off > room))
        left = np.where(bad | ~nonempty, 0, room - off)
        fits = np.where(stride > 0, (rows - 1) <= left // np.maximum(stride, 1), True)
        bad |= nonempty & ~fits
        if bad.any():
            i = int(np.argmax(bad))
            end = int(off[i]) + (int(rows[i]) - 1) * int(stride[i]) + int(rb[i])  # Python ints: no wrap
            raise ValueError(f"segment {i} {what} up to byte {end} of a {size}-byte {buf}")
    return t


class Prepared:
    """A validated segment table bound to one (src, dst) buffer pair and a backend: prepare once per
    batch (validation, tiling, host->device table upload), then launch as often as needed."""

    def __init__(self, src: torch.Tensor, dst: torch.Tensor, table, *, backend: str | None = None) -> None:
        s, d = as_bytes(src), as_bytes(dst)
        if s.device != d.device:
            raise ValueError(f"source on {s.device} but destination on {d.device}")
        self.table = check_table(table, s.numel(), d.numel())
        if backend not in (None, "torch"):
            raise ValueError(
                f"backend={backend!r}: segment tables run on torch only (the plan-level reference); the "
                "Triton kernel runs through the staging copier (Harness.run_staged, hybrid-kv repack)"
            )
        self.backend = "torch"
        self.segments = len(self.table)
        self._shape = (s.data_ptr(), s.numel(), d.data_ptr(), d.numel())

    def __call__(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        s, d = as_bytes(src), as_bytes(dst)
        if (s.data_ptr(), s.numel(), d.data_ptr(), d.numel()) != self._shape:
            raise ValueError("prepared segment table launched on other buffers than it was prepared for")
        if self.segments:
            _copy_torch(s, d, self.table)


def copy_segments(
    src: torch.Tensor, dst: torch.Tensor, table: np.ndarray | torch.Tensor, *, backend: str | None = None
) -> None:
    """dst[dst_off + r*dst_stride : +row_bytes] = src[src_off + r*src_stride : +row_bytes] for every row.

    The whole table is validated before any byte is written."""
    Prepared(src, dst, table, backend=backend)(src, dst)


def pack(cache: torch.Tensor, staging: torch.Tensor, table: np.ndarray, *, backend: str | None = None) -> None:
    """Gather: cache pages -> contiguous staging (a `BatchPlan.pack_table`)."""
    copy_segments(cache, staging, table, backend=backend)


def unpack(staging: torch.Tensor, cache: torch.Tensor, table: np.ndarray, *, backend: str | None = None) -> None:
    """Scatter: staging -> cache pages (a `BatchPlan.unpack_table`)."""
    copy_segments(staging, cache, table, backend=backend)


def _copy_torch(s: torch.Tensor, d: torch.Tensor, t: np.ndarray) -> None:
    for src, dst, rows, rb, ss, ds in t.tolist():
        if rows == 0 or rb == 0:
            continue
        if rows == 1:
            d[dst : dst + rb].copy_(s[src : src + rb])
        else:
            out = d.as_strided((rows, rb), (ds, 1), dst)
            out.copy_(s.as_strided((rows, rb), (ss, 1), src))
