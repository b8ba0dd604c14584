"""Spawn prefill and decode rank processes on this machine and drive transfers between them.

Every wait is bounded: a rank that does not answer within its deadline is an error naming the rank.
"""

from __future__ import annotations

import functools
import multiprocessing as mp
import os
import signal
import statistics
import time
from multiprocessing.connection import wait as wait_any

import numpy as np

from hybrid_kv.transport import resolve_mode
from hybrid_kv.transport.decode import decode_main
from hybrid_kv.transport.jobs import (
    TransferJob,
    available_memory,
    lanes_of,
    memory_estimate,
    plan_requests,
)
from hybrid_kv.transport.prefill import prefill_main

# the job's names are imported from here by callers that drive a cluster
__all__ = [
    "Cluster",
    "RankFailed",
    "TransferJob",
    "available_memory",
    "lanes_of",
    "memory_estimate",
    "plan_requests",
    "run_job",
    "summarize",
]


# Rank processes fork from multiprocessing's fork server, which imports these once: a rank starts in
# milliseconds instead of the ~2 s of a fresh interpreter importing torch (a P4-D2 pair starts 6 of them).
# The server is single-threaded and holds no NIXL agent or UCX context, so nothing unsafe is forked.
PRELOAD = ["numpy", "torch"]


def _context():
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    return ctx


def _rank_entry(environ: dict[str, str], target, *args) -> None:
    """A rank's start: the caller's environment as it is now (a forked rank inherits the fork server's,
    which is the caller's at the server's start; UCX and NIXL read theirs when the rank creates its agent)."""
    os.environ.clear()
    os.environ.update(environ)
    target(*args)


class RankFailed(RuntimeError):
    """A rank process reported an error (and has exited)."""


def _death(proc) -> str:
    """How a rank process that closed its pipe ended."""
    if proc is None:
        return "the process died"
    proc.join(5)
    code = proc.exitcode
    if code == -signal.SIGKILL:
        return "the process was killed (SIGKILL: out of memory?)"
    if code is not None and code < 0:
        return f"the process died of signal {signal.Signals(-code).name}"
    return f"the process died (exit code {code})"


def _recv(conn, what: str, timeout: float, *tags: str, proc=None):
    """The next message of a rank process, which must carry one of `tags` (if given)."""
    if not conn.poll(timeout):
        raise TimeoutError(f"{what}: no answer within {timeout:.0f} s")
    try:
        msg = conn.recv()
    except EOFError as e:
        raise RuntimeError(f"{what}: {_death(proc)}") from e
    if msg[0] == "failed":
        raise RankFailed(f"{what}: {msg[1]}")
    if tags and msg[0] not in tags:
        raise RuntimeError(f"{what}: unexpected answer {msg[0]!r} (process exited?)")
    return msg


