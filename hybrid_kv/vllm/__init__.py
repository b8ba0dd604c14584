"""vLLM integration: `HybridKVConnector` (pull) and `HybridKVPushConnector` (push); load either with
`kv_connector_module_path="hybrid_kv.vllm"`.

The connectors import vLLM (the `vllm` extra) when first named; `hybrid_kv.vllm.compat`'s source check
(`python -m hybrid_kv.vllm.compat SOURCE`) needs no vLLM installed."""

from importlib import import_module

_EXPORTS = {
    "FLAG": "config",
    "MODES": "config",
    "PUSH_MODES": "config",
    "PackedConfig": "config",
    "transfer_mode": "config",
    "HybridKVConnector": "connector",
    "HybridKVPushConnector": "connector",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'hybrid_kv.vllm' has no attribute {name!r}")
    return getattr(import_module(f"hybrid_kv.vllm.{_EXPORTS[name]}"), name)
