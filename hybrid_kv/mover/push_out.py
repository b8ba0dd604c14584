"""Push mode, prefill side: each request's state WRITEs, from the match of its finished prefill with a
decode registration to the end of its last WRITE. The adapter tells when the engine matched a request and
when its own WRITE of the attention KV was issued; the NIXL calls are the agent's (`nx`).

Order and safety:

- nothing of a request is written (state or attention) before every decode rank it serves has granted
  (`match` waits, `on_grant` re-drives), and nothing starts later than a grant's end minus `PUSH_MARGIN_S`,
  the decode rank's fence (`Sender.stage_writes` checks each grant);
- a decode rank that gives the request up before the match (`on_withdraw`) gets nothing: the other decode
  ranks that granted hear `push-end`, so none of them fails the request with a WRITE in flight;
- the staging slots stay held until every state WRITE has ended and the engine's own WRITE was issued; a
  failed state WRITE is reported (`push-end`) once nothing else of the request is in flight to it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Container
from dataclasses import dataclass, field

from hybrid_kv.mover import log
from hybrid_kv.mover.server import PrefillServer
from hybrid_kv.staging.chunk import Blocks
from hybrid_kv.staging.template import trim_oldest

ALLOC_WAIT_S = 2.0  # the writer waits at most this long for staging (slots free as WRITEs end)
MAX_WITHDRAWN = 4096  # requests given up by a decode rank before their match, remembered


@dataclass
class PushOut:
    """One request's state WRITEs from this prefill rank."""

    d_engine: str
    d_req: str
    handles: dict[int, object] = field(default_factory=dict)  # decode rank -> WRITE in flight
    failed: dict[int, str] = field(default_factory=dict)  # decode rank -> why nothing (more) reaches it
    stock_pending: bool = True  # the engine's WRITE of the attention KV is being issued
    stock: bool = False  # ... and it issued one (the engine then reports the request sent)
    descriptors: int = 0


