"""`HybridKVConnector` (pull) and `HybridKVPushConnector` (push): vLLM's NIXL connectors with hybrid-kv's
packed recurrent-state backend.

Select one with (one line)::

    --kv-transfer-config '{"kv_connector":"HybridKVConnector",
                           "kv_connector_module_path":"hybrid_kv.vllm","kv_role":"kv_producer"}'

(`HybridKVPushConnector` where vLLM would take `NixlPushConnector`: the prefill WRITEs). In both,
`HYBRID_KV_TRANSFER=packed` (default) moves the Mamba/GDN state through hybrid-kv's gather -> one
descriptor per unit -> scatter (`hybrid_kv.vllm.pull`, `hybrid_kv.vllm.push`); `strided` runs
vLLM's stock worker unchanged. Pull also takes `auto`: the packed worker, and each decode rank chooses, per
prefill engine at handshake, between packing and vLLM's stock descriptors with the cost model
(`hybrid_kv.vllm.auto`; packed wherever the stock path would move wrong bytes). The pull scheduler is
vLLM's own plus the finished requests' block ids for the prefill-side packers; the push scheduler is
vLLM's own (it hands those ids over already). Both keep `SupportsHMA`.
"""

from __future__ import annotations

from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole
from vllm.distributed.kv_transfer.kv_connector.v1.nixl.connector import (
    NixlBaseConnector,
    NixlPullConnector,
    NixlPushConnector,
)
from vllm.distributed.kv_transfer.kv_connector.v1.nixl.pull_scheduler import NixlPullConnectorScheduler
from vllm.distributed.kv_transfer.kv_connector.v1.nixl.pull_worker import NixlPullConnectorWorker
from vllm.distributed.kv_transfer.kv_connector.v1.nixl.push_scheduler import NixlPushConnectorScheduler
from vllm.distributed.kv_transfer.kv_connector.v1.nixl.push_worker import NixlPushConnectorWorker

from hybrid_kv.vllm.compat import check_vllm_version
from hybrid_kv.vllm.config import PUSH_MODES, PackedConfig, refuse_unsafe_serving, transfer_mode


def _checked_mode(vllm_config, push: bool) -> str:
    """The transfer mode, and every start-up refusal that needs no NIXL agent (an unsupported vLLM release,
    invalid flag or extra keys, serving features that would give wrong tokens)."""
    check_vllm_version()
    mode = transfer_mode(push=push)
    PackedConfig.from_transfer_config(vllm_config.kv_transfer_config)
    refuse_unsafe_serving(vllm_config)  # any mode
    return mode


def _no_sleep_mode(cls, kv_transfer_config) -> bool:
    """vLLM >= 0.33 asks a connector whether it follows sleep mode's KV-cache remap, and refuses
    `enable_sleep_mode` when it does not: hybrid-kv's staging registrations and plans, made at start-up,
    do not follow it."""
    return False


def _kv_cache_access(cls, kv_transfer_config):
    """vLLM >= 0.34 allocates the KV cache by what the connector declares; the base's default (IN_PROCESS)
    may give a VMM-backed cache that UCX's cuda_ipc cannot map. hybrid-kv registers the cache with NIXL and
    its peers on the host READ it over cuda_ipc (one physical allocation per segment, FABRIC export), as
    vLLM's NIXL connector declares for itself; with a CPU `kv_buffer_device` NIXL registers host buffers.
    Stated here, not inherited, so a change of the base's answer cannot silently break the transfers."""
    from vllm.config.kv_transfer import KVCacheAccess  # vLLM >= 0.34 (only it asks)

    if kv_transfer_config.kv_buffer_device == "cpu":
        return KVCacheAccess.IN_PROCESS
    return KVCacheAccess.REGISTERS | KVCacheAccess.EXPORTS_FABRIC


class HybridKVConnector(NixlPullConnector):
    """Drop-in for `NixlConnector`; the transfer mode is read once, at start-up."""

    supports_sleep_mode = classmethod(_no_sleep_mode)
    kv_cache_access = classmethod(_kv_cache_access)

    def __init__(self, vllm_config, role: KVConnectorRole, kv_cache_config) -> None:
        self.transfer_mode = _checked_mode(vllm_config, push=False)
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
                from hybrid_kv.vllm.pull import HybridKVWorker

                self.connector_worker = HybridKVWorker(
                    vllm_config, self.engine_id, kv_cache_config, mode=self.transfer_mode
                )
            else:
                self.connector_worker = NixlPullConnectorWorker(vllm_config, self.engine_id, kv_cache_config)
        else:
            raise ValueError(f"unsupported KVConnectorRole {role!r}")


class HybridKVPushConnector(NixlPushConnector):
    """Drop-in for `NixlPushConnector` (the prefill WRITEs); `HYBRID_KV_TRANSFER` is packed or strided."""

    supports_sleep_mode = classmethod(_no_sleep_mode)
    kv_cache_access = classmethod(_kv_cache_access)

    def __init__(self, vllm_config, role: KVConnectorRole, kv_cache_config) -> None:
        self.transfer_mode = _checked_mode(vllm_config, push=True)
        # NixlPushConnector.__init__ would build a stock worker first: its own check, then the base's.
        if vllm_config.parallel_config.decode_context_parallel_size > 1:
            raise ValueError("NixlPushConnector does not support decode_context_parallel_size > 1.")
        NixlBaseConnector.__init__(self, vllm_config, role, kv_cache_config)
        self.connector_scheduler = None
        self.connector_worker = None
        if role == KVConnectorRole.SCHEDULER:  # vLLM's: it hands finished block ids to the workers already
            self.connector_scheduler = NixlPushConnectorScheduler(vllm_config, self.engine_id, kv_cache_config)
        elif role == KVConnectorRole.WORKER:
            if self.transfer_mode == "packed":
                from hybrid_kv.vllm.push import HybridKVPushWorker

                self.connector_worker = HybridKVPushWorker(vllm_config, self.engine_id, kv_cache_config)
            else:
                self.connector_worker = NixlPushConnectorWorker(vllm_config, self.engine_id, kv_cache_config)
        else:
            raise ValueError(f"unsupported KVConnectorRole {role!r}")


__all__ = ["PUSH_MODES", "HybridKVConnector", "HybridKVPushConnector"]
