"""P -> D transport over NIXL: per-rank endpoints, side-channel handshake, staging pool, packed and
strided modes. Each TP rank runs in its own process with its own NIXL agent (UCX)."""

from hybrid_kv.staging.wire import ProtocolError

MODES = ("packed", "strided", "auto")
ENV_MODE = "HYBRID_KV_TRANSFER"


def resolve_mode(mode: str | None = None) -> str:
    """`mode`, else $HYBRID_KV_TRANSFER, else "packed"; anything else is an error naming the value."""
    from hybrid_kv.staging.mode import parse_mode

    return parse_mode(mode, MODES, "the CLI transport")


__all__ = ["ENV_MODE", "MODES", "ProtocolError", "resolve_mode"]
