"""Pull mode, decode side: each source's announcement (`ready`) of a request's state, checked against this
rank's own chunk before any READ is posted. A source whose prefill finished packs before anyone asks and
pushes its `ready` unasked (`unasked`: used if its lease leaves this rank its whole wait); the others are
asked with `pack`, one round trip each (`announced`, on a thread that may block).
"""

from __future__ import annotations

from hybrid_kv.mover.link import PrefillLink
from hybrid_kv.mover.receiver import Receiver, RecvState

Units = list[tuple[int, int, int]]  # (unit, offset in the source's staging, bytes), checked


def unasked(rx: Receiver, recv: RecvState, links: dict[tuple[str, int], PrefillLink], req: str) -> dict[int, dict]:
    """The `ready` each source pushed unasked for `req` (the sources' id of it) that is still fresh; every
    push of the request is taken, fresh or not (a stale one is asked for again)."""
    out = {}
    for p in recv.units:
        link = links[(recv.engine_id, p)]
        ready = link.take_staged(req)
        if ready is not None and rx.fresh(recv, p, ready, link):
            out[p] = ready
    return out


def announced(rx: Receiver, recv: RecvState, links: dict[tuple[str, int], PrefillLink], req: str,
              staged: dict[int, dict]) -> dict[int, Units]:  # fmt: skip
    """Every source's units of the request, checked: the `staged` ones, and a `pack` asked of each other
    source (blocks). Raises on the first refusal or failed check."""
    out = {p: rx.check_ready(recv, p, ready, links[(recv.engine_id, p)]) for p, ready in staged.items()}
    for p in recv.units:
        if p not in out:
            link = links[(recv.engine_id, p)]
            out[p] = rx.check_ready(recv, p, link.pack(req, recv.blocks_of(p)), link)
    return out
