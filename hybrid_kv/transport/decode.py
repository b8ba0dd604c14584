"""Decode rank endpoint: connects to the prefill ranks it reads from, then moves requests.

* packed: before a run, tell each source to pack everything for this rank (``mode``, warm-up). The
  sources pack each request when its prefill finishes and announce each unit (``ready``) unasked; on
  ``ready`` READ it with **one descriptor** into a receive-staging slot; when READs complete, scatter
  every landed unit of the step into the pages (one launch) and free the slots. The READ's notification
  tells the source to free its slot. No request waits on a reply to a message of its own.
* auto: the same for the short runs of the pairs where packing pays (`cost`), the rest page to page.
* strided: one READ per source with one descriptor per contiguous run, page to page (vLLM-style).

A request completes when every unit from every source has landed; it fails (with its id in the error)
when a source disconnects, refuses, a READ errs, or the request's deadline passes. Pages of a failed
request may hold some of its units, but the request is never reported as received.
"""

from __future__ import annotations

import selectors
import socket
import time
from dataclasses import dataclass

import numpy as np

from hybrid_kv.mover.receiver import Receiver
from hybrid_kv.plan import TransferPlan
from hybrid_kv.staging import messages as M
from hybrid_kv.staging.auth import ClientAuth, load_secret
from hybrid_kv.staging.copier import Copier
from hybrid_kv.staging.pagemap import PageMap
from hybrid_kv.staging.template import PlanCache
from hybrid_kv.staging.wire import expect, recv_msg, send_msg
from hybrid_kv.transport.common import (
    RankMemory,
    SideConfig,
    check_peer,
    hello_fields,
    init_rank_process,
    peak_rss,
)
from hybrid_kv.transport.cost import calibrate
from hybrid_kv.transport.receive import DecodeRuns
from hybrid_kv.transport.request import Request, Source, result_row


@dataclass
class DecodeOptions:
    pool_bytes: int = 256 << 20
    request_timeout_s: float = 60.0
    handshake_timeout_s: float = 20.0
    backend: str | None = None
    poll_s: float = 0.0002
    # Cost model of the auto mode; None = measured at start-up.
    desc_cost_us: float | None = None  # NIXL cost of one more descriptor in a READ
    copy_gbps: float | None = None  # local copy bandwidth (pack and scatter each copy once)


