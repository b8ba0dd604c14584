"""Prefill and decode TP sizes that do not divide each other (2 -> 3, 4 -> 6), in the packed pull path.

vLLM's NIXL worker maps attention heads only when one TP size divides the other (`TransferTopology.tp_ratio`
asserts it). hybrid-kv's plans cover any pair whose model dims divide (`hybrid_kv.mover.plans`), so for
such a pair the packed pull path takes over what vLLM cannot do:

* which prefill ranks to handshake with: those the plan reads from (`surface.route_handshakes`);
* the remote agent: added without vLLM's descriptor lists, which need the ratio (`add_foreign_agent`);
* attention KV: packed with the state, one chunk per (prefill rank, decode rank) whose plan carries the
  head slices too (the pages from `hybrid_kv.mover.geometry.attention_pages`), so the request's whole cache moves as one
  descriptor per transfer unit;
* the notification that frees the request's blocks on each prefill rank, with the number of decode ranks
  that read from that rank (vLLM's pull frees them once that many have notified): `notify`.

Pairs that divide keep vLLM's own path for attention KV. `strided` (vLLM's worker) and push refuse a pair
that does not divide at handshake, naming both sizes (`refuse_non_dividing`).
"""

from __future__ import annotations

from vllm.distributed.kv_transfer.kv_connector.utils import EngineTransferInfo

from hybrid_kv.mover.plans import divides


def refuse_non_dividing(prefill_tp: int, decode_tp: int, why: str) -> None:
    if not divides(prefill_tp, decode_tp):
        raise ValueError(
            f"prefill TP {prefill_tp} -> decode TP {decode_tp}: neither size divides the other, and {why}; "
            "HybridKVConnector with HYBRID_KV_TRANSFER=packed moves such pairs"
        )


def add_foreign_agent(worker, meta, remote_tp_rank: int, remote_tp_size: int, remote_dcp_size: int) -> str:
    """The remote agent of a prefill rank, without vLLM's descriptor lists (they need the TP ratio): every
    byte of such an engine moves through hybrid-kv's staging."""
    if remote_dcp_size != 1:
        raise ValueError(f"remote decode_context_parallel_size={remote_dcp_size} with non-dividing TP sizes")
    if meta.block_size != worker.block_size or meta.physical_blocks_per_logical_kv_block != 1:
        raise ValueError(
            f"prefill TP {remote_tp_size} -> decode TP {worker.world_size}: prefill blocks of {meta.block_size} "
            f"tokens ({meta.physical_blocks_per_logical_kv_block} kernel blocks each), decode blocks of "
            f"{worker.block_size}: non-dividing TP sizes need one block size on both sides (pass the same "
            "--block-size to both engines)"
        )
    info = EngineTransferInfo(
        remote_tp_size=remote_tp_size,
        remote_block_size=meta.block_size,
        remote_block_len=meta.block_lens[0],
        remote_physical_blocks_per_logical=meta.physical_blocks_per_logical_kv_block,
        remote_dcp_size=remote_dcp_size,
    )
    worker.transfer_topo.register_remote_engine(meta.engine_id, info)
    name = worker.nixl_wrapper.add_remote_agent(meta.agent_metadata)
    worker.kv_caches_base_addr[meta.engine_id][remote_tp_rank] = meta.kv_caches_base_addr
    return name


def notify(path, engine_id: str, remote_req: str, remote_tp: int, ranks) -> None:
    """Tell each source prefill rank the request is read (its staging holds the bytes: the blocks can go)."""
    worker = path.w
    for p in ranks:
        msg = f"{remote_req}:{path.plans.consumers(remote_tp, worker.world_size, p)}".encode()
        agent = worker._remote_agents[engine_id][(0, p)]
        try:
            worker.nixl_wrapper.send_notif(agent, notif_msg=msg)
        except Exception as e:  # its lease frees the blocks anyway
            worker._log_failure(
                failure_type="notification_failed",
                msg="P worker blocks will be freed after timeout.",
                req_id=remote_req,
                error=e,
                dst_engine_id=engine_id,
                remote_rank=p,
                remote_agent_name=agent,
            )
