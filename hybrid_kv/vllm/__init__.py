"""vLLM integration: `HybridKVConnector` (load with `kv_connector_module_path="hybrid_kv.vllm"`).

Importing this package imports vLLM (the `vllm` extra)."""

from hybrid_kv.vllm.config import FLAG, MODES, PackedConfig, transfer_mode
from hybrid_kv.vllm.connector import HybridKVConnector

__all__ = ["FLAG", "MODES", "HybridKVConnector", "PackedConfig", "transfer_mode"]