class DecodeEndpoint:
    def __init__(
        self, cfg: SideConfig, rank: int, prefill: SideConfig, addrs: list[tuple[str, int]], opts: DecodeOptions
    ) -> None:
        self.cfg, self.rank, self.pcfg, self.opts = cfg, rank, prefill, opts
        mem = RankMemory(cfg, rank, opts.pool_bytes, "decode")
        self.spec, self.layouts, self.layout, self.geom = mem.spec, mem.layouts, mem.layout, mem.geom
        self.cache, self.recv, self.agent = mem.cache, mem.staging, mem.agent
        self.cache_reg, self.recv_reg = mem.cache_reg, mem.staging_reg
        self.pages = PageMap.flat(self.geom.num_layers, self.geom.num_blocks, self.geom.page_bytes)
        self.copier = Copier(self.cache, self.pages, self.recv, "decode", self.opts.backend)
        # the state mover's receiver: receive slots (one per unit, as announced), checks, the scatter
        self.rx = Receiver(None, None, mem.pool, self.copier, opts.request_timeout_s)
        self.sel = selectors.DefaultSelector()
        self.sources: dict[int, Source] = {}
        self.player = None  # prefill layouts, as this rank computes them
        self.secret = load_secret()
        self._socks: list[socket.socket] = []  # every side-channel socket opened, closed on close()
        try:
            self._connect(addrs)
        except BaseException:
            self.close()  # a refused handshake must not leave sockets, peers or registrations behind
            raise

    # ---- handshake ------------------------------------------------------------------------------------

    def _connect(self, addrs: list[tuple[str, int]]) -> None:
        from hybrid_kv.layout import RankLayout

        self.player = [
            RankLayout(
                self.spec, self.pcfg.tp_size, r, self.pcfg.conv_layout, self.pcfg.kv_layout, self.pcfg.block_size
            )
            for r in range(self.pcfg.tp_size)
        ]
        probe = TransferPlan(self.player, self.layouts, 1)
        unit = None
        for p in probe.sources_of(self.rank):
            host, port = addrs[p]
            sock = socket.create_connection((host, port), timeout=self.opts.handshake_timeout_s)
            self._socks.append(sock)
            auth = ClientAuth(self.secret)
            hello = {"type": M.HELLO, **hello_fields(self.layout, self.cfg), "agent": self.agent.name}
            hello.update(nonce=auth.nonce, auth=self.secret is not None)
            # with a secret, this rank's NIXL metadata goes only to a prefill rank that proved it
            send_msg(sock, hello, b"" if self.secret else self.agent.metadata())
            msg, meta = recv_msg(sock, self.opts.handshake_timeout_s)
            reply = auth.answer(expect(msg, M.WELCOME, M.CHALLENGE), f"prefill rank {p} at {host}:{port}")
            if reply is not None:
                send_msg(sock, reply, self.agent.metadata())
                msg, meta = recv_msg(sock, self.opts.handshake_timeout_s)
                expect(msg, M.WELCOME)
            clock = _clock_of(sock, self.opts.handshake_timeout_s)
            theirs = check_peer(self.layout, msg, "decode", "prefill")
            if theirs.tp_rank != p:
                raise ValueError(f"prefill at {host}:{port} is rank {theirs.tp_rank}, expected {p}")
            mine, lease, pages = _welcome_values(msg, p, self.player[p], self.geom.num_layers)
            if unit is not None and mine != unit:
                raise ValueError(f"prefill ranks disagree on max_unit_bytes ({unit} vs {mine})")
            unit = mine
            if unit > self.pool.capacity:
                raise ValueError(
                    f"decode staging pool ({self.pool.capacity} B) is smaller than the prefill "
                    f"transfer unit budget ({unit} B): raise the decode pool or lower max_unit_bytes"
                )
            name = self.agent.add_remote(meta)
            sock.setblocking(True)
            src = Source(p, sock, name, msg, lease_s=lease, clock=clock, pages=pages)
            self.sources[p] = src
            self.sel.register(sock, selectors.EVENT_READ, src)
        self.unit_bytes = unit or probe.max_unit_bytes
        self._plans: dict[int, TransferPlan] = {}
        self.plans = PlanCache(self.spec, self.layout.conv_layout, self.layout.kv_layout, self.unit_bytes)
        self.cost = self._calibrate()
        self.runs = DecodeRuns(self)

    @property
    def pool(self):
        return self.rx.pool

    def _calibrate(self) -> dict:
        src = self.sources[min(self.sources)] if self.sources else None
        return calibrate(self, src)

    def configure(self, mode: str, requests: list[dict], concurrency: int) -> None:
        self.runs.configure(mode, requests, concurrency)

    def run(self, mode: str, requests: list[dict], concurrency: int, on_finished=None) -> list[Request]:
        return self.runs.run(mode, requests, concurrency, on_finished)

    def timed_read(self, src: Source, local: np.ndarray, remote: np.ndarray) -> float:
        t = time.monotonic()
        h = self.agent.read(
            local,
            remote,
            src.agent,
            b"calibrate",
            self.cache_reg["mem"],
            self.cache_reg["dev"],
            src.info["cache"]["dev"],
        )
        try:
            while (state := self.agent.poll(h)) == "PROC":
                if time.monotonic() - t > self.opts.handshake_timeout_s:
                    raise TimeoutError("calibration READ did not complete")
            if state != "DONE":
                raise RuntimeError(f"calibration READ ended {state}")
        finally:
            self.agent.release(h)
        return time.monotonic() - t

    def plan(self, tokens: int) -> TransferPlan:
        if tokens not in self._plans:
            self._plans[tokens] = TransferPlan(self.player, self.layouts, tokens, self.unit_bytes)
        return self._plans[tokens]

    # ---- oracle -----------------------------------------------------------------------------------------

    def reset(self, seed: int) -> None:
        from hybrid_kv.oracle.fill import fill_background

        fill_background(self.cache, self.geom, seed, 1, self.rank)

    def mismatches(self, seed: int, requests: list[dict], ok_ids: set[str]) -> list[str]:
        """The cache against the oracle (pages of failed requests are not compared)."""
        from hybrid_kv.oracle.fill import verify_cache

        return verify_cache(
            self.cache, self.layout, self.cfg.num_blocks, self.player[0].block_size, seed, requests, ok_ids
        )

    # ---- running requests -------------------------------------------------------------------------------

    def source_lost(self, src: Source, why: str, active: dict[str, Request] | None = None) -> None:
        if not src.alive:
            return
        src.alive = False
        try:
            self.sel.unregister(src.sock)
        except (KeyError, ValueError):
            pass
        src.sock.close()
        for r in (active or {}).values():
            if any(p == src.rank for p, _ in r.pending) and r.error is None:
                r.error = f"request {r.id}: prefill rank {src.rank} lost ({why})"

    def counts(self) -> dict:
        return {
            **self.agent.counts(),
            "staging_slots": self.pool.live,
            "staging_in_use": self.pool.in_use,
            "in_flight_reads": len(self.runs.reads),
            "quarantined_slots": len(self.runs.stuck),
            "peak_rss": peak_rss(),
        }

    def close(self) -> None:
        for src in self.sources.values():
            if src.alive:
                try:
                    send_msg(src.sock, {"type": M.BYE})
                except OSError:
                    pass
                src.sock.close()
        for sock in self._socks:  # also those of a handshake that was refused
            try:
                sock.close()
            except OSError:
                pass
        self.sel.close()
        self.agent.close()


