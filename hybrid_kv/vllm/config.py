"""The connector's knobs: the `HYBRID_KV_TRANSFER` flag, the serving features it refuses, and the
`kv_connector_extra_config` keys (`PackedConfig`, the state mover's options)."""

from __future__ import annotations

from hybrid_kv.mover.options import PackedConfig as PackedConfig  # re-exported: hybrid_kv.vllm.PackedConfig
from hybrid_kv.staging.mode import FLAG as FLAG  # re-exported: hybrid_kv.vllm.FLAG
from hybrid_kv.staging.mode import parse_mode

MODES = ("packed", "strided", "auto")
# auto's cost model times READs from the source's staging; a push decode rank has no READ path to time
PUSH_MODES = ("packed", "strided")


def transfer_mode(environ: dict | None = None, push: bool = False) -> str:
    """The hybrid-state backend selected by `HYBRID_KV_TRANSFER` (unset or empty: packed)."""
    if push:
        return parse_mode(None, PUSH_MODES, "the vLLM push connector, HybridKVPushConnector", environ)
    return parse_mode(None, MODES, "the vLLM connector", environ)


def refuse_unsafe_serving(vllm_config) -> None:
    """Serving features whose recurrent state the connector does not move correctly yet: refused at start-up,
    naming the setting, because they would give wrong tokens silently (the handshake cannot see them).
    Async scheduling may report a request finished while the step that rewrites its state is in flight;
    ReplaySSM / RecoverSSM keep states no shell moves. Prefix caching (mamba_cache_mode 'align') is served:
    vLLM's scheduler hands both sides the block of the running state and the decode side only the blocks
    its own cache lacks (tested end to end); with speculative decoding as well it is not tested, so refused."""
    mc = vllm_config.model_config
    if mc is None or not (getattr(mc, "is_hybrid", False) or getattr(mc, "is_attention_free", False)):
        return  # attention-only: vLLM's own NIXL path, no recurrent state
    cc, sc = vllm_config.cache_config, vllm_config.scheduler_config
    bad = []
    mode = getattr(cc, "mamba_cache_mode", "none")
    if mode not in (None, "none", "align"):
        bad.append(f"mamba_cache_mode={mode!r} (served: 'none', 'align')")
    spec = getattr(vllm_config, "speculative_config", None)
    if (cc.enable_prefix_caching or mode == "align") and spec is not None:
        bad.append(
            f"prefix caching (mamba_cache_mode={mode!r}) together with speculative decoding "
            f"(method={getattr(spec, 'method', None)!r}): pass --no-enable-prefix-caching or serve without "
            "speculative decoding"
        )
    if getattr(sc, "async_scheduling", False):
        bad.append("async scheduling (async_scheduling=True): pass --no-async-scheduling")
    # states past conv + SSM (ReplaySSM rings, KDA RecoverSSM records): stock NIXL skips them silently
    extra = [k for k in ("use_replayssm", "use_kda_recoverssm") if getattr(cc, k, False)]
    if extra:
        bad.append(
            f"extra recurrent states ({', '.join(f'{k}=True' for k in extra)}; hybrid-kv moves the conv and "
            "SSM states only): turn ReplaySSM off (use_replayssm=False) and serve Kimi models without RecoverSSM "
            "speculative decoding"
        )
    if bad:
        raise ValueError(
            "HybridKVConnector does not yet move a hybrid model's state correctly with " + "; nor with ".join(bad)
        )


def side_port(nixl_side_channel_port: int, data_parallel_index: int) -> int:
    """The stock NIXL side-channel port of a DP rank (vLLM's scheduler adds the DP index)."""
    return nixl_side_channel_port + data_parallel_index


def refuse_unsupported(vllm_config, kv_cache_config, mode: str) -> None:
    """Deployments the packed state path does not handle (the stock one may): a clear start-up error."""
    from vllm.platforms import current_platform
    from vllm.v1.kv_cache_interface import MambaSpec

    has_state = any(
        isinstance(s, MambaSpec)
        for g in kv_cache_config.transfer_groups
        for s in (getattr(g.kv_cache_spec, "kv_cache_specs", {}) or {None: g.kv_cache_spec}).values()
    )
    if not has_state:
        return
    pc, kt = vllm_config.parallel_config, vllm_config.kv_transfer_config
    bad = {
        "kv_buffer_device=cpu on an accelerator (host staging)": current_platform.device_type != "cpu"
        and kt.kv_buffer_device == "cpu",
        f"decode_context_parallel_size={pc.decode_context_parallel_size}": pc.decode_context_parallel_size > 1,
        f"prefill_context_parallel_size={pc.prefill_context_parallel_size}": pc.prefill_context_parallel_size > 1,
        f"pipeline_parallel_size={pc.pipeline_parallel_size}": pc.pipeline_parallel_size > 1,
    }
    for what, hit in bad.items():
        if hit:
            raise ValueError(f"HYBRID_KV_TRANSFER={mode} does not support {what}; use HYBRID_KV_TRANSFER=strided")