class Pushes:
    """The state WRITEs of one prefill rank (thread-safe: the engine's writer and engine threads, and the
    side channel's connection threads, call it)."""

    def __init__(self, server: PrefillServer) -> None:
        self.desk, self.sender = server.grants, server.sender
        self.lock = threading.Lock()
        self.pushes: dict[str, PushOut] = {}  # request -> its state WRITEs
        self.awaiting: dict[tuple[str, str], tuple] = {}  # (decode engine, its request) -> the match, waiting
        self.withdrawn: dict[tuple[str, str], bool] = {}  # given up by a decode rank before the match
        self.given_up: set[str] = set()  # nothing will be written: the engine reports it sent (frees the blocks)
        self.descriptors: dict[str, int] = {}  # state WRITE descriptors per request (tests, bench)

    # ---- the match ------------------------------------------------------------------------------------

    def match(self, req_id: str, d_engine: str, d_req: str, ranks: list[int], entry: tuple) -> bool:
        """The engine matched a finished request with decode ranks `ranks`: whether to push now (every grant
        is here). Otherwise `entry` waits for the grants (`on_grant` hands it back) or the push is given up."""
        key = (d_engine, d_req)
        with self.lock:
            if self.withdrawn.pop(key, False):
                self.given_up.add(req_id)
            elif not self.desk.grants_ready(d_engine, ranks, d_req):
                self.awaiting[key] = (*entry, ranks)
                return False
            else:
                self.awaiting.pop(key, None)
                return True
        self.end_grants(d_engine, d_req, "a decode rank gave the request up; nothing was written")
        return False

    def on_grant(self, engine_id: str, d_req: str) -> tuple | None:
        """(a connection thread) a grant arrived: the match that waited for it, if every grant is here now."""
        with self.lock:
            entry = self.awaiting.get((engine_id, d_req))
            if entry is None or not self.desk.grants_ready(engine_id, entry[-1], d_req):
                return None
            del self.awaiting[(engine_id, d_req)]
        return entry[:-1]

    def on_withdraw(self, engine_id: str, rank: int, d_req: str) -> None:
        """(a connection thread) a decode rank failed the request: unless this rank already wrote it, give the
        push up (now, or at its match: remembered); the decode ranks that granted hear so."""
        with self.lock:
            entry = self.awaiting.pop((engine_id, d_req), None)
            if entry is None:
                self.withdrawn[(engine_id, d_req)] = True
                trim_oldest(self.withdrawn, MAX_WITHDRAWN)
                return
            self.given_up.add(entry[0])
        self.end_grants(engine_id, d_req, f"decode rank {rank} gave the request up; nothing was written")

    def end_grants(self, engine_id: str, d_req: str, why: str) -> None:
        for _, g in self.desk.drop_grants(lambda k, g: k[0] == engine_id and k[2] == d_req):
            self.desk.push_end(g.cid, d_req, why)

    def forget_awaiting(self, finished: set[str]) -> None:
        """Matches whose request the engine finished (its lease ended before every grant came)."""
        with self.lock:
            for key, entry in list(self.awaiting.items()):
                if entry[0] in finished:
                    del self.awaiting[key]

    # ---- the WRITEs -----------------------------------------------------------------------------------

    def write(self, req_id: str, d_engine: str, d_req: str, ranks: list[int], d_tp: int, mine: Blocks,
              theirs: Blocks, agents: Callable[[], dict[int, str]], nx, mem, notif: bytes) -> PushOut:  # fmt: skip
        """Stage the state slices of every decode rank in `ranks` into this rank's staging (one launch; every
        grant checked first) and WRITE each into the slots it granted, one descriptor per unit, with the state
        notification. Raises if nothing can go: then no decode rank gets anything, state or attention."""
        out = PushOut(d_engine, d_req)
        with self.lock:
            self.pushes[req_id] = out  # from now on the engine's report of the request waits for it
        try:
            grants = self.desk.take_grants(d_engine, ranks, d_req)
            writes = self.sender.stage_writes(req_id, d_tp, mine, theirs, grants, ALLOC_WAIT_S, d_req)
            try:
                to = agents()
            except BaseException:
                self.sender.free_where(lambda k: k[:2] == ("push", req_id))
                raise
            for r, (local, remote) in writes.items():
                handle = nx.initialize_xfer("WRITE", nx.get_xfer_descs(local, mem), nx.get_xfer_descs(remote, mem),
                                            to[r], notif)  # fmt: skip
                nx.transfer(handle)
                with self.lock:
                    out.handles[r] = handle
                    out.descriptors += len(local)
        except Exception as e:
            with self.lock:
                out.failed.update((r, f"{type(e).__name__}: {e}") for r in ranks if r not in out.handles)
                out.stock_pending = False
            raise
        self.descriptors[req_id] = out.descriptors
        return out

    def stock_ended(self, out: PushOut, issued: bool) -> None:
        """The engine's WRITEs of the attention KV were issued (`issued`: at least one)."""
        with self.lock:
            out.stock, out.stock_pending = issued, False

    def poll(self, nx, sending: Container[str], on_done: Callable) -> tuple[dict[str, PushOut], set[str]]:
        """Retire ended state WRITEs (`on_done(handle)` for each that completed): (the requests whose every
        WRITE ended, their slots freed and their failures reported; the requests given up). `sending`: the
        requests the engine still sends (a failed request's `push-end` waits for its attention WRITEs)."""
        with self.lock:
            pushes = list(self.pushes.items())
            given_up, self.given_up = self.given_up, set()
        ended = {}
        for req_id, out in pushes:
            for r, handle in list(out.handles.items()):
                try:
                    state = nx.check_xfer_state(handle)
                except Exception as e:
                    state = f"an error ({e})"
                if state == "PROC":
                    continue
                if state == "DONE":
                    on_done(handle)
                else:
                    out.failed[r] = f"state WRITE ended {state}"
                try:
                    nx.release_xfer_handle(handle)
                except Exception as e:  # a status error does not prove the DMA stopped: keep the slots
                    log.error("hybrid-kv: releasing the state WRITE of %s failed: %s", req_id, e)
                    continue
                with self.lock:
                    del out.handles[r]
            with self.lock:
                if out.handles or out.stock_pending or (out.failed and req_id in sending):
                    continue
                del self.pushes[req_id]
            for r, why in out.failed.items():  # nothing of the request is in flight to them any more
                cid = self.desk.push_cid(out.d_engine, r)
                if cid is not None:
                    self.desk.push_end(cid, out.d_req, why)
            self.sender.free_where(lambda k, q=req_id: k[:2] == ("push", q))
            ended[req_id] = out
        return ended, given_up

    def live(self) -> set[str]:
        with self.lock:
            return set(self.pushes)
