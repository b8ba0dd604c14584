"""The one parser of transfer modes (`HYBRID_KV_TRANSFER`, the CLI's `--mode`)."""

from __future__ import annotations

import os

FLAG = "HYBRID_KV_TRANSFER"
DEFAULT = "packed"


def parse_mode(value: str | None, accepted: tuple[str, ...], what: str, environ=None) -> str:
    """`value` (an argument), else $HYBRID_KV_TRANSFER, else "packed"; case and surrounding spaces are
    ignored; anything not in `accepted` is an error naming the value, where it came from and `what`
    accepts it."""
    env = os.environ if environ is None else environ
    raw = value if value else env.get(FLAG, "")
    src = "argument" if value else FLAG
    name = raw.strip().lower() or DEFAULT
    if name not in accepted:
        raise ValueError(f"transfer mode {raw!r} (from {src}) is not one of {', '.join(accepted)} ({what})")
    return name
