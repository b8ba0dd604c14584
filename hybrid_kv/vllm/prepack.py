"""Packing when a prefill finishes, before any decode rank asks (a mixin of `channel.PrefillServer`).

The engine thread hands over the requests whose prefill finished in one step; a worker thread packs them
for every connected decode rank in one launch (behind the step's fence) and pushes one ``ready`` per
(request, decode rank), so the decode READs wait on no reply of their own. Best effort: what finds no slot,
or fails, is packed when the decode rank asks."""

from __future__ import annotations

import time

from vllm.logger import init_logger

from hybrid_kv.staging import messages as M
from hybrid_kv.staging.wire import send_msg
from hybrid_kv.vllm.state import only_moved, pair_groups, state_chunk

log = init_logger("vllm.hybrid_kv")


def units(offsets: list[int], sizes: list[int]) -> list[tuple[int, int, int]]:
    """(unit, offset, nbytes) of a request's staged units, as `ready` announces them."""
    return [(u, o, n) for u, (o, n) in enumerate(zip(offsets, sizes))]


class PackAtFinish:
    """Needs the server's geometry, plans, peers, pool, copier, fences and locks (`PrefillServer`)."""

    def prepack(self, requests: dict[str, dict[int, list[int]]]) -> None:
        """Queue packing `requests` (id -> block ids per Mamba group; their prefills finished in one step)
        for every decode rank connected now: one launch for all, then a `staged` push per (request, decode
        rank), so their READs wait on no reply. Best effort: a decode rank that finds nothing staged asks."""
        self._prepacker.submit(self._prepack, dict(requests))

    def _prepack(self, requests: dict[str, dict[int, list[int]]]) -> None:
        lay = self.geom.layout
        jobs, pushes = [], []
        for cid, (conn, lock, dec) in list(self._peers.items()):
            if cid in self._no_push:
                continue
            try:
                pair = self.plans.pair(lay.tp_size, dec.tp_size, lay.tp_rank, dec.tp_rank)
            except ValueError:  # (a pair this rank refuses: refused again, with the reason, when asked)
                continue
            if not pair_groups(pair, self.geom):
                continue
            for req, every in requests.items():
                try:
                    blocks = only_moved(pair, self.geom, every)  # (attention groups only where the pair moves KV)
                    self.geom.check_blocks(blocks, "prefill")
                    chunk = state_chunk(pair, self.geom, blocks, "prefill", self.plans.shapes)
                except ValueError as e:
                    log.warning("hybrid-kv: request %s not packed at finish: %s", req, e)
                    continue
                sizes = chunk.unit_bytes
                keys = [(cid, req, dec.tp_rank, u) for u in range(len(sizes))]
                with self._cv:
                    if (cid, req, dec.tp_rank) in self._staged or any(self.pool.held(k) for k in keys):
                        continue
                    until = time.monotonic() + self.lease_s
                    got = self.pool.alloc_all(keys, sizes, until)
                if got is None:
                    continue  # pool full now: the decode rank will ask, and wait for a slot then
                offsets = [s.offset for s in got]
                jobs.append((chunk, offsets))
                pushes.append((cid, conn, lock, dec.tp_rank, req, blocks, keys, offsets, sizes, until))
        if not jobs:
            return
        try:
            # one launch for every request and decode rank of this step
            self.copier.run(jobs, after=[self._fences.get(r) for r in requests]).wait()
        except Exception as e:  # never fatal: the decode ranks fall back to asking
            log.warning("hybrid-kv: packing %d request(s) at finish failed: %s", len(requests), e)
            for *_, keys, _, _, _ in pushes:
                self._free_where(lambda k, ks=set(keys): k in ks)
            return
        for cid, conn, lock, rank, req, blocks, keys, offsets, sizes, until in pushes:
            with self._cv:
                if not all(self.pool.held(k) for k in keys):
                    continue  # freed meanwhile (disconnect, forget)
                self._staged[(cid, req, rank)] = (blocks, offsets, sizes)
            msg = M.ready(req, units(offsets, sizes), until, blocks)
            try:
                with lock:
                    send_msg(conn, msg)
            except OSError as e:
                log.warning("hybrid-kv: push of %s to decode connection %d failed: %s", req, cid, e)
