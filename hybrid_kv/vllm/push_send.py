"""Push mode, prefill side: when a request's prefill has finished and its decode engine registered it
(vLLM's push flow matches the two on its `nixl-push-writer` thread), each prefill rank packs the state
slices of every decode rank it serves into its staging (one launch) and WRITEs them, one descriptor per
transfer unit, into the receive slots those decode ranks granted (`grants.GrantDesk`), each WRITE with a
state notification; the attention KV follows on vLLM's stock WRITE, without the Mamba groups. No message
of the request waits on a reply.

Order and safety:

- nothing of a request is written (state or attention) before every decode rank it serves has granted,
  and nothing starts later than a grant's end minus `PUSH_MARGIN_S`, the decode rank's fence;
- a grant that cannot be used is answered with `push-end` and then nothing is written for the request
  at all, so a decode rank that fails a request on it never has a WRITE in flight into its pages;
- the staging slots stay held, and the request is not reported sent to vLLM's scheduler, until every
  state WRITE has ended; a failed state WRITE is reported (`push-end`) once the stock WRITEs ended too.

What is staged and written, and the checks of each grant, are the core's (`Sender.stage_writes`).
"""

from __future__ import annotations

import dataclasses
import threading
from dataclasses import dataclass, field

from vllm.v1.kv_cache_interface import AttentionSpec

from hybrid_kv.mover import log
from hybrid_kv.mover.geometry import pair_tail
from hybrid_kv.staging import messages as M
from hybrid_kv.vllm.rank import without_groups

ALLOC_WAIT_S = 2.0  # the writer thread waits at most this long for staging (slots free as WRITEs end)


@dataclass
class PushOut:
    """One request's state WRITEs from this prefill rank."""

    d_engine: str
    d_req: str
    handles: dict[int, object] = field(default_factory=dict)  # decode rank -> WRITE in flight
    failed: dict[int, str] = field(default_factory=dict)  # decode rank -> why nothing (more) reaches it
    stock_pending: bool = True  # vLLM's WRITE of the attention KV is being issued
    stock: bool = False  # ... and it issued one (vLLM then reports the request sent)
    descriptors: int = 0


