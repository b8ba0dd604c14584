"""The packed pull worker: `HybridKVWorker`, vLLM's pull worker forwarding the hooks it overrides to the
object it holds, `hkv` (a `PullPath`: the state mover's pull, vLLM's own implementation where it runs).

Per request the decode rank READs one descriptor per (transfer unit, source rank) from the prefill rank's
staging (packed when the prefill finished and pushed unasked, or packed on its `pack`) into its own
staging, and scatters into its pages before the request is reported done (`hybrid_kv.mover.receiver`). The
stock READ of a request (attention KV) is posted only after every source rank has packed, its notification
held until every READ completed (`surface.holding`). TP sizes that do not divide each other move the
attention KV packed too (`hybrid_kv.vllm.anytp`). Everything else (handshake, TP mapping, attention reads,
leases, heartbeats, failure reporting through `kv_load_failure_policy`) is vLLM's own code path.
"""

from __future__ import annotations

import time
from concurrent.futures import Future

from vllm.distributed.kv_transfer.kv_connector.v1.nixl.pull_worker import NixlPullConnectorWorker

from hybrid_kv.mover import log, pull_in
from hybrid_kv.mover.geometry import pair_attention, pair_tail
from hybrid_kv.mover.plans import AnyTPPlans
from hybrid_kv.mover.receiver import RecvState
from hybrid_kv.staging.chunk import Blocks
from hybrid_kv.vllm import anytp, auto, surface
from hybrid_kv.vllm.rank import PackedRank, without_groups


