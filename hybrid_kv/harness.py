"""In-process P -> D runs against the oracle: fill prefill pages, move, verify every decode byte.

Used by the tests, `hybrid-kv repack` and the benchmarks. Prefill and decode caches are flat byte buffers
(one per rank); decode caches start as random bytes so that an unwritten destination cannot pass, and
the expected decode caches are that same background with only the oracle's shards written in.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from hybrid_kv import ops
from hybrid_kv.batch import BatchPlan, RequestBlocks
from hybrid_kv.oracle.state import kv_tokens_written, random_bytes, random_global_state, write_shards
from hybrid_kv.plan import TransferPlan

STAGING_POISON = 0xAB


@dataclass
class Timings:
    pack_s: float = 0.0
    move_s: float = 0.0
    unpack_s: float = 0.0
    launches: int = 0


def random_blocks(
    plan_by_req: Sequence[TransferPlan], side: str, num_blocks: int, rng: np.random.Generator
) -> list[RequestBlocks]:
    """Distinct random block ids per request (a random permutation: interleaved, out of order)."""
    perm_state = rng.permutation(num_blocks).tolist()
    perm_kv = rng.permutation(num_blocks).tolist()
    out, k = [], 0
    for i, plan in enumerate(plan_by_req):
        n = plan.num_kv_blocks(side)
        state = int(perm_state[i]) if plan.spec.state_layers else None
        out.append(RequestBlocks(state, tuple(int(b) for b in perm_kv[k : k + n])))
        k += n
    return out


def random_batch(plan: TransferPlan, tokens: Sequence[int], rng: np.random.Generator, spare_blocks: int) -> BatchPlan:
    """A batch of requests of `tokens` tokens each with random, interleaved block ids on both sides, in
    caches just large enough for them plus `spare_blocks` blocks no request uses."""
    plans = [plan.for_tokens(t) for t in tokens]
    sizes = [
        max([len(plans)] + [sum(p.num_kv_blocks(side) for p in plans)]) + spare_blocks for side in ("prefill", "decode")
    ]
    pb = random_blocks(plans, "prefill", sizes[0], rng)
    db = random_blocks(plans, "decode", sizes[1], rng)
    return BatchPlan(plans, pb, db, sizes[0], sizes[1], template=plan)


@dataclass
class Harness:
    """One batch of requests between all prefill and all decode ranks of `plan`'s TP pair."""

    plan: TransferPlan
    tokens: Sequence[int]
    seed: int = 0
    device: str = "cpu"
    spare_blocks: int = 2  # blocks no request uses: must stay untouched
    batch: BatchPlan = field(init=False)

    def __post_init__(self) -> None:
        rng = np.random.default_rng(self.seed)
        gen = np.random.default_rng(self.seed + 1)
        self.batch = random_batch(self.plan, self.tokens, rng, self.spare_blocks)
        gp, gd = self.batch.prefill_geom, self.batch.decode_geom
        self.num_blocks_p, self.num_blocks_d = gp.num_blocks, gd.num_blocks
        pb, db = self.batch.prefill_blocks, self.batch.decode_blocks
        prefill = [random_bytes(gp.nbytes, gen) for _ in range(self.plan.prefill_tp)]
        decode = [random_bytes(gd.nbytes, gen) for _ in range(self.plan.decode_tp)]
        expected = [d.clone() for d in decode]
        bs_p, bs_d = self.plan.prefill[0].block_size, self.plan.decode[0].block_size
        for i, t in enumerate(self.tokens):
            filled, moved = kv_tokens_written(t, bs_p, bs_d)
            g = random_global_state(self.plan.spec, filled, gen)
            for lay, cache in zip(self.plan.prefill, prefill):
                write_shards(cache, lay, self.num_blocks_p, g, pb[i].state, list(pb[i].kv), filled)
            for lay, cache in zip(self.plan.decode, expected):
                write_shards(cache, lay, self.num_blocks_d, g, db[i].state, list(db[i].kv), moved)
        self.prefill_caches = [c.to(self.device) for c in prefill]
        self.decode_caches = [c.to(self.device) for c in decode]
        self.expected = expected

    # ---- runs -------------------------------------------------------------------------------------------

    def prepared(self, backend: str | None) -> dict:
        """Staging buffers and prepared tables for `backend` (built once, reused by every run)."""
        memo = self.__dict__.setdefault("_prep", {})
        if backend not in memo:
            b, dev = self.batch, self.device
            staging = [torch.empty(n, dtype=torch.uint8, device=dev) for n in b.stage_bytes]
            recv = [torch.empty(n, dtype=torch.uint8, device=dev) for n in b.recv_bytes]
            memo[backend] = {
                "staging": staging,
                "recv": recv,
                "pack": [
                    ops.Prepared(self.prefill_caches[p], staging[p], b.pack_table(p), backend=backend)
                    for p in range(b.prefill_tp)
                ],
                "unpack": [
                    ops.Prepared(recv[d], self.decode_caches[d], b.unpack_table(d), backend=backend)
                    for d in range(b.decode_tp)
                ],
                "transfers": b.transfers(),
                "strided": [
                    [
                        (p, ops.Prepared(self.prefill_caches[p], self.decode_caches[d], t, backend=backend))
                        for p, t in b.strided_table(d)
                    ]
                    for d in range(b.decode_tp)
                ],
            }
        return memo[backend]

    def run_packed(self, backend: str | None = None) -> Timings:
        """Pack on every prefill rank (one launch each), move each transfer unit, unpack on every decode
        rank (one launch each). Staging is poisoned first so an unwritten byte cannot pass."""
        prep, tm = self.prepared(backend), Timings()
        for buf in prep["staging"] + prep["recv"]:
            buf.fill_(STAGING_POISON)
        t0 = _now(self.device)
        for p, launch in enumerate(prep["pack"]):
            launch(self.prefill_caches[p], prep["staging"][p])
        t1 = _now(self.device)
        staging, recv = prep["staging"], prep["recv"]
        for x in prep["transfers"]:  # stands in for the NIXL READ of each unit
            recv[x.dst_rank][x.dst_offset : x.dst_offset + x.nbytes] = staging[x.src_rank][
                x.src_offset : x.src_offset + x.nbytes
            ]
        t2 = _now(self.device)
        for d, launch in enumerate(prep["unpack"]):
            launch(recv[d], self.decode_caches[d])
        t3 = _now(self.device)
        tm.launches = len(prep["pack"]) + len(prep["unpack"])
        tm.pack_s, tm.move_s, tm.unpack_s = t1 - t0, t2 - t1, t3 - t2
        return tm

    def staged(self, backend: str | None, max_unit_bytes: int | None = None, threshold: int | None = None) -> dict:
        """The packed-transfer core's objects for this batch (`hybrid_kv.staging`): per pair a static
        `PairPlan`, per request and pair a chunk on each side, one `Copier` per rank (built once).
        `threshold`: runs shorter than it are packed, the others read page to page (`auto`); 0 = strided."""
        from hybrid_kv.staging.copier import Copier

        memo = self.__dict__.setdefault("_staged", {})
        key = (backend, max_unit_bytes, threshold)
        if key in memo:
            return memo[key]
        j = staged_jobs(self.plan, self.batch, self.tokens, max_unit_bytes, threshold)
        pmap, dmap, stage_end, recv_end = j["pmap"], j["dmap"], j["stage_end"], j["recv_end"]
        cache, moves, direct, jobs_p, jobs_d = j["cache"], j["moves"], j["direct"], j["jobs_p"], j["jobs_d"]
        dev = self.device
        staging = [torch.empty(max(n, 16), dtype=torch.uint8, device=dev) for n in stage_end]
        recv = [torch.empty(max(n, 16), dtype=torch.uint8, device=dev) for n in recv_end]
        memo[key] = {
            "cache": cache,
            "staging": staging,
            "recv": recv,
            "moves": moves,
            "direct": direct,
            "jobs_p": jobs_p,
            "jobs_d": jobs_d,
            "pack": [Copier(c, pmap, s, "prefill", backend) for c, s in zip(self.prefill_caches, staging)],
            "unpack": [Copier(c, dmap, r, "decode", backend) for c, r in zip(self.decode_caches, recv)],
        }
        return memo[key]

    def run_staged(
        self, backend: str | None = None, max_unit_bytes: int | None = None, threshold: int | None = None
    ) -> Timings:
        """The packed-transfer core: one launch per rank and side for the whole batch, one copy per unit
        standing in for its NIXL READ. Staging is poisoned first so an unwritten byte cannot pass."""
        st, tm = self.staged(backend, max_unit_bytes, threshold), Timings()
        for buf in st["staging"] + st["recv"]:
            buf.fill_(STAGING_POISON)
        t0 = _now(self.device)
        for p, copier in enumerate(st["pack"]):
            copier.run(st["jobs_p"][p]).wait()
        t1 = _now(self.device)
        for p, d, a, b, n in st["moves"]:
            st["recv"][d][b : b + n] = st["staging"][p][a : a + n]
        for p, d, runs in st["direct"]:  # one descriptor per run, page to page
            for src, dst, n in runs.tolist():
                self.decode_caches[d][dst : dst + n] = self.prefill_caches[p][src : src + n]
        t2 = _now(self.device)
        for d, copier in enumerate(st["unpack"]):
            copier.run(st["jobs_d"][d]).wait()
        t3 = _now(self.device)
        tm.launches = sum(bool(j) for j in st["jobs_p"] + st["jobs_d"])
        tm.pack_s, tm.move_s, tm.unpack_s = t1 - t0, t2 - t1, t3 - t2
        return tm

    def run_strided(self, backend: str | None = None) -> Timings:
        """The baseline: every contiguous run copied page to page (one descriptor each)."""
        prep, tm = self.prepared(backend), Timings()
        t0 = _now(self.device)
        for d, launches in enumerate(prep["strided"]):
            for p, launch in launches:
                launch(self.prefill_caches[p], self.decode_caches[d])
                tm.launches += 1
        tm.move_s = _now(self.device) - t0
        return tm

    # ---- checks -----------------------------------------------------------------------------------------

    def mismatches(self, limit: int = 5) -> list[str]:
        """Where decode caches differ from the oracle, as (rank, layer, block, page offset) ranges."""
        out = []
        g = self.batch.decode_geom
        for d, (got, want) in enumerate(zip(self.decode_caches, self.expected)):
            diff = torch.nonzero(got.cpu() != want).flatten()
            if diff.numel():
                first = int(diff[0])
                layer, rest = divmod(first, g.layer_stride)
                block, off = divmod(rest, g.page_bytes)
                out.append(
                    f"decode rank {d}: {diff.numel()} bytes differ; first at layer {layer} block {block} "
                    f"page offset {off}"
                )
            if len(out) >= limit:
                break
        return out

    def verify(self) -> bool:
        return not self.mismatches(limit=1)