class PushSender:
    """Prefill side of the push path (`hybrid_kv.vllm.push.PushPath` holds it as `send`)."""

    def __init__(self, rank) -> None:
        self.rank, self.w, self.stock = rank, rank.w, rank.stock
        self.lock = threading.Lock()
        self.pushes: dict[str, PushOut] = {}  # request -> its state WRITEs
        self.awaiting: dict[tuple[str, str], tuple] = {}  # (decode engine, its request) -> push args
        self.withheld: set[str] = set()  # reported sent by vLLM while state WRITEs were in flight
        self.given_up: set[str] = set()  # nothing will be written: to report sent (frees the blocks)
        self.withdrawn: dict[tuple[str, str], bool] = {}  # given up by a decode rank before the match
        self.stock_issued: set[str] = set()
        self.dests: set[str] = set()  # decode engines this rank pushes to (no hello towards them)
        self.descriptors: dict[str, int] = {}  # state WRITE descriptors per request (tests, bench)
        self.current = None  # the request whose stock WRITEs the writer thread is issuing (stripped)

    def hook(self) -> None:
        """Once the side-channel server exists (prefill roles): hear of grants and withdrawals."""
        if self.rank.server is not None:
            self.rank.server.grants.on_grant = self.on_grant
            self.rank.server.grants.on_withdraw = self.on_withdraw

    def targets(self, d_tp: int) -> list[int]:
        """The decode ranks whose state this prefill rank holds a part of (hybrid-kv's plan)."""
        sources = self.rank.plans.sources(self.w.world_size, d_tp)
        return [r for r in range(d_tp) if self.w.tp_rank in sources[r]]

    def needs_state(self, local_block_ids, registration_data) -> bool:
        if self.rank.server is None:
            return False
        grouped = self.w._as_grouped_block_ids
        theirs = grouped(registration_data["local_block_ids"])
        return bool(pair_tail(grouped(local_block_ids), theirs, self.rank.geom.groups)[0])

    # ---- the writer thread ---------------------------------------------------------------------------

    def start_push(self, request_id: str, local_block_ids, registration_data: dict) -> None:
        """vLLM matched a finished request with a decode registration: wait (without blocking) for every
        decode rank's grant, then let vLLM's handshake and `_xfer_blocks_for_req` run."""
        try:
            d_engine, d_req = registration_data["decode_engine_id"], registration_data["request_id"]
            needs = self.needs_state(local_block_ids, registration_data)
            ranks = self.targets(int(registration_data["decode_tp_size"])) if needs else []
        except Exception as e:  # vLLM's own code names what is wrong with the registration
            log.warning("hybrid-kv: push registration of %s not understood: %s", request_id, e)
            return self.stock._do_start_push_kv(request_id, local_block_ids, registration_data)
        self.dests.add(d_engine)
        if ranks:
            with self.lock:
                withdrawn = self.withdrawn.pop((d_engine, d_req), False)
                if withdrawn:
                    self.given_up.add(request_id)
                elif not self.rank.server.grants.grants_ready(d_engine, ranks, d_req):
                    self.awaiting[(d_engine, d_req)] = (request_id, local_block_ids, registration_data, ranks)
                    return
                else:
                    self.awaiting.pop((d_engine, d_req), None)
            if withdrawn:
                self.end_grants(d_engine, d_req, "a decode rank gave the request up; nothing was written")
                return
        self.stock._do_start_push_kv(request_id, local_block_ids, registration_data)

    def on_grant(self, engine_id: str, d_req: str) -> None:
        """(a connection thread) a grant arrived: re-drive a push that waited for it."""
        with self.lock:
            entry = self.awaiting.get((engine_id, d_req))
            if entry is None or not self.rank.server.grants.grants_ready(engine_id, entry[3], d_req):
                return
            del self.awaiting[(engine_id, d_req)]
        self.w._deferred_push_inbox.put(entry[:3])
        self.w._push_writer_wake.set()

    def on_withdraw(self, engine_id: str, rank: int, d_req: str) -> None:
        """(a connection thread) a decode rank failed the request: unless this rank already wrote it, give the
        push up (now, or when vLLM matches it: remembered); the decode ranks that granted hear so, and the
        blocks are freed."""
        with self.lock:
            entry = self.awaiting.pop((engine_id, d_req), None)
            if entry is None:
                self.withdrawn[(engine_id, d_req)] = True
                while len(self.withdrawn) > 4096:
                    self.withdrawn.pop(next(iter(self.withdrawn)))
                return
            self.given_up.add(entry[0])
        self.end_grants(engine_id, d_req, f"decode rank {rank} gave the request up; nothing was written")

    def end_grants(self, engine_id: str, d_req: str, why: str) -> None:
        desk = self.rank.server.grants
        for _, g in desk.drop_grants(lambda k, g: k[0] == engine_id and k[2] == d_req):
            desk.push_end(g.cid, d_req, why)

    def xfer_for_req(self, req_id: str, meta) -> None:
        """Pack and WRITE the state (one descriptor per unit per decode rank), then the attention KV on
        vLLM's stock path; nothing at all if the state cannot go."""
        if self.rank.geom is None or self.rank.server is None:
            return self.stock._xfer_blocks_for_req(req_id, meta)
        groups = self.rank.geom.groups
        mine, theirs = pair_tail(meta.local_block_ids, meta.remote.block_ids, groups)
        if not mine:
            return self.stock._xfer_blocks_for_req(req_id, meta)
        d_engine, d_req = meta.remote.engine_id, meta.remote.request_id
        d_tp = self.w.transfer_topo.get_engine_info(d_engine).remote_tp_size
        ranks = self.targets(d_tp)
        out = PushOut(d_engine, d_req)
        with self.lock:
            self.pushes[req_id] = out  # from now on vLLM's report of the request waits for it
        try:
            self.write_state(req_id, out, ranks, d_tp, mine, theirs)
        except Exception as e:
            log.error("hybrid-kv: state push of %s to engine %s refused: %s", req_id, d_engine, e)
            with self.lock:
                out.failed.update((r, f"{type(e).__name__}: {e}") for r in ranks if r not in out.handles)
                out.stock_pending = False
            return  # no attention WRITE either: the decode ranks fail the request with nothing in flight
        self.current = without_groups(meta, groups)  # (writer thread) read by `xfer_blocks`
        try:
            self.stock._xfer_blocks_for_req(req_id, self.current)
        finally:
            self.current = None
            with self.lock:
                out.stock = req_id in self.stock_issued
                self.stock_issued.discard(req_id)
                out.stock_pending = False

    def write_state(self, req_id: str, out: PushOut, ranks, d_tp: int, mine, theirs) -> None:
        sender = self.rank.server.sender
        grants = self.rank.server.grants.take_grants(out.d_engine, ranks, out.d_req)
        writes = sender.stage_writes(req_id, d_tp, mine, theirs, grants, ALLOC_WAIT_S, out.d_req)  # checked, staged
        try:
            with self.w._handshake_lock:
                agents = {r: self.w._remote_agents[out.d_engine][(0, r)] for r in ranks}
        except BaseException:
            sender.free_where(lambda k: k[:2] == ("push", req_id))
            raise
        nx, mem, notif = self.w.nixl_wrapper, self.w.nixl_memory_type, M.state_notif(self.w.tp_rank, out.d_req)
        for r, (local, remote) in writes.items():
            handle = nx.initialize_xfer("WRITE", nx.get_xfer_descs(local, mem), nx.get_xfer_descs(remote, mem),
                                        agents[r], notif)  # fmt: skip
            nx.transfer(handle)
            with self.lock:
                out.handles[r] = handle
                out.descriptors += len(local)
        self.descriptors[req_id] = out.descriptors

    def replicated_heads(self, read_spec, dst_engine_id: str):
        """vLLM's push writes attention only to the first decode rank of each KV head (its pull dedup, from
        the writer's side): a decode rank holding a replicated head (decode TP > KV heads) would get none.
        Give those ranks the request's attention ids: vLLM's local split for them is already that head's."""
        cur, topo = self.current, self.w.transfer_topo
        d_tp = topo.get_engine_info(dst_engine_id).remote_tp_size
        if cur is None or self.w.use_mla or d_tp <= max(self.w.world_size, topo.total_num_kv_heads):
            return read_spec
        attn = {g for g, t in enumerate(self.w._group_spec_types) if issubclass(t, AttentionSpec)}
        if all(read_spec.local_block_ids[g] or not cur.local_physical_block_ids[g] for g in attn):
            return read_spec
        return dataclasses.replace(
            read_spec,
            local_block_ids=[list(cur.local_physical_block_ids[g]) if g in attn else list(ids)
                             for g, ids in enumerate(read_spec.local_block_ids)],
            remote_block_ids=[list(cur.remote.block_ids[g]) if g in attn else list(ids)
                              for g, ids in enumerate(read_spec.remote_block_ids)],
        )  # fmt: skip

    def xfer_blocks(self, read_spec, dst_engine_id: str, request_id: str, remote_request_id: str, *args, **kwargs):
        if self.rank.geom is not None:
            read_spec = self.replicated_heads(read_spec, dst_engine_id)
        if self.rank.geom is not None and not any(read_spec.local_block_ids):
            # no attention KV for this decode rank (its state went packed): vLLM's notification alone
            agent = self.w._remote_agents[dst_engine_id][(0, read_spec.remote_rank)]
            try:
                self.w.nixl_wrapper.send_notif(agent, notif_msg=f"{remote_request_id}:{self.w.world_size}".encode())
            except Exception as e:  # the decode rank fails the request at its grant's end
                log.error("hybrid-kv: notifying decode rank %d of %s failed: %s", read_spec.remote_rank, request_id, e)
            return None
        handle = self.stock._xfer_blocks(read_spec, dst_engine_id, request_id, remote_request_id, *args, **kwargs)
        if handle is not None:
            with self.lock:
                self.stock_issued.add(request_id)
        return handle

    # ---- the engine thread -----------------------------------------------------------------------------

    def poll(self, finished: set[str]) -> None:
        """Retire ended state WRITEs; hold vLLM's report of a request back while its state is in flight."""
        with self.lock:
            pushes = list(self.pushes.items())
            given_up, self.given_up = self.given_up, set()
        nx = self.w.nixl_wrapper
        for req_id, out in pushes:
            for r, handle in list(out.handles.items()):
                try:
                    state = nx.check_xfer_state(handle)
                except Exception as e:
                    state = f"an error ({e})"
                if state == "PROC":
                    continue
                if state == "DONE":
                    self.w.xfer_stats.record_transfer(nx.get_xfer_telemetry(handle))
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
                busy = out.handles or out.stock_pending or (out.failed and req_id in self.w._sending_transfers)
                if busy:
                    continue
                del self.pushes[req_id]
            desk = self.rank.server.grants
            for r, why in out.failed.items():  # nothing of the request is in flight to them any more
                cid = desk.push_cid(out.d_engine, r)
                if cid is not None:
                    desk.push_end(cid, out.d_req, why)
            self.rank.server.sender.free_where(lambda k, q=req_id: k[:2] == ("push", q))
            if req_id in self.withheld:
                self.withheld.discard(req_id)
                finished.add(req_id)
            elif not out.stock:  # vLLM issued no WRITE for it, so it will not report it: done here
                given_up.add(req_id)
        for req_id in given_up:
            if req_id in self.w._reqs_to_send or req_id in self.w._reqs_to_process:
                self.w._reqs_to_send.pop(req_id, None)
                self.w._reqs_to_process.discard(req_id)
                self.w.consumer_notification_counts_by_req.pop(req_id, None)
                self.w._evict_finished_inbox.put(req_id)
                self.w._push_writer_wake.set()
                finished.add(req_id)
        with self.lock:
            live = set(self.pushes)
            for key, entry in list(self.awaiting.items()):
                if entry[0] in finished:  # its lease ended before every grant came
                    del self.awaiting[key]
        for req_id in finished & live:  # its blocks can go, its staging cannot yet
            finished.discard(req_id)
            self.withheld.add(req_id)
