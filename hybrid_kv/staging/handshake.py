"""The page comparison both shells run at hello, before any descriptor exists: the two sides' pages must
correspond byte for byte; a difference is refused with a message naming the field."""

from __future__ import annotations

from hybrid_kv.layout import RankLayout
from hybrid_kv.plan import fingerprint_diff

PEER_FIELDS = ("fingerprint", "tp_size", "tp_rank", "cache_block_size", "block_size", "page_bytes", "num_blocks")


def check_fingerprints(prefill: dict, decode: dict) -> None:
    """Refuse a pair whose pages cannot correspond (model, dtypes, layouts, and every field a shell adds,
    such as the vLLM connector's state layer names and groups: `fingerprint_diff` compares them all)."""
    diff = fingerprint_diff(prefill, decode)
    if diff:
        raise ValueError(f"prefill and decode configurations differ ({diff})")


def peer_layout(local: RankLayout, peer: dict, local_side: str, peer_side: str) -> RankLayout:
    """Validate a CLI peer's hello against our own spec: same model and dtypes, and page anatomy
    consistent with its TP. Returns the peer's layout as we compute it. Raises ValueError naming the field."""
    for key in PEER_FIELDS:
        if key not in peer:
            raise ValueError(f"{peer_side} hello lacks field {key!r}")
    if not isinstance(peer["fingerprint"], dict):
        raise ValueError(f"{peer_side} hello: fingerprint must be an object")
    mine = local.fingerprint()
    if local_side == "prefill":
        check_fingerprints(mine, peer["fingerprint"])
    else:
        check_fingerprints(peer["fingerprint"], mine)
    try:
        theirs = RankLayout(
            local.spec,
            int(peer["tp_size"]),
            int(peer["tp_rank"]),
            local.conv_layout,
            local.kv_layout,
            int(peer["cache_block_size"]),
        )
    except (TypeError, ValueError) as e:
        raise ValueError(f"{peer_side} tp_size={peer.get('tp_size')} / tp_rank={peer.get('tp_rank')}: {e}") from e
    for key in ("block_size", "page_bytes"):
        if getattr(theirs, key) != peer[key]:
            raise ValueError(
                f"{peer_side} {key}={peer[key]} but the model at TP {peer['tp_size']} gives {getattr(theirs, key)}"
            )
    return theirs
