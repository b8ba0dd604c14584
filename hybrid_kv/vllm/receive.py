"""The decode side of the packed pull worker: a request's state chunks -> staged units (pushed when the
prefill finished, else asked for) -> one READ per unit -> one scatter launch per step -> reported received
once that scatter has completed. `StateReceive` (receive slots, the batched scatter, failure and retirement)
is shared with the push worker (`hybrid_kv.vllm.push_recv`); the set-up (`hybrid_kv.vllm.base`) provides
the `_hkv_*` objects."""

from __future__ import annotations

import copy
import queue
import time
from concurrent.futures import Future
from dataclasses import dataclass, field

from vllm.logger import init_logger

from hybrid_kv.staging import messages as M
from hybrid_kv.staging.chunk import Chunk
from hybrid_kv.staging.pool import Slot
from hybrid_kv.vllm.held import holding, send_held
from hybrid_kv.vllm.state import only_moved, pair_attention, pair_tail, state_chunk

log = init_logger("vllm.hybrid_kv")


@dataclass
class RecvState:
    """One request's state receive on this decode rank."""

    meta: object  # vLLM ReqMeta
    engine_id: str
    remote_tp: int
    local: dict[int, list[int]]  # Mamba group -> decode block ids
    remote: dict[int, list[int]]  # Mamba group -> prefill block ids
    chunks: dict[int, Chunk]  # source prefill rank -> this rank's chunk of its state
    units: dict[int, list[int]]  # source prefill rank -> bytes of each of its transfer units
    slots: dict[int, list[Slot]] = field(default_factory=dict)  # source -> receive slots
    read_by: dict[int, float] = field(default_factory=dict)  # source -> its staging lease's end, here
    posted: bool = False
    descriptors: int = 0
    push: object = None  # push mode: the grant's progress (`push_recv.Granted`)
    remote_of: dict[int, dict[int, list[int]]] = field(default_factory=dict)  # source -> its ids, where not all
    foreign: bool = False  # TP sizes that do not divide: attention KV moves here too, no stock READ
    held: list = field(default_factory=list)  # the stock READ's notifications, sent once every READ completed

    def blocks_of(self, p: int) -> dict[int, list[int]]:
        """The prefill block ids source `p` packs (all of `remote` unless its pair moves fewer groups)."""
        return self.remote_of.get(p, self.remote)


class StateReceive:
    """Receive slots, the batched scatter, failure and retirement of a request's state (both modes)."""

    def _alloc_recv(self, req_id: str, recv: RecvState) -> None:
        """All of a request's receive slots or none."""
        assert self._hkv_pool is not None
        try:
            for p, units in recv.units.items():
                got = self._hkv_pool.alloc_all([(req_id, p, u) for u in range(len(units))], units)
                if got is None:
                    raise RuntimeError(
                        f"hybrid-kv receive staging full: request {req_id} needs {sum(units)} B more from "
                        f"prefill rank {p}, {self._hkv_pool.in_use} of {self._hkv_pool.capacity} B in use "
                        "(raise hybrid_kv_staging_bytes)"
                    )
                recv.slots[p] = got
        except BaseException:
            self._free_recv(req_id, recv)
            raise

    def _free_recv(self, req_id: str, recv: RecvState) -> None:
        assert self._hkv_pool is not None
        for slots in recv.slots.values():
            for slot in slots:
                self._hkv_pool.free(slot.key)
        recv.slots.clear()

    def _send_done(self, recv: RecvState, ranks: list[int]) -> None:
        for p in ranks:
            try:
                self._hkv_links[(recv.engine_id, p)].send({"type": M.RELEASE, "req": recv.meta.remote.request_id})
            except Exception as e:  # the prefill lease frees the slots anyway
                log.warning("hybrid-kv: could not release staging of prefill rank %d: %s", p, e)

    def _hkv_fail(self, req_id: str, err: BaseException) -> None:
        log.error("hybrid-kv: state transfer of request %s failed: %s", req_id, err)
        recv = self._hkv_recv.pop(req_id, None)
        if recv is not None:
            self._free_recv(req_id, recv)
        self._handle_failed_transfer(req_id, None, self._recv_failures)

    def _hkv_scatter(self, reqs: list[str], failed: set[str]) -> None:
        """One launch for every request whose state landed this step, on the copier's own stream."""
        assert self._hkv_copier is not None
        jobs = {r: [(c, [s.offset for s in self._hkv_recv[r].slots[p]]) for p, c in self._hkv_recv[r].chunks.items()]
                for r in reqs}  # fmt: skip
        try:
            fin = self._hkv_copier.run([j for r in reqs for j in jobs[r]])
            self._hkv_scattering.append((fin, reqs))
            return
        except Exception as e:  # validated before any byte is written: find the bad request(s)
            log.warning("hybrid-kv: batched scatter of %d request(s) refused (%s); retrying one by one", len(reqs), e)
        for r in reqs:
            try:
                self._hkv_scattering.append((self._hkv_copier.run(jobs[r]), [r]))
            except Exception as e:
                log.error("hybrid-kv: scatter of %s failed: %s", r, e)
                self._hkv_retire(r)
                failed.add(r)

    def _hkv_scattered(self, done: set[str]) -> None:
        """Requests whose scatter has completed: retired and added to `done` (reported received now)."""
        still = []
        for fin, reqs in self._hkv_scattering:
            if not fin.ready():
                still.append((fin, reqs))
                continue
            for req_id in reqs:
                self._hkv_retire(req_id)
                if req_id in self._recving_metadata:  # (not if vLLM failed it meanwhile: reported already)
                    done.add(req_id)
        self._hkv_scattering = still

    def _hkv_retire(self, req_id: str) -> None:
        recv = self._hkv_recv.pop(req_id)
        self._free_recv(req_id, recv)
        self._hkv_client.submit(self._send_done, recv, list(recv.units))


