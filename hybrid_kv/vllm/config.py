"""The connector's knobs: the `HYBRID_KV_TRANSFER` flag and the `kv_connector_extra_config` keys."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import ClassVar

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


@dataclass(frozen=True)
class PackedConfig:
    """`kv_connector_extra_config` keys of the packed backend (all optional)."""

    staging_bytes: int = 1 << 30  # per rank, prefill staging and decode receive staging each
    max_unit_bytes: int = 256 << 20  # one NIXL descriptor moves at most this much
    port_offset: int = 1000  # hybrid-kv side channel of TP rank r: NIXL side port + offset * (r + 1)
    # A decode rank waits this long for a prefill rank's pack reply; the prefill rank waits at most half of
    # it for a free staging slot, so that it answers (with the reason) before the decode rank gives up.
    timeout_s: float = 60.0
    # A staged unit nobody read is freed after this. Longer than the reply wait plus the READ, so that a
    # slot is never reused while a slow decode rank may still READ it.
    lease_s: float = 180.0
    backend: str | None = None  # "triton" | "torch" for pack/scatter (default: triton on GPU)
    # auto: the cost model's inputs; unset ones are measured (copy at start-up, descriptor cost at the
    # first handshake with each prefill engine)
    desc_cost_us: float | None = None
    copy_gbps: float | None = None
    auto_concurrency: int = 1  # requests in flight per decode rank that the auto cost model assumes
    # shared secret of the side channels (else $HYBRID_KV_SECRET); never printed
    secret: str | None = field(default=None, repr=False)

    KEYS: ClassVar[dict[str, str]] = {
        "hybrid_kv_staging_bytes": "staging_bytes",
        "hybrid_kv_max_unit_bytes": "max_unit_bytes",
        "hybrid_kv_port_offset": "port_offset",
        "hybrid_kv_timeout_s": "timeout_s",
        "hybrid_kv_staging_lease_s": "lease_s",
        "hybrid_kv_backend": "backend",
        "hybrid_kv_desc_cost_us": "desc_cost_us",
        "hybrid_kv_copy_gbps": "copy_gbps",
        "hybrid_kv_auto_concurrency": "auto_concurrency",
        "hybrid_kv_secret": "secret",
    }

    def __post_init__(self) -> None:
        ints = (("staging_bytes", 4096), ("max_unit_bytes", 16), ("port_offset", 1), ("auto_concurrency", 1))
        for name, low in ints:
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < low:
                raise ValueError(f"{self._key(name)}={v!r} must be an integer >= {low}")
        for name in ("timeout_s", "lease_s"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"{self._key(name)}={v!r} must be a positive number of seconds")
        for name, low_ok in (("desc_cost_us", True), ("copy_gbps", False)):
            v = getattr(self, name)
            if v is None:
                continue
            if not isinstance(v, (int, float)) or isinstance(v, bool) or v < 0 or (v == 0 and not low_ok):
                raise ValueError(f"{self._key(name)}={v!r} must be a {'non-negative' if low_ok else 'positive'} number")
        if self.lease_s < 2 * self.timeout_s:
            raise ValueError(
                f"hybrid_kv_staging_lease_s={self.lease_s!r} must be at least twice hybrid_kv_timeout_s="
                f"{self.timeout_s!r}: a staged slot must outlive the decode rank's wait for it and its READ"
            )
        if self.secret is not None and not isinstance(self.secret, str):
            raise ValueError(f"hybrid_kv_secret must be a string, not {type(self.secret).__name__}")
        if self.backend not in (None, "triton", "torch"):
            raise ValueError(f"hybrid_kv_backend={self.backend!r} (accepted: triton, torch)")

    @classmethod
    def _key(cls, name: str) -> str:
        return next(k for k, v in cls.KEYS.items() if v == name)

    @classmethod
    def from_extra(cls, extra: dict | None) -> PackedConfig:
        extra = extra or {}
        known = {f.name for f in fields(cls)}
        unknown = sorted(k for k in extra if k.startswith("hybrid_kv_") and k not in cls.KEYS)
        if unknown:
            raise ValueError(f"unknown kv_connector_extra_config key(s) {unknown} (hybrid-kv keys: {sorted(cls.KEYS)})")
        kw = {cls.KEYS[k]: v for k, v in extra.items() if k in cls.KEYS and cls.KEYS[k] in known}
        return cls(**kw)

    @classmethod
    def from_transfer_config(cls, kv_transfer_config) -> PackedConfig:
        return cls.from_extra(getattr(kv_transfer_config, "kv_connector_extra_config", None))
