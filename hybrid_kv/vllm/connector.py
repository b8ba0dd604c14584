"""`HybridKVConnector`: vLLM's NIXL (pull) connector with hybrid-kv's packed recurrent-state backend.

Select it with (one line)::

    --kv-transfer-config '{"kv_connector":"HybridKVConnector",
                           "kv_connector_module_path":"hybrid_kv.vllm","kv_role":"kv_both"}'

`HYBRID_KV_TRANSFER=packed` (default) moves the Mamba/GDN state through hybrid-kv's gather -> one
descriptor per unit -> scatter (`hybrid_kv.vllm.worker`); `strided` runs vLLM's stock worker unchanged;
`auto` runs the packed worker and lets each decode rank choose, per prefill engine at handshake, between
packing and vLLM's stock descriptors with the cost model (`hybrid_kv.vllm.auto`; packed wherever the
stock path would move wrong bytes). The scheduler is vLLM's own (packed and auto: plus the finished
requests' block ids for the prefill-side packers). Being a `NixlPullConnector`, it keeps `SupportsHMA`.
"""

from __future__ import annotations

from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole
from vllm.distributed.kv_transfer.kv_connector.v1.nixl.connector import NixlBaseConnector, NixlPullConnector
from vllm.distributed.kv_transfer.kv_connector.v1.nixl.pull_scheduler import NixlPullConnectorScheduler
from vllm.distributed.kv_transfer.kv_connector.v1.nixl.pull_worker import NixlPullConnectorWorker

from hybrid_kv.vllm.config import PackedConfig, refuse_unsafe_serving, transfer_mode


class HybridKVConnector(NixlPullConnector):
    """Drop-in for `NixlConnector`; the transfer mode is read once, at start-up."""

    def __init__(self, vllm_config, role: KVConnectorRole, kv_cache_config) -> None:
        self.transfer_mode = transfer_mode()  # an invalid flag fails here, before any agent exists
        PackedConfig.from_transfer_config(vllm_config.kv_transfer_config)  # so do invalid extra keys
        refuse_unsafe_serving(vllm_config)  # and serving features that would give wrong tokens (any mode)
        # NixlPullConnector.__init__ would build a stock worker (and its NIXL agent) first; skip it.
        NixlBaseConnector.__init__(self, vllm_config, role, kv_cache_config)
        if role == KVConnectorRole.SCHEDULER:
            if self.transfer_mode != "strided":  # also hands finished requests' block ids to the packers
                from hybrid_kv.vllm.scheduler import HybridKVScheduler

                cls = HybridKVScheduler
            else:
                cls = NixlPullConnectorScheduler
            self.connector_scheduler = cls(vllm_config, self.engine_id, kv_cache_config)
            self.connector_worker = None
        elif role == KVConnectorRole.WORKER:
            self.connector_scheduler = None
            if self.transfer_mode != "strided":
                from hybrid_kv.vllm.worker import HybridKVWorker

                self.connector_worker = HybridKVWorker(
                    vllm_config, self.engine_id, kv_cache_config, mode=self.transfer_mode
                )
            else:
                self.connector_worker = NixlPullConnectorWorker(vllm_config, self.engine_id, kv_cache_config)
        else:
            raise ValueError(f"unsupported KVConnectorRole {role!r}")
