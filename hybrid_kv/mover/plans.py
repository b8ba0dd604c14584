"""Plans for any pair of TP sizes whose model dims divide: state-only where one TP size divides the other
(the engine's own head mapping moves attention KV), state + attention KV where neither does (2 -> 3, 4 -> 6),
so that such a pair's whole cache moves as one descriptor per transfer unit."""

from __future__ import annotations

from hybrid_kv.staging.template import ALL, PlanCache


def divides(a: int, b: int) -> bool:
    return a % b == 0 or b % a == 0


class AnyTPPlans(PlanCache):
    """State-only plans where the TP sizes divide (vLLM moves attention KV), state + KV plans elsewhere.
    `kv_problem`: why this rank's attention pages cannot be mapped (such pairs are then refused)."""

    def __init__(self, spec, conv_layout: str, kv_layout: str, max_unit_bytes: int, block_size: int | None,
                 kv_problem: str | None) -> None:  # fmt: skip
        super().__init__(spec, conv_layout, kv_layout, max_unit_bytes, kv=False)
        self.block_size, self.kv_problem = block_size, kv_problem
        self.full = PlanCache(spec, conv_layout, kv_layout, max_unit_bytes, kv=True)
        self.full.shapes = self.shapes  # one bound on chunk shapes (keyed by pair: no collisions)

    @staticmethod
    def moves_kv(prefill_tp: int, decode_tp: int) -> bool:
        return not divides(prefill_tp, decode_tp)

    def _full(self, prefill_tp: int, decode_tp: int) -> tuple[int, int]:
        if self.kv_problem is not None:
            raise ValueError(
                f"prefill TP {prefill_tp} -> decode TP {decode_tp}: neither size divides the other, so hybrid-kv "
                f"would move the attention KV, but this rank's attention pages cannot be mapped: {self.kv_problem}"
            )
        return (self.block_size, self.block_size)

    def sources(self, prefill_tp: int, decode_tp: int, block_sizes: tuple[int, int] = (16, 16)) -> dict:
        if self.moves_kv(prefill_tp, decode_tp):
            return self.full.sources(prefill_tp, decode_tp, self._full(prefill_tp, decode_tp))
        return super().sources(prefill_tp, decode_tp, block_sizes)

    def pair(self, prefill_tp: int, decode_tp: int, src: int, dst: int, block_sizes=(16, 16), part=ALL):
        if self.moves_kv(prefill_tp, decode_tp):
            if part != ALL:
                raise ValueError(f"part={part!r}: a pair whose TP sizes do not divide is packed whole")
            return self.full.pair(prefill_tp, decode_tp, src, dst, self._full(prefill_tp, decode_tp))
        return super().pair(prefill_tp, decode_tp, src, dst, block_sizes, part)

    def consumers(self, prefill_tp: int, decode_tp: int, src: int) -> int:
        """How many decode ranks read from prefill rank `src` (the count its notifications carry)."""
        return sum(src in s for s in self.sources(prefill_tp, decode_tp).values())