class PullPath(PackedRank):
    """The pull worker's hooks (`HybridKVWorker` below forwards them)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._peer_addr: tuple[str, int] | None = None

    def foreign(self, remote_tp: int) -> bool:
        """TP sizes that do not divide: vLLM has no descriptors, the whole cache moves packed."""
        return self.geom is not None and AnyTPPlans.moves_kv(remote_tp, self.w.world_size)

    # ---- handshake ------------------------------------------------------------------------------------

    def register(self, kv_caches) -> None:
        super().register(kv_caches)
        if self.geom is not None:  # after vLLM built its topology: route non-dividing handshakes
            w = self.w
            surface.route_handshakes(w.transfer_topo, lambda tp: self.plans.sources(tp, w.world_size)[w.tp_rank])

    def handshake(self, host: str, port: int, remote_tp: int) -> None:
        """Before vLLM's handshake with a prefill engine (one at a time, on the initiator thread)."""
        self._peer_addr = (host, port)
        if self.geom is None:  # no state: vLLM's worker as it is (refusing TP sizes that do not divide)
            anytp.refuse_non_dividing(remote_tp, self.w.world_size, "the model has no recurrent state to pack")
        elif self.foreign(remote_tp):  # before any NIXL agent is added: refused here, with the reason
            self.plans.sources(remote_tp, self.w.world_size)

    def add_remote_agent(self, meta, remote_tp_rank: int, remote_tp_size: int, remote_dcp_size: int) -> str:
        key = (meta.engine_id, remote_tp_rank)
        fresh = self.geom is not None and key not in self.links
        if fresh:
            if self._peer_addr is None:
                raise RuntimeError("hybrid-kv: add_remote_agent called outside a NIXL handshake")
            self.connect(key, remote_tp_size, *self._peer_addr)
        try:
            if self.foreign(remote_tp_size):
                name = anytp.add_foreign_agent(self.w, meta, remote_tp_rank, remote_tp_size, remote_dcp_size)
            else:
                name = self.stock.add_remote_agent(meta, remote_tp_rank, remote_tp_size, remote_dcp_size)
        except BaseException:
            if fresh:
                self.links.pop(key).close()
            raise
        if fresh and self.mode == "auto":
            auto.decide(self, key, remote_tp_size, name)
        return name

    # ---- each step ------------------------------------------------------------------------------------

    def start_load(self, metadata) -> None:
        self.progress()
        self.fence(getattr(metadata, "reqs_to_send", None) or {})  # before the stock worker holds them
        self.stock.start_load_kv(metadata)
        finished = getattr(metadata, "push_finished_blocks", None)
        if self.server is not None and finished and self.geom is not None:
            groups = self.geom.groups + self.geom.attn_groups  # (KV only for pairs that move it)
            todo = {}  # prefills done: pack now (one launch), before any decode rank asks
            for req_id, ids in finished.items():
                blocks = {g: list(ids[g]) for g in groups if g < len(ids) and ids[g]}
                if blocks:
                    todo[req_id] = blocks
            if todo:
                self.server.prepack(todo)

    def transfer_results(self):
        self.progress()
        res = self.stock.get_transfer_results()
        if self.server is not None:
            for req_id in res.finished_sending:  # read (or expired): its staged copies can go
                self.server.sender.forget(req_id)
        return res

    # ---- the decode side: a request's READs ------------------------------------------------------------

    def _paired(self, meta, foreign: bool) -> tuple[Blocks, Blocks]:
        """Per Mamba group, (decode ids, prefill ids) paired from the tail like vLLM (running state last);
        `foreign`: the attention groups too, paired as vLLM pairs them."""
        local, remote = pair_tail(meta.local_block_ids, meta.remote.block_ids, self.geom.groups)
        if foreign:
            lo, re = pair_attention(meta.local_block_ids, meta.remote.block_ids, self.geom.attn_groups)
            local.update(lo)
            remote.update(re)
        return local, remote

    def read(self, req_id: str, meta) -> None:
        w, engine_id = self.w, meta.remote.engine_id
        if (
            self.geom is None
            or engine_id not in w._remote_agents  # vLLM handshakes, then calls this again
            or engine_id in w._invalid_remote_engines
            or self.auto.get(engine_id, {}).get("reads") == "stock"  # auto chose vLLM's own descriptors
        ):
            return self.stock._read_blocks_for_req(req_id, meta)
        remote_tp = w.transfer_topo.get_engine_info(engine_id).remote_tp_size
        foreign = self.foreign(remote_tp)
        local, remote = self._paired(meta, foreign)
        remote_req = meta.remote.request_id
        if not local:  # nothing to move (a full local prefix hit): only notify
            for (eid, _), link in list(self.links.items()):  # its pushes are not READ (the notification
                if eid == engine_id:  # frees the slots there)
                    link.take_staged(remote_req)
            if not foreign:
                return self.stock._read_blocks_for_req(req_id, meta)
            anytp.notify(self, engine_id, remote_req, remote_tp, self.plans.sources(remote_tp, w.world_size)[w.tp_rank])
            if meta.awaiting_kvs:
                w._recving_transfers.setdefault(req_id, [])
            return
        if foreign:  # (vLLM's read would have recorded it: an engine in use is not evicted)
            w._engine_last_active[engine_id] = time.perf_counter()
        try:
            recv = self.rx.open(req_id, meta, engine_id, remote_tp, local, remote, foreign)
            self.rx.alloc(req_id, recv)
        except Exception as e:
            self.fail(req_id, e)
            return
        staged = pull_in.unasked(self.rx, recv, self.links, remote_req)  # packed when the prefill finished
        self.round_trips[req_id] = len(recv.units) - len(staged)
        fut = Future()
        if len(staged) < len(recv.units):
            fut = self.client.submit(self._ask, recv, staged)
        else:
            try:
                fut.set_result(pull_in.announced(self.rx, recv, self.links, remote_req, staged))
            except Exception as e:
                fut.set_exception(e)
        fut.add_done_callback(lambda f, r=req_id: self.ready.put((r, f)))

    def _ask(self, recv: RecvState, staged: dict[int, dict]):
        """(client thread) ask every source prefill rank that has not staged the request to pack; on a
        refusal, release what the others staged."""
        req = recv.meta.remote.request_id
        try:
            return pull_in.announced(self.rx, recv, self.links, req, staged)
        except BaseException:
            self.release(recv.engine_id, req, list(recv.units))
            raise

    def progress(self) -> None:
        """(engine thread) post the READs of requests whose prefill ranks have packed."""
        w = self.w
        while not self.ready.empty():
            req_id, fut = self.ready.get_nowait()
            recv = self.rx.recvs.get(req_id)
            if recv is None:
                continue
            if fut.exception() is not None:
                self.fail(req_id, fut.exception())
                continue
            if req_id not in w._recving_metadata:  # aborted while packing
                self.retire(req_id)
                continue
            try:
                self._post_reads(req_id, recv, fut.result())
            except Exception as e:
                log.error("hybrid-kv: posting the state READs of %s failed: %s", req_id, e)
                w._handle_failed_transfer(req_id, None, w._recv_failures)
                continue
            if recv.foreign:  # all of it packed: the sources are notified once its READs have completed
                continue
            # The stock READ (attention KV; notify-only for state-only sources) goes last, its notification
            # held: it lets the prefill side free the request's blocks and staging.
            with surface.holding(w, recv.engine_id, recv.held):
                self.stock._read_blocks_for_req(req_id, without_groups(recv.meta, self.geom.groups))

    def _post_reads(self, req_id: str, recv: RecvState, staged: dict[int, list[tuple[int, int, int]]]) -> None:
        w = self.w
        nx, mem = w.nixl_wrapper, w.nixl_memory_type
        recv.posted = True
        w._recving_transfers.setdefault(req_id, [])
        for p, units in staged.items():
            agent = w._remote_agents[recv.engine_id][(0, p)]
            for local, remote in self.rx.reads(recv, p, units, self.links[(recv.engine_id, p)].peer["staging"]):
                handle = nx.initialize_xfer("READ", nx.get_xfer_descs([local], mem), nx.get_xfer_descs([remote], mem),
                                            agent)  # fmt: skip
                w._recving_transfers[req_id].append(handle)
                nx.transfer(handle)
                recv.descriptors += 1
        self.descriptors[req_id] = recv.descriptors

    def pop_done(self, transfers):
        w = self.w
        done, failed = self.stock._pop_done_transfers(transfers)
        for req_id in done:  # every READ of these has completed: the sources may free blocks and staging
            recv = self.rx.recvs.get(req_id)
            if recv is not None and recv.held:
                surface.send_held(w, req_id, recv.held)
        landed, now = [], time.monotonic()
        for req_id in list(done):
            recv = self.rx.recvs.get(req_id)
            if recv is None or not recv.posted:
                continue
            if req_id in failed or req_id in w._recv_failures:
                self.retire(req_id)
                continue
            done.discard(req_id)  # reported once its scatter has completed, never before
            if self.rx.late(req_id, now):  # the source may have reused the slot during the READ: bytes unused
                log.error("hybrid-kv: state READ of %s completed after the source's staging lease could have "
                          "ended", req_id)  # fmt: skip
                self.retire(req_id)
                failed.add(req_id)
                continue
            landed.append(req_id)
            if recv.foreign:  # read: a source may free the request's blocks and, with them, its staging
                anytp.notify(self, recv.engine_id, recv.meta.remote.request_id, recv.remote_tp, list(recv.units))
        self.scatter(landed, done, failed)
        return done, failed

    # ---- a request's end ------------------------------------------------------------------------------

    def retire(self, req_id: str) -> None:
        """... and the sources hear that this rank is done with it (their slots can go)."""
        recv = self.rx.drop(req_id)
        self.client.submit(self.release, recv.engine_id, recv.meta.remote.request_id, list(recv.units))


