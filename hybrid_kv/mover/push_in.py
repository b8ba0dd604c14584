"""Push mode, decode side: which registered requests are granted their receive slots, which have landed,
and which can fail because nothing can still be in flight into their slots. No I/O: the adapter sends the
grants, hears the notifications and fails the requests.

- Requests are granted in arrival order: while staging is full, later requests wait behind the first that
  does not fit (no starvation of large requests); a request waits at most `timeout_s` for its slots and a
  link to every source, then fails naming which it lacked.
- A granted request fails only when nothing can still be in flight into this rank for it: every source said
  so (`push-end`), or the grant ended (a source starts no WRITE later than its end minus `PUSH_MARGIN_S`),
  or every source's state landed and the engine's own transfers all came, or a source's link was lost
  `PUSH_MARGIN_S` ago (a source drops the grants of a lost connection). Until then its slots stay held; a
  request the engine failed itself waits in quarantine, its slots held, until the same holds.
"""

from __future__ import annotations

import queue

from hybrid_kv.mover.link import PrefillLink
from hybrid_kv.mover.receiver import Granted, Receiver, RecvState

Links = dict[tuple[str, int], PrefillLink]  # (prefill engine, prefill rank) -> this rank's link to it


class PushIn:
    """The push receives of one decode rank, over its `Receiver` (engine thread, but `unsent`)."""

    def __init__(self, rx: Receiver, timeout_s: float, lease_s: float) -> None:
        self.rx, self.timeout_s, self.lease_s = rx, timeout_s, lease_s
        self.granting: list[str] = []  # requests waiting for slots or links, in arrival order
        self.quarantine: dict[str, RecvState] = {}  # failed by the engine while a source may still write
        self.unsent: queue.SimpleQueue = queue.SimpleQueue()  # (request, source, why): a grant not sent (any thread)

    def registered(self, req_id: str, recv: RecvState, now: float) -> None:
        """A request the engine registered with its sources (`recv`: opened by `Receiver.open`)."""
        recv.push = Granted(req_id, now)
        self.granting.append(req_id)

    def waiting(self) -> int:
        return sum(r in self.rx.recvs for r in self.granting)

    def due(self, now: float, links: Links) -> tuple[list[tuple[RecvState, dict]], list[tuple[str, str]]]:
        """Allocate receive slots in arrival order: (the grants to send, {source: (link, grant)} per request;
        the requests to fail, with why)."""
        still, grants, fails, full, err = [], [], [], False, None
        for req_id in self.granting:
            recv = self.rx.recvs.get(req_id)
            if recv is None:
                continue
            if not recv.slots and not full:
                try:
                    self.rx.alloc(req_id, recv)
                except RuntimeError as e:
                    full, err = True, e  # later requests wait behind this one
                except ValueError as e:  # can never fit
                    fails.append((req_id, str(e)))
                    continue
            by = {p: links.get((recv.engine_id, p)) for p in recv.units}
            if recv.slots and all(by.values()):
                msgs = self.rx.grant(recv, now, self.lease_s, {p: link.clock for p, link in by.items()})
                grants.append((recv, {p: (by[p], m) for p, m in msgs.items()}))
            elif now - recv.push.since > self.timeout_s:
                why = err if not recv.slots and full else "no hybrid-kv link to every source prefill rank"
                fails.append((req_id, f"not granted within hybrid_kv_timeout_s={self.timeout_s:g} s: {why}"))
            else:
                still.append(req_id)
        self.granting = still
        return grants, fails

    def landed(self, p: int, req: str) -> bool:
        """Source `p`'s state notification for `req`; False if it matches no grant of this rank."""
        recv = self.rx.recvs.get(req) or self.quarantine.get(req)
        if recv is None or recv.push is None or p not in recv.units or not recv.push.deadline:
            return False
        recv.push.landed.add(p)
        return True

    def pushed(self, req_id: str) -> bool:
        recv = self.rx.recvs.get(req_id)
        return recv is not None and recv.push is not None

    def engine_done(self, req_id: str) -> None:
        """The engine's own transfers of a pushed request (attention KV) all came: it is reported once its
        state has landed and been scattered."""
        self.rx.recvs[req_id].push.stock_done = True

    def give_up(self, req_id: str) -> RecvState | None:
        """The engine failed a pushed request: its slots are free at once if not granted yet, else they wait
        in quarantine until no source can still write into them. The receive, if its sources must hear so."""
        recv = self.rx.recvs.get(req_id)
        if recv is None or recv.push is None or self.rx.in_scatter(req_id):
            return None
        del self.rx.recvs[req_id]
        if req_id in self.granting:
            self.granting.remove(req_id)
        if not recv.push.deadline:
            self.rx.free(recv)
            return None
        self.quarantine[req_id] = recv
        return recv

    def step(self, now: float, links: Links) -> tuple[list[str], list[tuple[str, str]]]:
        """Each step: (the granted requests whose state landed from every source and whose engine transfers
        all came, to scatter; those that can fail now, with why). Quarantined slots are freed once quiet."""
        while not self.unsent.empty():
            req_id, p, why = self.unsent.get()
            recv = self.rx.recvs.get(req_id) or self.quarantine.get(req_id)
            if recv is not None:
                recv.push.ended[p] = why
        landed, fails = [], []
        for req_id, recv in list(self.rx.recvs.items()):
            g = recv.push
            if g is None or not g.deadline or self.rx.in_scatter(req_id):
                continue
            self.news(recv, now, links)
            if g.ended or g.lost or now >= g.deadline:
                if g.quiet(recv.units, now):
                    why = "; ".join(f"prefill rank {p}: {w}" for p, w in g.ended.items()) or (
                        "a source's link was lost" if g.lost else "its grant ended before the state landed"
                    )
                    fails.append((req_id, why))
            elif set(recv.units) <= g.landed and g.stock_done:
                landed.append(req_id)
        for req_id, recv in list(self.quarantine.items()):
            self.news(recv, now, links)
            if recv.push.quiet(recv.units, now) or set(recv.units) <= recv.push.landed | set(recv.push.ended):
                self.rx.free(self.quarantine.pop(req_id))
        return landed, fails

    @staticmethod
    def news(recv: RecvState, now: float, links: Links) -> None:
        """What each source's link says of the request: a `push-end`, or the link lost."""
        g = recv.push
        for p in recv.units:
            link = links.get((recv.engine_id, p))
            if link is None:
                continue
            why = link.take_ended(g.req)
            if why is not None:
                g.ended[p] = why
            if p not in g.landed and p not in g.lost and not link.alive:
                g.lost[p] = now
