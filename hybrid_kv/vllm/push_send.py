"""Push mode, prefill side, in vLLM: when a request's prefill has finished and its decode engine registered it
(vLLM's push flow matches the two on its `nixl-push-writer` thread), each prefill rank waits for the grant of
every decode rank it serves, packs their state slices into its staging (one launch) and WRITEs them, one
descriptor per transfer unit, into the granted receive slots, each WRITE with a state notification; the
attention KV follows on vLLM's stock WRITE, without the Mamba groups. No message of the request waits on a
reply. A request whose state cannot go gets no attention WRITE either.

The match, the WRITEs and their order and safety are the core's (`hybrid_kv.mover.push_out.Pushes`); here
is what vLLM's push worker asks of them, and vLLM's report of a request held while its state is in flight.
"""

from __future__ import annotations

import dataclasses
import threading

from vllm.v1.kv_cache_interface import AttentionSpec

from hybrid_kv.mover import log
from hybrid_kv.mover.geometry import pair_tail
from hybrid_kv.mover.push_out import Pushes
from hybrid_kv.staging import messages as M
from hybrid_kv.vllm.rank import without_groups


class PushSender:
    """Prefill side of the push path (`hybrid_kv.vllm.push.PushPath` holds it as `send`)."""

    def __init__(self, rank) -> None:
        self.rank, self.w, self.stock = rank, rank.w, rank.stock
        self.out: Pushes | None = None  # prefill roles, once the side-channel server exists
        self.lock = threading.Lock()
        self.withheld: set[str] = set()  # reported sent by vLLM while state WRITEs were in flight
        self.stock_issued: set[str] = set()
        self.dests: set[str] = set()  # decode engines this rank pushes to (no hello towards them)
        self.current = None  # the request whose stock WRITEs the writer thread is issuing (stripped)

    def hook(self) -> None:
        """Once the side-channel server exists (prefill roles): hear of grants and withdrawals."""
        if self.rank.server is not None:
            self.out = Pushes(self.rank.server)
            self.rank.server.grants.on_grant = self.on_grant
            self.rank.server.grants.on_withdraw = self.out.on_withdraw

    def targets(self, d_tp: int) -> list[int]:
        """The decode ranks whose state this prefill rank holds a part of (hybrid-kv's plan)."""
        sources = self.rank.plans.sources(self.w.world_size, d_tp)
        return [r for r in range(d_tp) if self.w.tp_rank in sources[r]]

    def needs_state(self, local_block_ids, registration_data) -> bool:
        if self.out is None:
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
        entry = (request_id, local_block_ids, registration_data)
        if not ranks or self.out.match(request_id, d_engine, d_req, ranks, entry):
            self.stock._do_start_push_kv(request_id, local_block_ids, registration_data)

    def on_grant(self, engine_id: str, d_req: str) -> None:
        """(a connection thread) a grant arrived: re-drive a push that waited for it."""
        entry = self.out.on_grant(engine_id, d_req)
        if entry is not None:
            self.w._deferred_push_inbox.put(entry)
            self.w._push_writer_wake.set()

    def xfer_for_req(self, req_id: str, meta) -> None:
        """Pack and WRITE the state (one descriptor per unit per decode rank), then the attention KV on
        vLLM's stock path; nothing at all if the state cannot go."""
        if self.rank.geom is None or self.out is None:
            return self.stock._xfer_blocks_for_req(req_id, meta)
        groups = self.rank.geom.groups
        mine, theirs = pair_tail(meta.local_block_ids, meta.remote.block_ids, groups)
        if not mine:
            return self.stock._xfer_blocks_for_req(req_id, meta)
        d_engine, d_req = meta.remote.engine_id, meta.remote.request_id
        d_tp = self.w.transfer_topo.get_engine_info(d_engine).remote_tp_size
        ranks, w = self.targets(d_tp), self.w

        def agents() -> dict[int, str]:
            with w._handshake_lock:
                return {r: w._remote_agents[d_engine][(0, r)] for r in ranks}

        notif = M.state_notif(w.tp_rank, d_req)
        try:
            out = self.out.write(req_id, d_engine, d_req, ranks, d_tp, mine, theirs, agents, w.nixl_wrapper,
                                 w.nixl_memory_type, notif)  # fmt: skip
        except Exception as e:  # no attention WRITE either: the decode ranks fail it with nothing in flight
            log.error("hybrid-kv: state push of %s to engine %s refused: %s", req_id, d_engine, e)
            return
        self.current = without_groups(meta, groups)  # (writer thread) read by `xfer_blocks`
        try:
            self.stock._xfer_blocks_for_req(req_id, self.current)
        finally:
            self.current = None
            with self.lock:
                issued = req_id in self.stock_issued
                self.stock_issued.discard(req_id)
            self.out.stock_ended(out, issued)

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
        nx, stats = self.w.nixl_wrapper, self.w.xfer_stats
        ended, given_up = self.out.poll(nx, self.w._sending_transfers,
                                        lambda h: stats.record_transfer(nx.get_xfer_telemetry(h)))  # fmt: skip
        for req_id, out in ended.items():
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
        self.out.forget_awaiting(finished)
        for req_id in finished & self.out.live():  # its blocks can go, its staging cannot yet
            finished.discard(req_id)
            self.withheld.add(req_id)