class HybridKVWorker(NixlPullConnectorWorker):
    """`NixlPullConnectorWorker` that moves Mamba/GDN state packed: one descriptor per unit per source (and
    attention KV with it where the TP sizes do not divide each other: `hybrid_kv.vllm.anytp`)."""

    def __init__(self, vllm_config, engine_id: str, kv_cache_config, mode: str = "packed") -> None:
        # refusals first: before the stock worker creates its NIXL agent
        self.hkv = PullPath(self, super(), vllm_config, kv_cache_config, mode)
        with surface.dim_first_view():
            super().__init__(vllm_config, engine_id, kv_cache_config)

    def register_kv_caches(self, kv_caches) -> None:
        self.hkv.register(kv_caches)

    def _nixl_handshake(self, host: str, port: int, remote_tp_size: int, expected_engine_id: str, *args, **kwargs):
        self.hkv.handshake(host, port, remote_tp_size)
        return super()._nixl_handshake(host, port, remote_tp_size, expected_engine_id, *args, **kwargs)

    def add_remote_agent(self, nixl_agent_meta, remote_tp_rank: int = 0, remote_tp_size: int = 1,
                         remote_dcp_size: int = 1):  # fmt: skip
        return self.hkv.add_remote_agent(nixl_agent_meta, remote_tp_rank, remote_tp_size, remote_dcp_size)

    def start_load_kv(self, metadata) -> None:
        self.hkv.start_load(metadata)

    def get_transfer_results(self):
        return self.hkv.transfer_results()

    def _read_blocks_for_req(self, req_id: str, meta) -> None:
        self.hkv.read(req_id, meta)

    def _pop_done_transfers(self, transfers):
        return self.hkv.pop_done(transfers)

    def _reap_expired_send_leases(self, done_sending: set[str]) -> None:
        self.hkv.reap_expired(done_sending)

    def shutdown(self) -> None:
        self.hkv.close()
        super().shutdown()
