"""vLLM integration: `HybridKVConnector` (pull) and `HybridKVPushConnector` (push); load either with
`kv_connector_module_path="hybrid_kv.vllm"`.

Importing this package imports vLLM (the `vllm` extra)."""

from hybrid_kv.vllm.config import FLAG, MODES, PUSH_MODES, PackedConfig, transfer_mode
from hybrid_kv.vllm.connector import HybridKVConnector, HybridKVPushConnector

__all__ = ["FLAG", "MODES", "PUSH_MODES", "HybridKVConnector", "HybridKVPushConnector", "PackedConfig", "transfer_mode"]
