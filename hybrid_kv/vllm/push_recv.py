"""Push mode, decode side: a request's receive slots are granted to its source prefill ranks before its
prefill ends; they WRITE the state into them, the scatter runs when every source's state notification and
vLLM's attention notifications have arrived, and the request is reported received once it completed.

- When vLLM's push scheduler registers a request (its `push_registrations`), this rank builds the state
  chunk of each source prefill rank from its own block ids, allocates the receive slots (all or none, in
  arrival order while staging is full) and, once its hybrid-kv link to every source is up, sends each a
  `grant` (slot offsets in its registered staging, an end on the source's clock). A request that cannot be
  granted never has its registration sent, so nothing is written for it.
- A request fails only when nothing can still be in flight into this rank for it: every source said so
  (`push-end`), or the grant ended (a source starts no WRITE later than its end minus `PUSH_MARGIN_S`),
  or every source's state landed and vLLM's attention notifications all came, or a source's link was lost
  `PUSH_MARGIN_S` ago (a source drops the grants of a lost connection). Until then its slots stay held.

A component of the push path (`hybrid_kv.vllm.push.PushPath.recv`); its receive slots, grants and scatter are the
core's (`hybrid_kv.mover.receiver.Receiver`).
"""

from __future__ import annotations

import queue
import time

from hybrid_kv.mover import log
from hybrid_kv.mover.receiver import Granted, RecvState
from hybrid_kv.staging import messages as M