def staged_jobs(plan: TransferPlan, b: BatchPlan, tokens: Sequence[int], max_unit_bytes: int | None = None,
                threshold: int | None = None) -> dict:  # fmt: skip
    """The packed-transfer core's work for a batch (`hybrid_kv.staging`), without buffers: per pair a static
    `PairPlan`, per request and pair a chunk on each side with its units' slots back to back in each rank's
    staging (as a pool would hand them out), the unit moves, and the page maps of flat caches.
    `threshold`: runs shorter than it are packed, the others read page to page (`auto`); 0 = strided."""
    from hybrid_kv.staging.chunk import direct_runs, flat_chunk
    from hybrid_kv.staging.pagemap import PageMap
    from hybrid_kv.staging.template import PlanCache

    lp, ld = plan.prefill[0], plan.decode[0]
    cache = PlanCache(plan.spec, lp.conv_layout, lp.kv_layout, max_unit_bytes or plan.max_unit_bytes)
    sizes = (lp.cache_block_size, ld.cache_block_size)
    bs = (lp.block_size, ld.block_size)
    n_layers = len(plan.spec.layers)
    pmap = PageMap.flat(n_layers, b.prefill_geom.num_blocks, b.prefill_geom.page_bytes)
    dmap = PageMap.flat(n_layers, b.decode_geom.num_blocks, b.decode_geom.page_bytes)
    jobs_p: list[list] = [[] for _ in range(plan.prefill_tp)]
    jobs_d: list[list] = [[] for _ in range(plan.decode_tp)]
    moves, stage_end, recv_end = [], [0] * plan.prefill_tp, [0] * plan.decode_tp
    direct = []  # (prefill rank, decode rank, runs)
    small = ("all", 0) if threshold is None else ("small", threshold)
    for i, t in enumerate(tokens):
        for d, sources in cache.sources(plan.prefill_tp, plan.decode_tp, sizes).items():
            for p in sources:
                pb, db = b.prefill_blocks[i], b.decode_blocks[i]
                if threshold is not None:
                    big = cache.pair(plan.prefill_tp, plan.decode_tp, p, d, sizes, ("large", threshold))
                    xp = flat_chunk(cache.shapes, big, pmap, "prefill", t, pb.state, pb.kv, bs)
                    xd = flat_chunk(cache.shapes, big, dmap, "decode", t, db.state, db.kv, bs)
                    direct.append((p, d, direct_runs(xp, xd)))
                pair = cache.pair(plan.prefill_tp, plan.decode_tp, p, d, sizes, small)
                cp = flat_chunk(cache.shapes, pair, pmap, "prefill", t, pb.state, pb.kv, bs)
                cd = flat_chunk(cache.shapes, pair, dmap, "decode", t, db.state, db.kv, bs)
                up, ud = [], []
                for n in cp.unit_bytes:
                    up.append(stage_end[p])
                    ud.append(recv_end[d])
                    moves.append((p, d, stage_end[p], recv_end[d], n))
                    stage_end[p] += -(-n // 16) * 16
                    recv_end[d] += -(-n // 16) * 16
                jobs_p[p].append((cp, up))
                jobs_d[d].append((cd, ud))
    return {"cache": cache, "pmap": pmap, "dmap": dmap, "jobs_p": jobs_p, "jobs_d": jobs_d, "moves": moves,
            "direct": direct, "stage_end": stage_end, "recv_end": recv_end}  # fmt: skip


def _now(device: str) -> float:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter()
