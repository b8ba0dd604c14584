"""Prefill/decode "engines" for connector tests, built from vLLM's own objects: a VllmConfig of a real model
config (layers trimmed to keep CPU memory small), vLLM's block-size alignment, its MambaSpec /
FullAttentionSpec from the model class's own state-shape methods, its KV cache grouping and allocation,
and one `HybridKVConnector` per TP rank (worker role) plus the scheduler-role connector that serves the
NIXL handshake. Only the model forward is missing: caches are filled from the oracle instead.
"""

from __future__ import annotations

import json
import os
import random
import socket
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from unittest import mock

import quiet_nixl
import torch
from transport_util import trim_kimi

from hybrid_kv.dtypes import TORCH_DTYPES
from hybrid_kv.layout import RankLayout
from hybrid_kv.spec import LayerKind
from hybrid_kv.spec_hf import load_config, spec_from_config

# vLLM's audio module keeps the ImportError of its optional torchcodec (which the set-up uninstalls) in a
# module global, and with it the traceback's whole stack. Imported lazily inside the first build_engine, that
# stack kept the first engine of the process alive for good: its KV caches and its NIXL agents, whose UCX
# progress threads poll without sleeping (vLLM's default), a core each for the rest of the run on CI's 2-core
# machine. Imported here, the stack it keeps is this module's import.
try:
    import vllm.multimodal.media.audio  # noqa: F401
except ImportError:
    pass
try:  # the agents of the engines built here: their pollers niced (why: quiet_nixl)
    quiet_nixl.install()
except ImportError:  # no nixl extra: the vLLM tests skip
    pass

# preset -> (family, config edits that trim it to a few layers of the real dims, --block-size). The block
# size is what vLLM's alignment picks at TP 1 (the largest of any TP): given as --block-size, both
# sides of every TP pair get it, so the oracle compares whole attention blocks.
MODELS = {
    "qwen3-next-80b-a3b": ("GDN", lambda c: c.update(num_hidden_layers=8), 1152),
    "nemotron-h-8b": ("Mamba2", lambda c: c.update(num_hidden_layers=8, hybrid_override_pattern="M-M*M-M*"), 1152),
    "falcon-h1-0.5b": ("Mamba2 n_groups=1", lambda c: c.update(num_hidden_layers=3), 1664),
    "jamba-v0.1": ("Mamba1", lambda c: c.update(num_hidden_layers=8, attn_layer_offset=3, attn_layer_period=4), 256),
    "kimi-linear-48b-a3b": ("KDA + MLA", lambda c: trim_kimi(c, 4), 1920),
}


def heads12(c: dict) -> None:
    """Qwen3-Next's real config with 12 KV heads and 12/24 GDN key/value heads (and MLP sizes that split by
    3), so that TP 2, 3, 4 and 6 all shard it: the model of the pairs whose TP sizes do not divide (4 -> 6 is
    "12 KV heads shard at 6, not at 8")."""
    c.update(
        linear_num_key_heads=12,
        linear_num_value_heads=24,
        num_attention_heads=24,
        num_key_value_heads=12,
        intermediate_size=6144,
        moe_intermediate_size=768,
        shared_expert_intermediate_size=768,
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_ports(n: int, tries: int = 200) -> int:
    """A base port with base .. base+n-1 all free (the stock listener, then one hybrid-kv port per rank).
    Drawn below Linux's ephemeral range (32768+), where the kernel never hands out outgoing ports, so
    no UCX/ZMQ socket can take one between this check and the bind."""
    rng = random.Random()
    for _ in range(tries):
        base = rng.randrange(20000, 32000 - n)
        socks = []
        try:
            for p in range(base, base + n):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", p))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError(f"no {n} consecutive free ports")


def model_dir(tmp: Path, name: str, edit=None, trim: bool = True) -> Path:
    """The preset's config.json in `tmp/name`: trimmed to a few layers (or whole), then `edit`ed."""
    _, cfg = load_config(name)
    if trim:
        MODELS[name][1](cfg)
    if edit:
        edit(cfg)
    d = tmp / name
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps(cfg))
    return d


@contextmanager
def tp_rank(rank: int, size: int):
    import vllm.distributed.kv_transfer.kv_connector.v1.nixl.base_worker as bw

    with (
        mock.patch.object(bw, "get_tensor_model_parallel_rank", return_value=rank),
        mock.patch.object(bw, "get_tensor_model_parallel_world_size", return_value=size),
    ):
        yield


