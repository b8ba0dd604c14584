"""The `auto` mode's cost model, shared by both shells.

Packing a pair's pieces costs two copies of their bytes (gather on the source, scatter on the decode
rank) at the source's load (it packs for every decode rank reading from it, each with requests in
flight) and, where a reply is waited for, round trips; reading page to page costs one NIXL descriptor
per run instead. A pair packs when the descriptors it saves cost more than that.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

CAL_DESCS, CAL_SIZE, CAL_REPEATS = 256, 4096, 5  # descriptor-cost probe: 256 x 4 KiB vs one 1 MiB READ
CAL_BYTES = CAL_DESCS * CAL_SIZE  # the calibration area a decode rank reads the probe into


def median(xs: list[float]) -> float:
    return sorted(xs)[len(xs) // 2]


def copy_gbps(a: torch.Tensor, b: torch.Tensor, repeats: int = CAL_REPEATS) -> float:
    """Device copy bandwidth (GB/s) of `b.copy_(a)`, median of `repeats` (synchronized on CUDA)."""

    def once() -> float:
        t = time.perf_counter()
        b.copy_(a)
        if a.device.type == "cuda":
            torch.cuda.synchronize(a.device)
        return time.perf_counter() - t

    once()  # first touch / lazy allocation out of the measurement
    return a.numel() * a.element_size() / max(median([once() for _ in range(repeats)]), 1e-9) / 1e9


def desc_cost_us(timed_read: Callable[[int, int], float], n: int = CAL_DESCS, size: int = CAL_SIZE) -> float:
    """Per-descriptor cost (µs) from `timed_read(descriptors, bytes_each)` seconds: n small descriptors
    against one descriptor of the same n * size bytes, medians of CAL_REPEATS each."""
    t_many = median([timed_read(n, size) for _ in range(CAL_REPEATS)])
    t_one = median([timed_read(1, n * size) for _ in range(CAL_REPEATS)])
    return max(0.0, t_many - t_one) / (n - 1) * 1e6


def packing_pays(descs_saved: int, nbytes: int, cost: dict, load: int, round_trips: int = 0) -> bool:
    """Whether packing `nbytes` that would otherwise take `descs_saved` more descriptors pays, at `load`
    packs queued on the source per request and `round_trips` replies waited for."""
    if descs_saved <= 0:
        return False
    saved = descs_saved * cost["desc_cost_us"]
    spent = round_trips * cost.get("rtt_us", 0.0) + 2 * nbytes / (cost["copy_gbps"] * 1e3) * max(1, load)
    return saved > spent
