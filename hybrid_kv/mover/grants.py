"""Push mode, prefill side: the receive slots decode ranks grant, kept until a WRITE uses them (the side-channel
server's `grants`; `hybrid_kv.mover.push_out` takes them).

A decode rank that receives in push mode names its engine id and registered receive staging in its
hello. When it has allocated a request's receive slots it sends one `grant` per source prefill rank; the
grant is checked here on arrival against this rank's own plan - the unit sizes of the chunk its block
counts give, each slot inside the staging the decode rank registered, a finite deadline - and a grant
that fails is answered with `push-end`, naming the value, so the decode rank fails the request at once.
Grants are one-way messages: nothing waits on a reply.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from hybrid_kv.mover.sender import Sender
from hybrid_kv.staging import messages as M
from hybrid_kv.staging.template import trim_oldest
from hybrid_kv.staging.wire import ProtocolError

MAX_GRANTS = 4096  # grants kept for requests this rank has not pushed yet
PURGE_EVERY_S = 1.0


@dataclass(frozen=True)
class Grant:
    cid: int  # the connection it came on
    units: list[tuple[int, int, int]]  # (unit, offset into the decode rank's staging, nbytes)
    until: float  # on this rank's clock
    blocks: dict[int, list[int]]  # the decode rank's block ids per Mamba group
    staging: tuple[int, int, int]  # the decode rank's registered receive staging (addr, nbytes, dev)


@dataclass(frozen=True)
class PushPeer:
    engine_id: str
    tp_size: int
    tp_rank: int
    staging: tuple[int, int, int]


class GrantDesk:
    """The grants of one prefill rank; `send(cid, msg)` reaches the decode rank on a connection."""

    def __init__(self, sender: Sender, send: Callable[[int, dict], bool]) -> None:
        self.sender, self.send = sender, send
        self._cv = threading.Lock()
        self._grants: dict[tuple[str, int, str], Grant] = {}  # (engine, decode rank, request) -> grant
        self._push_peers: dict[int, PushPeer] = {}  # connection -> the push decode rank behind it
        self._next_purge = 0.0
        self.on_grant = None  # callable(engine_id, request): a grant arrived (the push worker's wake-up)
        self.on_withdraw = None  # callable(engine_id, decode rank, request): a decode rank gave the request up

    def hello(self, hello: dict, cid: int) -> None:
        """Record a push decode rank's engine id and receive staging (checked; absent in pull mode)."""
        if "staging" not in hello and "engine_id" not in hello:
            return
        where = f"decode rank hello (connection {cid})"
        engine = hello.get("engine_id")
        if not isinstance(engine, str) or not 0 < len(engine) <= M.MAX_REQUEST_ID:
            raise ValueError(f"{where}: engine_id={engine!r:.80} (accepted: a string of 1 to {M.MAX_REQUEST_ID})")
        staging = tuple(M.region(hello.get("staging"), where))
        with self._cv:
            self._push_peers[cid] = PushPeer(engine, int(hello["tp_size"]), int(hello["tp_rank"]), staging)

    def grant(self, head: dict, cid: int) -> None:
        """A decode rank's grant: checked, kept for the push worker, or answered with `push-end`."""
        peer = self._push_peers.get(cid)
        if peer is None:
            raise ProtocolError("grant from a decode rank that named no receive staging in its hello (push mode)")
        req = M.request_id(head.get("req"))
        try:
            until = head.get("until")
            if not isinstance(until, (int, float)) or isinstance(until, bool) or not math.isfinite(until):
                raise ValueError(f"grant until={until!r:.40} (accepted: this rank's monotonic seconds)")
            blocks = M.blocks_of(head.get("blocks"))
            sizes = self._grant_sizes(peer, blocks)
            units = sorted(M.ready_units(head, sizes, peer.staging[1], f"decode rank {peer.tp_rank} (grant)"))
            if len(units) != len(sizes):
                raise ValueError(f"grant of {req} names units {[u for u, _, _ in units]}; the plan has {len(sizes)}")
        except ValueError as e:
            self.push_end(cid, req, f"grant refused: {e}")
            return
        now = time.monotonic()
        with self._cv:
            self._grants[(peer.engine_id, peer.tp_rank, req)] = Grant(cid, units, float(until), blocks, peer.staging)
            if now >= self._next_purge:
                self._next_purge = now + PURGE_EVERY_S
                self._grants = {k: g for k, g in self._grants.items() if g.until > now}
            trim_oldest(self._grants, MAX_GRANTS)
        if self.on_grant is not None:
            self.on_grant(peer.engine_id, req)

    def _grant_sizes(self, peer: PushPeer, blocks: dict[int, list[int]]) -> list[int]:
        """Unit sizes of this rank's chunk for the decode rank, from the grant's block counts per group (the
        shape depends on the counts only: both sides cut the same units)."""
        groups = self.sender.geom.groups
        for g in blocks:
            if g not in groups:
                raise ValueError(f"grant names group {g}, not a Mamba group (Mamba groups: {groups})")
        counts = {g: [0] * len(ids) for g, ids in blocks.items()}
        return self.sender.chunk(peer.tp_size, peer.tp_rank, counts).unit_bytes

    @property
    def kept(self) -> int:
        with self._cv:
            return len(self._grants)

    def grants_ready(self, engine_id: str, ranks, req: str) -> bool:
        with self._cv:
            return all((engine_id, r, req) in self._grants for r in ranks)

    def take_grants(self, engine_id: str, ranks, req: str) -> dict[int, Grant]:
        """The grants of every decode rank in `ranks` for `req` (removed: used once); raises naming the
        ranks whose grant is missing (they are then kept)."""
        with self._cv:
            missing = [r for r in ranks if (engine_id, r, req) not in self._grants]
            if missing:
                raise ValueError(f"no grant of request {req} from decode ranks {missing} of engine {engine_id}")
            return {r: self._grants.pop((engine_id, r, req)) for r in ranks}

    def drop_grants(self, pred) -> list[tuple[tuple[str, int, str], Grant]]:
        """Drop the grants `pred(key, grant)` selects; returns them."""
        with self._cv:
            out = [(k, g) for k, g in self._grants.items() if pred(k, g)]
            for k, _ in out:
                del self._grants[k]
        return out

    def withdraw(self, cid: int, req: str) -> None:
        """`release` from a push decode rank: it failed the request. An unused grant goes, and the decode
        rank hears that nothing was written (`push-end`); a grant already taken is answered by its WRITE's
        notification or by a `push-end` once the WRITE ended. The push worker drops its wait for the rest."""
        peer = self._push_peers.get(cid)
        if peer is None:
            return
        if self.drop_grants(lambda k, g: k == (peer.engine_id, peer.tp_rank, req)):
            self.push_end(cid, req, "grant withdrawn by the decode rank; nothing was written")
        if self.on_withdraw is not None:
            self.on_withdraw(peer.engine_id, peer.tp_rank, req)

    def push_end(self, cid: int, req: str, why: str) -> None:
        """Tell the decode rank on `cid` that nothing for `req` is in flight to it and nothing will be."""
        self.send(cid, M.push_end(req, why))  # (False: the decode rank is gone; its own deadline fails it)

    def push_cid(self, engine_id: str, rank: int) -> int | None:
        """The connection of a push decode rank (the newest, if it reconnected)."""
        with self._cv:
            hits = [c for c, p in self._push_peers.items() if (p.engine_id, p.tp_rank) == (engine_id, rank)]
        return max(hits) if hits else None

    def forget_peer(self, cid: int) -> None:
        with self._cv:
            self._push_peers.pop(cid, None)
            self._grants = {k: g for k, g in self._grants.items() if g.cid != cid}
