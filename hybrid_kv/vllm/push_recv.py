"""Push mode, decode side, in vLLM: when vLLM's push scheduler registers a request (its
`push_registrations`), this rank opens its receive (its chunk of each source's state, from its own block
ids) and, once slots and a link to every source are there, sends each source a `grant` (slot offsets in its
registered receive staging, an end on the source's clock). A request that cannot be granted never has its
registration sent, so nothing is written for it. The scatter runs when every source's state notification
and vLLM's attention notifications have arrived; the request is reported received once it completed.

Which requests are granted, which landed and when one can fail are the core's (`hybrid_kv.mover.push_in`);
its receive slots, grants and scatter are the `Receiver`'s. A component of `hybrid_kv.vllm.push.PushPath`.
"""

from __future__ import annotations

import queue
import time

from hybrid_kv.mover import log
from hybrid_kv.mover.push_in import PushIn
from hybrid_kv.mover.receiver import RecvState
from hybrid_kv.staging import messages as M


class PushReceiver:
    """Decode side of the push path (`hybrid_kv.vllm.push.PushPath` holds it as `recv`)."""

    def __init__(self, rank) -> None:
        self.rank, self.w, self.stock = rank, rank.w, rank.stock
        self.push: PushIn | None = None  # once the caches are registered, if the model has state

    def registered(self) -> None:
        if self.rank.rx is not None:
            self.push = PushIn(self.rank.rx, self.rank.cfg.timeout_s, self.rank.cfg.lease_s)

    def register(self, metadata) -> None:
        """(engine thread, before vLLM sends the registrations) a receive per registered request."""
        regs = getattr(metadata, "push_registrations", None)
        if self.push is None or not regs:
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
            self.push.registered(req_id, recv, now)

    def grant(self) -> None:
        """(engine thread) allocate receive slots in arrival order and grant them where every link is up."""
        if self.push is None:
            return
        grants, fails = self.push.due(time.monotonic(), self.rank.links)
        for req_id, why in fails:
            self.fail(req_id, why)
        for recv, msgs in grants:
            self.rank.client.submit(self.send_grants, recv.push.req, msgs)

    def send_grants(self, req: str, grants: dict) -> None:
        """(client thread) one grant per source; a grant that cannot be sent leaves nothing to write."""
        for p, (link, msg) in grants.items():
            try:
                link.send(msg)
            except Exception as e:  # (the engine thread owns the request's state: it hears of this there)
                self.push.unsent.put((req, p, f"grant not sent: {e}"))

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
            elif self.push is None or not self.push.landed(*hit):
                log.error("hybrid-kv: state notification of %s from prefill rank %d matches no grant", hit[1], hit[0])
        for notif in others:
            q.put(notif)
        return self.stock._get_new_notifs()

    def pop_done(self, transfers):
        done, failed = self.stock._pop_done_transfers(transfers)
        if transfers is not self.w._recving_transfers or self.push is None:
            return done, failed
        for req_id in list(done):  # vLLM's attention notifications all came (or it failed the request)
            if not self.push.pushed(req_id):
                continue
            if req_id in failed or req_id in self.w._recv_failures:
                self.withdraw(self.push.give_up(req_id))
            else:
                self.push.engine_done(req_id)
                done.discard(req_id)  # reported once its state is scattered
        landed, fails = self.push.step(time.monotonic(), self.rank.links)
        for req_id, why in fails:
            self.fail(req_id, why)
        self.rank.scatter(landed, done, failed)
        return done, failed

    def failed_by_vllm(self, failed: set[str]) -> None:
        """Requests vLLM failed itself (its handshake, its registration): slots not granted yet are free
        at once; granted ones wait in quarantine until no source can still write into them."""
        if self.push is not None:
            for req_id in failed:
                self.withdraw(self.push.give_up(req_id))

    def fail(self, req_id: str, why: str) -> None:
        """Nothing is in flight into this rank for the request: fail it (vLLM's failure policy) and free."""
        self.withdraw(self.rank.rx.recvs.get(req_id))
        self.rank.fail(req_id, RuntimeError(why))

    def withdraw(self, recv: RecvState | None) -> None:
        """Tell every source that this rank gave the request up: unused grants go, a source still waiting
        for other decode ranks' grants writes nothing and frees the request's blocks."""
        if recv is not None:
            self.rank.client.submit(self.rank.release, recv.engine_id, recv.push.req, list(recv.units))