def _welcome_values(msg: dict, p: int, layout, num_layers: int) -> tuple[int, float, PageMap]:
    """The welcome's unit budget, lease and the source's page map, each checked before use: the regions
    it registered (addresses, sizes, memory kind), and its own block count (this rank's configuration of
    the prefill does not say it) against its cache region, so a page-to-page READ addresses the bytes it
    means and never leaves that region. Raises ValueError naming the value and what is accepted."""
    where = f"prefill rank {p} welcome"
    unit = msg.get("max_unit_bytes")
    if not M.int_in(unit, 4096, 1 << 40):
        raise ValueError(f"{where}: max_unit_bytes={unit!r:.40} (accepted: an integer in [4096, 2**40])")
    lease = M.lease_seconds(msg.get("lease_s"), where)
    for key in ("cache", "staging"):
        M.region_record(msg.get(key), where, key)
    nb = msg.get("num_blocks")
    if not M.int_in(nb, 1, 1 << 24):
        raise ValueError(f"{where}: num_blocks={nb!r:.40} (accepted: an integer in [1, 16777216])")
    want, got = num_layers * nb * layout.page_bytes, msg["cache"]["nbytes"]
    if got != want:
        raise ValueError(
            f"{where}: cache of {got} B, but {num_layers} layers x num_blocks={nb} x "
            f"page_bytes={layout.page_bytes} make {want} B"
        )
    return unit, float(lease), PageMap.flat(num_layers, nb, layout.page_bytes)


def _clock_of(sock: socket.socket, timeout: float) -> M.LeaseClock:
    """The source's monotonic clock (the pings' round trip bounds the error, on the safe side)."""

    def ping() -> dict:
        send_msg(sock, {"type": M.PING})
        return expect(recv_msg(sock, timeout)[0], M.PONG)

    return M.clock_by_ping(ping)


PROGRESS_EVERY_S = 0.05  # how often a decode rank tells the driver how many requests have ended


def _progress_sender(ctl, total: int):
    """`on_finished` for `run`: ("progress", n) to the driver, at most every PROGRESS_EVERY_S and always
    for the last request (the driver shows it; a pipe send of a few bytes never blocks in practice)."""
    last = [0.0]

    def send(n: int) -> None:
        now = time.monotonic()
        if n == total or now - last[0] >= PROGRESS_EVERY_S:
            last[0] = now
            ctl.send(("progress", n))

    return send


def decode_main(cfg: SideConfig, rank: int, prefill: SideConfig, addrs, opts: DecodeOptions, ctl) -> None:
    """Process entry: connect, then run what the driver asks until it says stop."""
    init_rank_process()
    try:
        ep = DecodeEndpoint(cfg, rank, prefill, addrs, opts)
    except Exception as e:  # reported to the driver, which raises it
        ctl.send(("failed", f"{type(e).__name__}: {e}"))
        return
    ctl.send(("ready", {"sources": sorted(ep.sources), "unit_bytes": ep.unit_bytes, "cost": ep.cost}))
    try:
        while True:
            try:
                cmd, *args = ctl.recv()
            except EOFError:
                break
            if cmd == "arm":  # reset the cache to the oracle background, configure sources, wait for "go"
                mode, requests, concurrency, seed, verify = args
                ep.reset(seed)
                try:
                    ep.configure(mode, requests, concurrency)
                except Exception as e:
                    ctl.send(("failed", f"arm: {type(e).__name__}: {e}"))
                    continue
                ctl.send(("armed",))
            elif cmd == "go":
                t0 = time.monotonic()
                try:
                    done = ep.run(mode, requests, concurrency, _progress_sender(ctl, len(requests)))
                except Exception as e:
                    ctl.send(("failed", f"run: {type(e).__name__}: {e}"))
                    continue
                t1 = time.monotonic()
                mism = ep.mismatches(seed, requests, {r.id for r in done if r.error is None}) if verify else []
                ctl.send(
                    (
                        "result",
                        {
                            "rows": [result_row(r) for r in done],
                            "t0": t0,
                            "t1": t1,
                            "mismatches": mism,
                            "counts": ep.counts(),
                        },
                    )
                )
            elif cmd == "counts":
                ctl.send(("counts", ep.counts()))
            elif cmd == "stop":
                break
    finally:
        ep.close()
        counts = ep.counts()  # after close: what is still held is a leak
        try:
            ctl.send(("closed", counts))
        except (BrokenPipeError, OSError):
            pass
