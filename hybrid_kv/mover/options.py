"""The state mover's options, as a serving engine's connector configuration carries them (vLLM's
`kv_connector_extra_config`, all keys optional and prefixed `hybrid_kv_`)."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import ClassVar


@dataclass(frozen=True)
class PackedConfig:
    """The packed backend's options, each from its `hybrid_kv_*` key (unknown `hybrid_kv_*` keys are refused)."""

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