class PushReceiver:
    """Decode side of the push path (`hybrid_kv.vllm.push.PushPath` holds it as `recv`)."""

    def __init__(self, rank) -> None:
        self.rank, self.w, self.stock = rank, rank.w, rank.stock
        self.granting: list[str] = []  # requests waiting for slots or links, in arrival order
        self.quarantine: dict[str, RecvState] = {}  # failed by vLLM while a source may still write
        self.unsent: queue.SimpleQueue = queue.SimpleQueue()  # (request, source, why): a grant not sent

    def register(self, metadata) -> None:
        """(engine thread, before vLLM sends the registrations) a receive per registered request."""
        regs = getattr(metadata, "push_registrations", None)
        if self.rank.geom is None or not regs:
            return
        now = time.monotonic()
        for req_id, reg in list(regs.items()):
            ids = reg["local_block_ids"]
            local = {g: list(ids[g]) for g in self.rank.geom.groups if g < len(ids) and ids[g]}
            if not local:
                continue
            try:
                meta, engine = metadata.reqs_to_recv.get(req_id), reg["remote_engine_id"]
                recv = self.rank.rx.open(req_id, meta, engine, int(reg["remote_tp_size"]), local, {})
            except Exception as e:  # unregistered: the prefill side never writes it
                del regs[req_id]
                self.rank.fail(req_id, e)
                continue
            recv.push = Granted(req_id, now)
            self.granting.append(req_id)

    def grant(self) -> None:
        """(engine thread) allocate receive slots in arrival order and grant them where every link is up."""
        now, still, full = time.monotonic(), [], False
        for req_id in self.granting:
            recv = self.rank.rx.recvs.get(req_id)
            if recv is None:
                continue
            late = now - recv.push.since > self.rank.cfg.timeout_s
            if not recv.slots and not full:
                try:
                    self.rank.rx.alloc(req_id, recv)
                except RuntimeError as e:
                    full = True  # later requests wait behind this one
                    err = e
                except ValueError as e:  # can never fit
                    self.fail(req_id, str(e))
                    continue
            links = [self.rank.links.get((recv.engine_id, p)) for p in recv.units]
            if not recv.slots or not all(links):
                if late:
                    why = err if not recv.slots and full else "no hybrid-kv link to every source prefill rank"
                    wait = f"hybrid_kv_timeout_s={self.rank.cfg.timeout_s:g} s"
                    self.fail(req_id, f"not granted within {wait}: {why}")
                else:
                    still.append(req_id)
                continue
            by = dict(zip(recv.units, links))
            msgs = self.rank.rx.grant(recv, now, self.rank.cfg.lease_s, {p: link.clock for p, link in by.items()})
            self.rank.client.submit(self.send_grants, recv.push.req, {p: (by[p], m) for p, m in msgs.items()})
        self.granting = still

    def send_grants(self, req: str, grants: dict) -> None:
        """(client thread) one grant per source; a grant that cannot be sent leaves nothing to write."""
        for p, (link, msg) in grants.items():
            try:
                link.send(msg)
            except Exception as e:  # (the engine thread owns the request's state: it hears of this there)
                self.unsent.put((req, p, f"grant not sent: {e}"))

    def new_notifs(self) -> set[str]:
        """Take the state notifications out of vLLM's queue of forwarded notifications first."""
        q, others = self.w._pending_completion_notifs, []
        while True:
            try:
                notif = q.get_nowait()
            except queue.Empty:
                break
            try:
                hit = M.parse_state_notif(notif)
            except ValueError as e:
                log.error("hybrid-kv: %s", e)
                continue
            if hit is None:
                others.append(notif)
                continue
            p, req = hit
            recv = self.rank.rx.recvs.get(req) or self.quarantine.get(req)
            if recv is None or recv.push is None or p not in recv.units or not recv.push.deadline:
                log.error("hybrid-kv: state notification of %s from prefill rank %d matches no grant", req, p)
                continue
            recv.push.landed.add(p)
        for notif in others:
            q.put(notif)
        return self.stock._get_new_notifs()

    def pop_done(self, transfers):
        done, failed = self.stock._pop_done_transfers(transfers)
        if transfers is not self.w._recving_transfers:
            return done, failed
        for req_id in list(done):  # vLLM's attention notifications all came (or it failed the request)
            recv = self.rank.rx.recvs.get(req_id)
            if recv is None or recv.push is None:
                continue
            if req_id in failed or req_id in self.w._recv_failures:
                self.quarantine[req_id] = self.rank.rx.recvs.pop(req_id)
                self.withdraw(recv)
            else:
                recv.push.stock_done = True
                done.discard(req_id)  # reported once its state is scattered
        while not self.unsent.empty():
            req_id, p, why = self.unsent.get()
            recv = self.rank.rx.recvs.get(req_id) or self.quarantine.get(req_id)
            if recv is not None:
                recv.push.ended[p] = why
        now, landed = time.monotonic(), []
        for req_id, recv in list(self.rank.rx.recvs.items()):
            g = recv.push
            if g is None or not g.deadline or self.rank.rx.in_scatter(req_id):
                continue
            self.source_news(recv, now)
            if g.ended or g.lost or now >= g.deadline:
                if g.quiet(recv.units, now):
                    why = "; ".join(f"prefill rank {p}: {w}" for p, w in g.ended.items()) or (
                        "a source's link was lost" if g.lost else "its grant ended before the state landed"
                    )
                    self.fail(req_id, why)
            elif set(recv.units) <= g.landed and g.stock_done:
                landed.append(req_id)
        self.rank.scatter(landed, done, failed)
        for req_id, recv in list(self.quarantine.items()):
            self.source_news(recv, now)
            if recv.push.quiet(recv.units, now) or set(recv.units) <= recv.push.landed | set(recv.push.ended):
                self.rank.rx.free(self.quarantine.pop(req_id))
        return done, failed

    def failed_by_vllm(self, failed: set[str]) -> None:
        """Requests vLLM failed itself (its handshake, its registration): slots not granted yet are free
        at once; granted ones wait in quarantine until no source can still write into them."""
        for req_id in failed:
            recv = self.rank.rx.recvs.get(req_id)
            if recv is None or recv.push is None or self.rank.rx.in_scatter(req_id):
                continue
            del self.rank.rx.recvs[req_id]
            if req_id in self.granting:
                self.granting.remove(req_id)
            if recv.push.deadline:
                self.quarantine[req_id] = recv
                self.withdraw(recv)
            else:
                self.rank.rx.free(recv)

    def source_news(self, recv: RecvState, now: float) -> None:
        g = recv.push
        for p in recv.units:
            link = self.rank.links.get((recv.engine_id, p))
            if link is None:
                continue
            why = link.take_ended(g.req)
            if why is not None:
                g.ended[p] = why
            if p not in g.landed and p not in g.lost and not link.alive:
                g.lost[p] = now

    def fail(self, req_id: str, why: str) -> None:
        """Nothing is in flight into this rank for the request: fail it (vLLM's failure policy) and free."""
        recv = self.rank.rx.recvs.get(req_id)
        if recv is not None:
            self.withdraw(recv)
        self.rank.fail(req_id, RuntimeError(why))

    def withdraw(self, recv: RecvState) -> None:
        """Tell every source that this rank gave the request up: unused grants go, a source still waiting
        for other decode ranks' grants writes nothing and frees the request's blocks."""
        self.rank.client.submit(self.rank.release, recv.engine_id, recv.push.req, list(recv.units))