def vllm_config(
    path: Path,
    tp: int,
    engine_id: str,
    extra: dict | None = None,
    cache: dict | None = None,
    spec: dict | None = None,
    push: bool = False,
):
    """`spec`: a speculative_config (e.g. n-gram), as `--speculative-config` gives it; `push`: the push
    connector (`HybridKVPushConnector`)."""
    from vllm.config import CacheConfig, KVTransferConfig, ModelConfig, SpeculativeConfig, VllmConfig

    mc = ModelConfig(model=str(path), skip_tokenizer_init=True, max_model_len=4096)
    kt = KVTransferConfig(
        kv_connector="HybridKVPushConnector" if push else "HybridKVConnector",
        kv_connector_module_path="hybrid_kv.vllm",
        kv_role="kv_both",
        kv_buffer_device="cpu",
        engine_id=engine_id,
        kv_connector_extra_config={"hybrid_kv_staging_bytes": 64 << 20, **(extra or {})},
    )
    # prefix caching off unless `cache` turns it on (then vLLM's 'align' mode, as `vllm serve` picks it);
    # async scheduling off (the connector refuses it)
    cc = CacheConfig(enable_prefix_caching=False)
    vc = VllmConfig(model_config=mc, kv_transfer_config=kt, cache_config=cc)
    vc.scheduler_config.async_scheduling = False
    vc.parallel_config.tensor_parallel_size = tp
    block = MODELS.get(path.name, (None, None, None))[2]
    if block:
        vc.cache_config.block_size = block
        vc.cache_config.user_specified_block_size = True
    for k, v in (cache or {}).items():  # e.g. --mamba-ssm-cache-dtype
        setattr(vc.cache_config, k, v)
    vc.cache_config.kv_cache_layout = "LBHNC"  # what NixlConnector requires (get_required_kvcache_layout)
    if spec:
        vc.speculative_config = SpeculativeConfig(
            **spec, target_model_config=vc.model_config, target_parallel_config=vc.parallel_config
        )
    return vc