class PackedReceive(StateReceive):
    """Receive path of `HybridKVWorker` (needs vLLM's `NixlPullConnectorWorker` after it in the MRO)."""

    def _paired_blocks(self, meta, foreign: bool) -> tuple[dict[int, list[int]], dict[int, list[int]]]:
        """Per Mamba group, (decode ids, prefill ids) paired from the tail like vLLM (running state last);
        `foreign`: the attention groups too, paired as vLLM pairs them."""
        geom = self._hkv_geom
        local, remote = pair_tail(meta.local_block_ids, meta.remote.block_ids, geom.groups)
        if foreign:
            lo, re = pair_attention(meta.local_block_ids, meta.remote.block_ids, geom.attn_groups)
            local.update(lo)
            remote.update(re)
        return local, remote

    def _read_blocks_for_req(self, req_id: str, meta) -> None:
        engine_id = meta.remote.engine_id
        if (
            self._hkv_geom is None
            or engine_id not in self._remote_agents  # super() handshakes, then calls us again
            or engine_id in self._invalid_remote_engines
        ):
            return super()._read_blocks_for_req(req_id, meta)
        if self.hkv_auto.get(engine_id, {}).get("reads") == "stock":  # auto chose vLLM's own descriptors
            return super()._read_blocks_for_req(req_id, meta)
        remote_tp = self.transfer_topo.get_engine_info(engine_id).remote_tp_size
        foreign = self._hkv_foreign(remote_tp)
        local, remote = self._paired_blocks(meta, foreign)
        if not local:  # nothing to move (a full local prefix hit): only notify
            self._drop_staged(engine_id, meta.remote.request_id)
            if not foreign:
                return super()._read_blocks_for_req(req_id, meta)
            sources = self._hkv_plans.sources(remote_tp, self.world_size)[self.tp_rank]
            self._hkv_notify(engine_id, meta.remote.request_id, remote_tp, sources)
            if meta.awaiting_kvs:
                self._recving_transfers.setdefault(req_id, [])
            return
        if foreign:  # (vLLM's read would have recorded it: an engine in use is not evicted)
            self._engine_last_active[engine_id] = time.perf_counter()
        try:
            geom, plans = self._hkv_geom, self._hkv_plans
            geom.check_blocks(local, "decode")
            pairs = {
                p: plans.pair(remote_tp, self.world_size, p, self.tp_rank)
                for p in plans.sources(remote_tp, self.world_size)[self.tp_rank]
            }
            chunks = {p: state_chunk(pair, geom, only_moved(pair, geom, local), "decode", plans.shapes)
                      for p, pair in pairs.items()}  # fmt: skip
            units = {p: c.unit_bytes for p, c in chunks.items()}
            recv = RecvState(meta, engine_id, remote_tp, local, remote, chunks, units, foreign=foreign)
            for p, pair in pairs.items():
                mine = only_moved(pair, geom, remote)
                if mine != remote:
                    recv.remote_of[p] = mine
            self._alloc_recv(req_id, recv)
        except Exception as e:
            self._hkv_fail(req_id, e)
            return
        self._hkv_recv[req_id] = recv
        staged = {}
        for p in recv.units:  # packed when the prefill finished: no reply to wait for
            push = self._hkv_links[(engine_id, p)].take_staged(meta.remote.request_id)
            if push is not None and self._same_blocks(push, recv.blocks_of(p)) and self._lease_left(recv, p, push):
                staged[p] = push
        self.hkv_round_trips[req_id] = len(recv.units) - len(staged)
        if len(staged) == len(recv.units):
            fut: Future = Future()
            try:
                fut.set_result(self._check_staged(recv, staged))
            except Exception as e:
                fut.set_exception(e)
            self._hkv_ready.put((req_id, fut))
            return
        fut = self._hkv_client.submit(self._request_pack, req_id, recv, staged)
        fut.add_done_callback(lambda f, r=req_id: self._hkv_ready.put((r, f)))

    def _drop_staged(self, engine_id: str, remote_req: str) -> None:
        """Forget the prefill ranks' pushes of a request this rank will not READ (its slots there are freed
        by the stock notification, as for a read request)."""
        for (eid, _), link in list(self._hkv_links.items()):
            if eid == engine_id:
                link.take_staged(remote_req)

    @staticmethod
    def _same_blocks(push: dict, remote: dict[int, list[int]]) -> bool:
        try:
            return M.blocks_of(push.get("blocks")) == remote
        except ValueError:
            return False  # checked again, and refused with its value, by `_check_units`

    def _check_staged(self, recv: RecvState, staged: dict[int, dict]) -> dict[int, list[tuple[int, int, int]]]:
        return {p: self._check_units(recv, p, push) for p, push in staged.items()}

    def _lease_left(self, recv: RecvState, p: int, push: dict) -> bool:
        """Whether a push's lease leaves this rank its whole wait for the READ (else it asks again, and
        the source renews the lease)."""
        try:
            end = self._hkv_links[(recv.engine_id, p)].clock.local(push.get("until"))
        except (AttributeError, ValueError):
            return False
        return end - time.monotonic() > 2 * self.hkv.timeout_s

    def _check_units(self, recv: RecvState, p: int, push: dict) -> list[tuple[int, int, int]]:
        """A source's `ready`, checked against this rank's own chunk and the source's registered staging
        before any READ is posted: every unit of the chunk, each of its planned size, inside the staging;
        and its lease's end on this rank's clock, which the READ must beat (the fence)."""
        link = self._hkv_links[(recv.engine_id, p)]
        size = int(link.peer["staging"][1])
        recv.read_by[p] = link.clock.read_by(push.get("until"), link.peer["lease_s"])
        units = M.ready_units(push, recv.units[p], size, f"prefill rank {p}")
        if len(units) != len(recv.units[p]) or not self._same_blocks(push, recv.blocks_of(p)):
            raise ValueError(
                f"prefill rank {p} announced units {[u for u, _, _ in units]} of blocks "
                f"{push.get('blocks')!r:.120}; this rank needs units 0..{len(recv.units[p]) - 1} of {recv.blocks_of(p)}"
            )
        return sorted(units)

    def _request_pack(self, req_id: str, recv: RecvState, staged: dict | None = None):
        """(client thread) ask every source prefill rank that has not staged the request to pack: its
        `ready` comes ahead of its `ok`."""
        out = self._check_staged(recv, staged or {})
        try:
            for p in recv.units:
                if p in out:
                    continue
                link = self._hkv_links[(recv.engine_id, p)]
                req = recv.meta.remote.request_id
                msg = {"type": M.PACK, "req": req, "blocks": [[g, ids] for g, ids in recv.blocks_of(p).items()]}
                link.call(msg, M.OK)
                push = link.take_staged(req)
                if push is None:
                    raise RuntimeError(f"prefill rank {p} answered pack of {req} without announcing its units")
                out[p] = self._check_units(recv, p, push)
        except BaseException:
            self._send_done(recv, list(out))
            raise
        return out

    def _hkv_progress(self) -> None:
        """(engine thread) post the READs of requests whose prefill ranks have packed."""
        while True:
            try:
                req_id, fut = self._hkv_ready.get_nowait()
            except queue.Empty:
                return
            recv = self._hkv_recv.get(req_id)
            if recv is None:
                continue
            err = fut.exception()
            if err is not None:
                self._hkv_fail(req_id, err)
                continue
            if req_id not in self._recving_metadata:  # aborted while packing
                self._hkv_client.submit(self._send_done, recv, list(recv.units))
                self._free_recv(req_id, self._hkv_recv.pop(req_id))
                continue
            try:
                self._post_reads(req_id, recv, fut.result())
            except Exception as e:
                log.error("hybrid-kv: posting the state READs of %s failed: %s", req_id, e)
                self._handle_failed_transfer(req_id, None, self._recv_failures)
                continue
            # The stock READ (attention KV; notify-only for state-only sources) goes last, its notification
            # held: it lets the prefill side free the request's blocks and staging, so it is sent once the
            # state READs have completed too (`held`).
            if recv.foreign:  # all of it packed: the sources are notified once its READs have completed
                continue
            stock = copy.copy(recv.meta)
            stock.remote = copy.copy(recv.meta.remote)
            groups = set(self._hkv_geom.groups)
            stock.local_block_ids = [[] if g in groups else ids for g, ids in enumerate(recv.meta.local_block_ids)]
            stock.local_physical_block_ids = [
                [] if g in groups else ids for g, ids in enumerate(recv.meta.local_physical_block_ids)
            ]
            stock.remote.block_ids = [[] if g in groups else ids for g, ids in enumerate(recv.meta.remote.block_ids)]
            with holding(self, recv.engine_id, recv.held):
                super()._read_blocks_for_req(req_id, stock)

    def _post_reads(self, req_id: str, recv: RecvState, staged: dict[int, list[tuple[int, int, int]]]) -> None:
        nx, mem = self.nixl_wrapper, self.nixl_memory_type
        base = self._hkv_staging.data_ptr()
        recv.posted = True
        self._recving_transfers.setdefault(req_id, [])
        for p, units in staged.items():
            link = self._hkv_links[(recv.engine_id, p)]
            p_addr, _, p_dev = link.peer["staging"]
            agent = self._remote_agents[recv.engine_id][(0, p)]
            for (_, off, nbytes), slot in zip(units, recv.slots[p]):
                local = nx.get_xfer_descs([(base + slot.offset, int(nbytes), self._hkv_desc[2])], mem)
                remote = nx.get_xfer_descs([(int(p_addr) + int(off), int(nbytes), int(p_dev))], mem)
                handle = nx.initialize_xfer("READ", local, remote, agent)
                self._recving_transfers[req_id].append(handle)
                nx.transfer(handle)
                recv.descriptors += 1
        self.hkv_descriptors[req_id] = recv.descriptors

    def _pop_done_transfers(self, transfers):
        done, failed = super()._pop_done_transfers(transfers)
        for req_id in done:  # every READ of these has completed: the sources may free blocks and staging
            recv = self._hkv_recv.get(req_id)
            if recv is not None and recv.held:
                send_held(self, req_id, recv.held)
        landed = []
        for req_id in list(done):
            recv = self._hkv_recv.get(req_id)
            if recv is None or not recv.posted:
                continue
            if req_id in failed or req_id in self._recv_failures:
                self._hkv_retire(req_id)
            else:
                landed.append(req_id)
                done.discard(req_id)  # reported once its scatter has completed, never before
        now = time.monotonic()
        for req_id in [r for r in landed if now >= min(self._hkv_recv[r].read_by.values(), default=now)]:
            log.error(  # the source may have reused the slot during the READ: the bytes are not used
                "hybrid-kv: state READ of %s completed after the source's staging lease could have ended", req_id
            )
            landed.remove(req_id)
            self._hkv_retire(req_id)
            failed.add(req_id)
        for req_id in landed:  # read: a source may free the request's blocks and, with them, its staging
            recv = self._hkv_recv[req_id]
            if recv.foreign:
                self._hkv_notify(recv.engine_id, recv.meta.remote.request_id, recv.remote_tp, list(recv.units))
        if landed:
            self._hkv_scatter(landed, failed)
        self._hkv_scattered(done)
        return done, failed