class Cluster:
    """P and D rank processes of one TP pair. Use as a context manager."""

    def __init__(self, job: TransferJob) -> None:
        self.job = job
        self.plan, self.requests, nbp, nbd = plan_requests(job)
        from dataclasses import replace

        self.pcfg = replace(job.prefill, num_blocks=max(job.prefill.num_blocks, nbp))
        self.dcfg = replace(job.decode, num_blocks=max(job.decode.num_blocks, nbd))
        self.ctx = _context()
        self.pprocs, self.pconns, self.dprocs, self.dconns = [], [], [], []
        self.closed_counts: dict[str, dict] = {}
        self._filled = -1  # the wave whose requests the prefill caches hold
        self._running: set[int] = set()  # decode ranks told "go" whose result has not come back
        self._failed: set[int] = set()  # ids of pipes whose rank reported failure (and exited)
        self.ready_info: list[dict] = []  # per decode rank: sources, unit budget, cost model

    def __enter__(self) -> Cluster:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        t = self.job.start_timeout_s
        for r in range(self.pcfg.tp_size):
            a, b = self.ctx.Pipe()
            p = self.ctx.Process(
                target=_rank_entry,
                args=(dict(os.environ), prefill_main, self.pcfg, r, self.job.prefill_opts, b),
                daemon=True,
                name=f"hybrid-kv-prefill-{r}",
            )
            p.start()
            self.pprocs.append(p)
            self.pconns.append(a)
        ports = []
        for r, c in enumerate(self.pconns):
            msg = _recv(c, f"prefill rank {r} start", t, "port", proc=self.pprocs[r])
            ports.append(msg[1])
        host = self.job.prefill_opts.host
        self.addrs = [(host, port) for port in ports]
        self.fill(0)
        for r in range(self.dcfg.tp_size):
            p, a = self._spawn_decode(r)
            self.dprocs.append(p)
            self.dconns.append(a)
        for r in range(self.dcfg.tp_size):
            self.ready_info.append(self._handshake(r))

    @functools.cached_property
    def waves(self) -> list[list[dict]]:
        """The requests by wave: a wave's requests are in the caches together (`TransferJob.in_flight`).
        Grouped once: `fill` and `run` look a wave up for each of possibly thousands of waves."""
        by: dict[int, list[dict]] = {}
        for r in self.requests:
            by.setdefault(r["wave"], []).append(r)
        return [by[w] for w in sorted(by)]

    def fill(self, wave: int) -> None:
        """Write wave `wave`'s requests into every prefill cache (their "prefill"), over what was there.
        Refused while a decode rank may still READ the pages of the wave before (its result not in)."""
        if self._running:
            raise RuntimeError(
                f"refill for wave {wave} while decode ranks {sorted(self._running)} still run the wave before"
            )
        reqs, bs_d = self.waves[wave], self.plan.decode[0].block_size
        for c in self.pconns:
            c.send(("fill", self.job.seed, reqs, bs_d))
        for r, c in enumerate(self.pconns):
            _recv(c, f"prefill rank {r} fill", self.job.start_timeout_s, "filled", proc=self.pprocs[r])
        self._filled = wave

    def _spawn_decode(self, r: int):
        a, b = self.ctx.Pipe()
        p = self.ctx.Process(
            target=_rank_entry,
            args=(dict(os.environ), decode_main, self.dcfg, r, self.pcfg, self.addrs, self.job.decode_opts, b),
            daemon=True,
            name=f"hybrid-kv-decode-{r}",
        )
        p.start()
        return p, a

    def _handshake(self, r: int) -> dict:
        c = self.dconns[r]
        try:
            return _recv(c, f"decode rank {r} handshake", self.job.start_timeout_s, "ready", proc=self.dprocs[r])[1]
        except RankFailed:
            self._failed.add(id(c))
            raise

    def restart_decode(self, rank: int) -> None:
        """A fresh process for decode rank `rank` (after `kill`): it connects to its sources again."""
        if self.dprocs[rank].is_alive():
            raise RuntimeError(f"decode rank {rank} is still running: kill it first")
        self.dprocs[rank], self.dconns[rank] = self._spawn_decode(rank)
        self.ready_info[rank] = self._handshake(rank)

    def run(self, mode: str | None = None, requests: list[dict] | None = None, progress=None) -> dict:
        """Move `requests` (default: all, wave by wave) in `mode` on every decode rank; returns the mode's
        report. `progress(n)` hears how many requests have ended (see `collect`).

        A wave starts once every decode rank has ended the one before (its READs retired, its pages
        verified): only then are the prefill pages rewritten, and each decode rank's cache reset, for the
        next requests in the same blocks, as a serving engine reuses the blocks a finished request freed."""
        if requests is not None:
            self.start_run(mode, requests)
            return self.collect(progress=progress)
        parts, ended = [], 0
        for w, reqs in enumerate(self.waves):
            if self._filled != w:
                self.fill(w)
            self.start_run(mode, reqs)
            self._gather(progress=None if progress is None else (lambda k, e=ended: progress(e + k)))
            parts.append(list(self.results.values()))
            ended += len(reqs)
        return summarize(self._mode, self.requests, parts, self.job.verify)

    def start_run(self, mode: str | None = None, requests: list[dict] | None = None) -> None:
        """Arm every decode rank (cache reset to the oracle background), then start them together."""
        if requests is None and len(self.waves) > 1:
            raise ValueError(f"{len(self.waves)} waves (in_flight={self.job.in_flight}): use run(), or pass one wave")
        self._mode = mode if mode == "contiguous" else resolve_mode(mode)  # contiguous: benchmark reference
        self._reqs = self.requests if requests is None else requests
        for c in self.dconns:
            c.send(("arm", self._mode, self._reqs, self.job.concurrency, self.job.seed, self.job.verify))
        for r, c in enumerate(self.dconns):
            _recv(c, f"decode rank {r} arm", self.job.start_timeout_s, "armed", proc=self.dprocs[r])
        for c in self.dconns:  # all decode ranks start together: latency spans ranks without skew
            c.send(("go",))
        self._running = set(range(len(self.dconns)))
        if self._mode in ("packed", "auto"):  # the prefills "finish" now: sources pack unasked
            for c in self.pconns:
                c.send(("prefilled", self._reqs))

    def collect(self, skip: set[int] = frozenset(), progress=None) -> dict:
        """Results of the run started by `start_run`, from every decode rank not in `skip` (killed).
        `progress(n)` hears how many requests have ended on every rank (the slowest rank's count)."""
        self._gather(skip, progress)
        return summarize(self._mode, self._reqs, [list(self.results.values())], self.job.verify)

    def _gather(self, skip: set[int] = frozenset(), progress=None) -> None:
        self.results: dict[int, dict] = {}  # decode rank -> its own rows (`summarize` merges them)
        waiting = {r: c for r, c in enumerate(self.dconns) if r not in skip}
        self._running -= set(skip)  # killed: it reads nothing any more
        ended = dict.fromkeys(waiting, 0)
        deadline = time.monotonic() + self.job.run_timeout_s
        while waiting:
            left = deadline - time.monotonic()
            ready = wait_any(list(waiting.values()), timeout=max(0.0, left))
            if not ready:
                raise TimeoutError(f"decode rank {min(waiting)} run: no answer within {self.job.run_timeout_s:.0f} s")
            for r, c in list(waiting.items()):
                if c not in ready:
                    continue
                try:
                    msg = _recv(c, f"decode rank {r} run", 1.0, "result", "progress", proc=self.dprocs[r])
                except RankFailed:  # it ended the run (and reads nothing more)
                    self._running.discard(r)
                    raise
                if msg[0] == "progress":
                    ended[r] = msg[1]
                    if progress is not None:
                        progress(min(ended.values()))
                    continue
                ended[r] = len(self._reqs)
                self.results[r] = msg[1]
                del waiting[r]
                self._running.discard(r)

    def counts(self) -> dict[str, dict]:
        out = {}
        for side, conns, procs in (("prefill", self.pconns, self.pprocs), ("decode", self.dconns, self.dprocs)):
            for r, (c, p) in enumerate(zip(conns, procs)):
                if p.is_alive():
                    c.send(("counts",))
                    out[f"{side}-{r}"] = _recv(c, f"{side} rank {r} counts", 30, "counts")[1]
        return out

    def kill(self, side: str, rank: int) -> None:
        procs = self.pprocs if side == "prefill" else self.dprocs
        procs[rank].kill()
        procs[rank].join(10)

    def stop(self) -> None:
        for side, conns, procs in (("decode", self.dconns, self.dprocs), ("prefill", self.pconns, self.pprocs)):
            for r, (c, p) in enumerate(zip(conns, procs)):
                if p.is_alive() and id(c) not in self._failed:
                    try:
                        c.send(("stop",))
                        msg = _recv(c, f"{side} rank {r} stop", 30)
                        while msg[0] != "closed":
                            msg = _recv(c, f"{side} rank {r} stop", 30)
                        self.closed_counts[f"{side}-{r}"] = msg[1]
                    except (OSError, TimeoutError, RuntimeError):
                        pass
                p.join(10)
                if p.is_alive():
                    p.kill()
                    p.join(5)