def layer_specs(vc, name: str):
    """vLLM's per-layer KV cache specs: the model class's own state shapes/dtypes and vLLM's hybrid
    block-size alignment for the CPU attention backend."""
    from vllm.config import set_current_vllm_config
    from vllm.model_executor.models import ModelRegistry
    from vllm.platforms import current_platform
    from vllm.v1.attention.backends.registry import MambaAttentionBackendEnum
    from vllm.v1.kv_cache_interface import FullAttentionSpec, MambaSpec, MLAAttentionSpec

    cls, _ = ModelRegistry.resolve_model_cls(vc.model_config.architectures, vc.model_config)
    with set_current_vllm_config(vc):
        from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

        current_platform._align_hybrid_block_size(vc, CPUAttentionBackend)
        shapes = cls.get_mamba_state_shape_from_config(vc)
        dtypes = cls.get_mamba_state_dtype_from_config(vc)
    cc = vc.cache_config
    spec = spec_from_config(json.loads(Path(vc.model_config.model, "config.json").read_text()), name=name)
    names = {v: k for k, v in TORCH_DTYPES.items()}  # the dtypes vLLM chose (e.g. fp32 SSM for GDN)
    spec = spec.with_dtypes(
        conv_dtype=names[dtypes[0]], ssm_dtype=names[dtypes[1]], kv_dtype=names[vc.model_config.dtype]
    )
    sc = vc.speculative_config  # vLLM's extra conv rows: the oracle fills them like any other
    spec = spec.with_num_spec(sc.num_speculative_tokens if sc is not None else 0)
    mtype = {
        LayerKind.GDN: MambaAttentionBackendEnum.GDN_ATTN,
        LayerKind.KDA: MambaAttentionBackendEnum.GDN_ATTN,
        LayerKind.MAMBA2: MambaAttentionBackendEnum.MAMBA2,
        LayerKind.MAMBA1: MambaAttentionBackendEnum.MAMBA1,
    }[spec.state.kind]
    tp = vc.parallel_config.tensor_parallel_size
    at = spec.attention
    out = {}
    for layer in spec.layers:
        if layer.kind is LayerKind.ATTENTION:
            out[f"model.layers.{layer.decoder_layer}.self_attn.attn"] = (
                MLAAttentionSpec if at.latent else FullAttentionSpec
            )(
                block_size=cc.block_size,
                num_kv_heads=max(1, at.num_kv_heads // tp),
                head_size=at.head_dim,
                dtype=vc.model_config.dtype,
            )
        else:
            out[f"model.layers.{layer.decoder_layer}.mixer"] = MambaSpec(
                block_size=cc.block_size,
                shapes=shapes,
                dtypes=dtypes,
                page_size_padded=cc.mamba_page_size_padded,
                mamba_type=mtype,
                mamba_cache_mode=cc.mamba_cache_mode,  # 'align' with prefix caching
            )
    return spec, out


@dataclass
class Engine:
    """One vLLM instance (P or D): config, KV cache config, per-rank caches and connectors."""

    name: str
    tp: int
    vc: object
    kcc: object
    spec: object
    specs: dict
    caches: list[dict] = field(default_factory=list)
    conns: list = field(default_factory=list)
    scheduler: object = None

    @property
    def engine_id(self) -> str:
        return self.vc.kv_transfer_config.engine_id

    def storage(self, rank: int) -> torch.Tensor:
        from hybrid_kv.mover.geometry import flat_storage

        return flat_storage(next(iter(self.caches[rank].values())))

    def groups(self) -> list[tuple[int, list[str], str]]:
        from vllm.v1.kv_cache_interface import MambaSpec

        return [
            (g, list(grp.layer_names), "mamba" if isinstance(self.specs[grp.layer_names[0]], MambaSpec) else "attn")
            for g, grp in enumerate(self.kcc.transfer_groups)
        ]

    def shutdown(self) -> None:
        for c in self.conns:
            c.shutdown()
        if self.scheduler is not None:
            self.scheduler.shutdown()


def build_engine(
    path: Path, name: str, tp: int, engine_id: str, blocks: int = 6, extra=None, cache=None, spec=None, push=False
) -> Engine:
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole
    from vllm.v1.core.kv_cache_utils import get_kv_cache_configs
    from vllm.v1.worker.utils import allocate_kv_cache

    from hybrid_kv.vllm import HybridKVConnector, HybridKVPushConnector

    connector = HybridKVPushConnector if push else HybridKVConnector
    # side channels: the stock listener at `base`, hybrid-kv's of rank r at base + 1 + r
    os.environ["VLLM_NIXL_SIDE_CHANNEL_PORT"] = str(free_ports(tp + 1))
    vc = vllm_config(path, tp, engine_id, {"hybrid_kv_port_offset": 1, **(extra or {})}, cache, spec, push)
    spec, specs = layer_specs(vc, name)
    page = max(s.page_size_bytes for s in specs.values())
    kcc = get_kv_cache_configs(vc, [specs], [blocks * page * len(specs)])[0]
    eng = Engine(name, tp, vc, kcc, spec, specs)
    layout = vc.cache_config.get_resolved_kv_cache_layout()
    affinity = os.sched_getaffinity(0)
    # MLA: vLLM's NIXL worker sizes its kernel blocks by the attention backend the platform selects. On a CPU
    # without AMX that is the reference CPU_MLA (16-token kernel blocks only), with which vLLM's runner would
    # split the MLA cache into kernel blocks (this harness allocates whole blocks; vLLM's NIXL worker then
    # refuses to register them). The harness builds what a backend taking a hybrid block whole selects
    # (AMX_MLA on CPU, FlashAttn MLA's multiples of 16 on GPU); no kernel runs, so the ISA is not needed.
    amx = mock.patch("torch.cpu._is_amx_tile_supported", return_value=True) if spec.attention.latent else nullcontext()
    with amx:
        try:
            for r in range(tp):
                caches = allocate_kv_cache(kcc, torch.device("cpu"), layout)
                with tp_rank(r, tp):
                    conn = connector(vc, KVConnectorRole.WORKER, kcc)
                conn.register_kv_caches(caches)
                eng.caches.append(caches)
                eng.conns.append(conn)
            eng.scheduler = connector(vc, KVConnectorRole.SCHEDULER, kcc)
            eng.scheduler.set_xfer_handshake_metadata_pp_aware(
                {(0, r): c.get_handshake_metadata() for r, c in enumerate(eng.conns)}
            )
        except BaseException:
            eng.shutdown()
            raise
        finally:
            os.sched_setaffinity(0, affinity)  # vLLM's CPU worker pins itself to one core per NUMA node
    return eng


# ---- oracle fill / expectation -------------------------------------------------------------------------


def layer_names(eng: Engine) -> dict[int, str]:
    """hybrid-kv layer index -> the vLLM layer name this engine gave it (per kind, in layer order)."""
    names: dict[int, str] = {}
    by_kind = {"state": [], "attn": []}
    for n in sorted(eng.specs, key=lambda n: int(n.split(".")[2])):
        by_kind["attn" if n.endswith(".attn") else "state"].append(n)
    kinds = {"state": [], "attn": []}
    for layer in eng.spec.layers:
        kinds["attn" if layer.kind is LayerKind.ATTENTION else "state"].append(layer.index)
    for k in kinds:
        names.update(zip(kinds[k], by_kind[k]))
    return names


def page_fn(eng: Engine, rank: int, buf: torch.Tensor):
    """page_of(hybrid-kv layer index, block) over `buf` (a copy of rank `rank`'s storage)."""
    names = layer_names(eng)
    base = eng.storage(rank).data_ptr()

    def page_of(layer: int, block: int) -> torch.Tensor:
        t = eng.caches[rank][names[layer]]
        off = t.data_ptr() - base + block * t.stride(0) * t.element_size()
        return buf[off : off + t.stride(0) * t.element_size()]

    return page_of


def layouts(eng: Engine, rank: int) -> RankLayout:
    conv = os.environ.get("VLLM_SSM_CONV_STATE_LAYOUT", "DS")
    return RankLayout(eng.spec, eng.tp, rank, conv, "HND", eng.vc.cache_config.block_size)
