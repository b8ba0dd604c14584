"""hybrid-kv: packed transfer of hybrid-model recurrent state and attention KV between TP layouts."""

from hybrid_kv.batch import BatchPlan, CacheGeometry, RequestBlocks
from hybrid_kv.layout import RankLayout
from hybrid_kv.plan import TransferPlan
from hybrid_kv.spec import AttentionDims, CacheLayer, LayerKind, ModelSpec, StateDims
from hybrid_kv.spec_hf import list_presets, load_spec, spec_from_config

__version__ = "0.1.0"

__all__ = [
    "AttentionDims",
    "BatchPlan",
    "CacheGeometry",
    "CacheLayer",
    "LayerKind",
    "ModelSpec",
    "RankLayout",
    "RequestBlocks",
    "StateDims",
    "TransferPlan",
    "list_presets",
    "load_spec",
    "spec_from_config",
]
