"""Byte comparisons for the tests: a difference is reported as counts and the first differing offsets,
never as the tensors (pytest's rendering of a failed `assert (a == b).all()` over a cache of gigabytes once
grew a run to 22 GB)."""

from __future__ import annotations

import numpy as np
import torch

SHOWN = 8  # differing offsets named in a report


def as_bytes(x) -> torch.Tensor:
    """A flat uint8 view of a tensor or an array (copied only where it is not contiguous)."""
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(np.ascontiguousarray(x))
    return x.detach().contiguous().view(torch.uint8).flatten()


def byte_diff(got, want) -> str | None:
    """None if `got` and `want` hold the same bytes, else how many differ and where the first do."""
    g, w = as_bytes(got), as_bytes(want)
    if g.numel() != w.numel():
        return f"{g.numel()} bytes, {w.numel()} expected"
    bad = (g != w).nonzero().flatten()
    if bad.numel() == 0:
        return None
    first = bad[:SHOWN]
    return (
        f"{bad.numel()} of {g.numel()} bytes differ, first at byte offsets {first.tolist()} "
        f"(got {g[first].tolist()}, want {w[first].tolist()})"
    )


def assert_same_bytes(got, want, what: str) -> None:
    diff = byte_diff(got, want)
    if diff is not None:
        raise AssertionError(f"{what}: {diff}")
