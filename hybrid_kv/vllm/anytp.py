"""Prefill and decode TP sizes that do not divide each other (2 -> 3, 4 -> 6), in the packed pull worker.

vLLM's NIXL worker maps attention heads only when one TP size divides the other (`TransferTopology.tp_ratio`
asserts it). hybrid-kv's plans cover any pair whose model dims divide, so for such a pair the packed
worker takes over what vLLM cannot do:

* which prefill ranks to handshake with: those the plan reads from (`HybridTopology`);
* the remote agent: added without vLLM's descriptor lists, which need the ratio (`_hkv_add_foreign_agent`);
* attention KV: packed with the state, one chunk per (prefill rank, decode rank) whose plan carries the
  head slices too (`AnyTPPlans`; the pages from `hybrid_kv.vllm.kvpages`), so the request's whole cache
  moves as one descriptor per transfer unit;
* the notification that frees the request's blocks on each prefill rank, with the number of decode ranks
  that read from that rank (vLLM's pull frees them once that many have notified).

Pairs that divide keep vLLM's own path for attention KV. `strided` (vLLM's worker) and push refuse a pair
that does not divide at handshake, naming both sizes (`refuse_non_dividing`).
"""

from __future__ import annotations

from collections.abc import Callable

from vllm.distributed.kv_transfer.kv_connector.utils import EngineTransferInfo, TransferTopology

from hybrid_kv.staging.template import ALL, PlanCache


def divides(a: int, b: int) -> bool:
    return a % b == 0 or b % a == 0


def refuse_non_dividing(prefill_tp: int, decode_tp: int, why: str) -> None:
    if not divides(prefill_tp, decode_tp):
        raise ValueError(
            f"prefill TP {prefill_tp} -> decode TP {decode_tp}: neither size divides the other, and {why}; "
            "HybridKVConnector with HYBRID_KV_TRANSFER=packed moves such pairs"
        )


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


class HybridTopology(TransferTopology):
    """vLLM's topology, except that a decode rank handshakes with the prefill ranks hybrid-kv's plan reads
    from when the TP sizes do not divide (everything else that needs the ratio still asserts: only the
    packed worker's own paths run for such an engine)."""

    hkv_sources: Callable[[int], list[int]]

    def handshake_target_ranks(self, remote_tp_size: int, remote_dcp_size: int = 1) -> list[int]:
        if remote_dcp_size == 1 and not divides(remote_tp_size, self.tp_size):
            return self.hkv_sources(remote_tp_size)
        return super().handshake_target_ranks(remote_tp_size, remote_dcp_size)


class AnyTP:
    """The packed pull worker's part for such pairs (needs `PackedWorker` and vLLM's pull worker)."""

    def _hkv_any_tp(self) -> None:
        """After vLLM built its topology (in `register_kv_caches`): route non-dividing handshakes."""
        if self._hkv_geom is None or type(self.transfer_topo) is not TransferTopology:
            return
        self.transfer_topo.__class__ = HybridTopology
        self.transfer_topo.hkv_sources = lambda remote_tp: self._hkv_plans.sources(remote_tp, self.world_size)[
            self.tp_rank
        ]

    def _hkv_foreign(self, remote_tp: int) -> bool:
        return self._hkv_geom is not None and AnyTPPlans.moves_kv(remote_tp, self.world_size)

    def _hkv_add_foreign_agent(self, meta, remote_tp_rank: int, remote_tp_size: int, remote_dcp_size: int) -> str:
        """The remote agent of a prefill rank, without vLLM's descriptor lists (they need the TP ratio):
        every byte of such an engine moves through hybrid-kv's staging."""
        if remote_dcp_size != 1:
            raise ValueError(f"remote decode_context_parallel_size={remote_dcp_size} with non-dividing TP sizes")
        if meta.block_size != self.block_size or meta.physical_blocks_per_logical_kv_block != 1:
            raise ValueError(
                f"prefill TP {remote_tp_size} -> decode TP {self.world_size}: prefill blocks of {meta.block_size} "
                f"tokens ({meta.physical_blocks_per_logical_kv_block} kernel blocks each), decode blocks of "
                f"{self.block_size}: non-dividing TP sizes need one block size on both sides (pass the same "
                "--block-size to both engines)"
            )
        info = EngineTransferInfo(
            remote_tp_size=remote_tp_size,
            remote_block_size=meta.block_size,
            remote_block_len=meta.block_lens[0],
            remote_physical_blocks_per_logical=meta.physical_blocks_per_logical_kv_block,
            remote_dcp_size=remote_dcp_size,
        )
        self.transfer_topo.register_remote_engine(meta.engine_id, info)
        name = self.nixl_wrapper.add_remote_agent(meta.agent_metadata)
        self.kv_caches_base_addr[meta.engine_id][remote_tp_rank] = meta.kv_caches_base_addr
        return name

    def _hkv_notify(self, engine_id: str, remote_req: str, remote_tp: int, ranks) -> None:
        """Tell each source prefill rank the request is read (its staging holds the bytes: the blocks can go)."""
        for p in ranks:
            msg = f"{remote_req}:{self._hkv_plans.consumers(remote_tp, self.world_size, p)}".encode()
            agent = self._remote_agents[engine_id][(0, p)]
            try:
                self.nixl_wrapper.send_notif(agent, notif_msg=msg)
            except Exception as e:  # its lease frees the blocks anyway
                self._log_failure(
                    failure_type="notification_failed",
                    msg="P worker blocks will be freed after timeout.",
                    req_id=remote_req,
                    error=e,
                    dst_engine_id=engine_id,
                    remote_rank=p,
                    remote_agent_name=agent,
                )