def summarize(mode: str, requests: list[dict], waves: list[list[dict]], verify: bool) -> dict:
    """One mode's report from each wave's per-decode-rank results: per-request latency spans all decode
    ranks (monotonic clock, one machine); the wall time is the waves' own, not the refills between them."""
    results = [res for wave in waves for res in wave]
    by_req: dict[str, list[dict]] = {}
    for res in results:
        for row in res["rows"]:
            by_req.setdefault(row["id"], []).append(row)
    lat, failures = [], []
    for rid, rows in by_req.items():
        errs = [r["error"] for r in rows if not r["ok"]]
        if errs:
            failures.append({"id": rid, "errors": errs})
        else:
            lat.append(max(r["end"] for r in rows) - min(r["start"] for r in rows))
    wall = sum(max(r["t1"] for r in wave) - min(r["t0"] for r in wave) for wave in waves if wave)
    nbytes = sum(row["bytes"] for res in results for row in res["rows"] if row["ok"])
    desc = sum(row["descriptors"] for res in results for row in res["rows"])
    mism = [m for res in results for m in res["mismatches"]]
    ok = len(by_req) - len(failures)
    return {
        "mode": mode,
        "requests": len(requests),
        "completed": ok,
        "failures": failures,
        "descriptors": desc,
        "descriptors_per_request": desc / max(1, len(requests)),
        "bytes": nbytes,
        "p50_ms": 1e3 * statistics.median(lat) if lat else None,
        "p99_ms": 1e3 * float(np.percentile(lat, 99)) if lat else None,
        "wall_s": wall,
        "waves": len(waves),
        "gbps": nbytes / wall / 1e9 if wall > 0 else 0.0,
        "nixl_post_us": sum(row["post_us"] for res in results for row in res["rows"]),
        "nixl_xfer_us": sum(row["xfer_us"] for res in results for row in res["rows"]),
        "nixl_descs": sum(row["nixl_descs"] for res in results for row in res["rows"]),
        "phases_ms": {
            k: 1e3 * statistics.mean(row[k] for res in results for row in res["rows"]) if lat else None
            for k in ("ready_s", "read_s", "scatter_s")
        },
        "verified": (not mism and not failures) if verify else False,
        "mismatches": mism,
        "decode_counts": [res["counts"] for res in waves[-1]] if waves else [],
    }


def run_job(job: TransferJob, modes: list[str], progress=None) -> dict:
    """Start the ranks, run each mode, stop; `progress(step, total, text)` is told each phase."""
    total = 2 + len(modes)
    if progress:
        progress(0, total, "starting ranks")
    t = time.monotonic()
    with Cluster(job) as cl:
        if progress:
            progress(1, total, f"ranks up in {time.monotonic() - t:.1f} s")
        out = {}
        n = len(cl.requests)
        for i, m in enumerate(modes):

            def ended(k: int, i: int = i, m: str = m) -> None:  # per request, within this mode's step
                progress(2 + i + k / max(1, n), total, f"{m}: {k}/{n} requests")

            out[m] = cl.run(m, progress=ended if progress else None)
            if progress:
                progress(3 + i, total, f"{m}: {out[m]['completed']}/{out[m]['requests']} requests received")
        counts = cl.counts()
    if progress:
        progress(total, total, "ranks stopped")
    return {
        "plan": cl.plan,
        "modes": out,
        "counts": counts,
        "closed_counts": cl.closed_counts,
        "cost_model": [x["cost"] for x in cl.ready_info],
    }
