"""Where one rank's pages sit: per layer a base offset and a block stride inside one backing buffer.

The same map addresses the CLI's flat caches (layer `l`, block `b` at `(l * num_blocks + b) * page`) and
vLLM's tensor views (each Mamba layer's own offset and stride in the shared allocation). It is checked
once against the buffer, so a request only needs its block ids checked against `num_blocks`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class PageMap:
    base: np.ndarray  # int64 [layers]: byte offset of block 0's page of each mapped layer
    stride: np.ndarray  # int64 [layers]: bytes between consecutive blocks' pages
    page_bytes: int  # bytes of a page a template may touch
    num_blocks: int
    storage_bytes: int

    def __post_init__(self) -> None:
        if self.num_blocks < 1:
            raise ValueError(f"num_blocks={self.num_blocks} must be >= 1")
        if len(self.base) != len(self.stride):
            raise ValueError(f"{len(self.base)} layer bases but {len(self.stride)} strides")
        if len(self.base) and ((self.base < 0).any() or (self.stride < self.page_bytes).any()):
            raise ValueError("page map: negative base or a block stride shorter than the page")
        end = self.base + (self.num_blocks - 1) * self.stride + self.page_bytes
        if len(end) and int(end.max()) > self.storage_bytes:
            i = int(np.argmax(end))
            raise ValueError(
                f"page map: layer {i}'s last page ends at byte {int(end[i])} of a {self.storage_bytes}-byte buffer"
            )

    @classmethod
    def flat(cls, num_layers: int, num_blocks: int, page_bytes: int) -> PageMap:
        """The CLI's flat cache: every layer's `num_blocks` pages back to back."""
        layer_stride = num_blocks * page_bytes
        return cls(
            np.arange(num_layers, dtype=np.int64) * layer_stride,
            np.full(num_layers, page_bytes, dtype=np.int64),
            page_bytes,
            num_blocks,
            num_layers * layer_stride,
        )

    @classmethod
    def of_views(
        cls, layers: Sequence[tuple[int, int]], page_bytes: int, num_blocks: int, storage_bytes: int
    ) -> PageMap:
        """(offset, stride) per layer, read from the tensors that view one allocation (vLLM)."""
        a = np.array(layers, dtype=np.int64).reshape(-1, 2)
        return cls(a[:, 0].copy(), a[:, 1].copy(), page_bytes, num_blocks, storage_bytes)

    @property
    def gcd(self) -> int:
        """gcd of every base and stride (an element size must divide it)."""
        return int(np.gcd.reduce(np.concatenate([self.base, self.stride, [0]])))
