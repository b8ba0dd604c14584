"""Prefill rank endpoint: owns its cache and staging pool, serves decode ranks over the side channel.

Protocol (side channel, the vocabulary of `hybrid_kv.staging.messages`; data moves by NIXL READs the
decode rank posts):

* ``hello`` {rank fields, agent} + NIXL metadata -> ``welcome`` {rank fields, cache/staging addresses,
  unit budget, lease} + NIXL metadata (with a shared secret, ``challenge`` / ``auth`` first and the
  metadata with ``auth``: `hybrid_kv.staging.auth`), or ``error`` naming the mismatching field (nothing
  is registered for a refused peer).
* ``mode`` {part} -> ``mode-ok``: before a run (warm-up), which pieces this rank packs for that decode
  rank: all (packed), the short runs (auto: ["small", threshold]) or none (strided).
* When a request's prefill has finished (the driver's ``prefilled``), this rank packs it for every
  decode rank that reads from it, **unasked**, and sends ``ready`` {req, units: [[unit, offset, nbytes]],
  until} for the units of a request packed by one launch (`until`: their lease end on this rank's
  clock): the decode rank's READ waits on no reply of its own.
  Units are packed in FIFO order, every unit that fits the pool in one launch per loop step; a unit that
  finds no slot waits (bounded by ``pool_wait_s``), then ``error``.
* The decode rank's READ carries the notification ``done:<req>:<unit>``; on it the slot is freed. A
  slot is also freed on ``release``, when its reader disconnects or when its lease expires.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from hybrid_kv.batch import blocks_from
from hybrid_kv.mover.sender import Sender
from hybrid_kv.plan import DEFAULT_MAX_UNIT_BYTES
from hybrid_kv.staging import messages as M
from hybrid_kv.staging.auth import check_bind, load_secret
from hybrid_kv.staging.chunk import Chunk, flat_chunk
from hybrid_kv.staging.copier import Copier, Done
from hybrid_kv.staging.pagemap import PageMap
from hybrid_kv.staging.template import PlanCache
from hybrid_kv.staging.wire import send_msg
from hybrid_kv.transport.common import RankMemory, SideConfig, init_rank_process, peak_rss
from hybrid_kv.transport.prefill_channel import Peer, PrefillChannel

MAX_TOKENS = 1 << 24  # a request's token count beyond this is refused before any plan is built
IDLE_WAIT_S = 0.01  # longest sleep in select when no unit waits for a slot


@dataclass
class PrefillOptions:
    host: str = "127.0.0.1"
    port: int = 0
    pool_bytes: int = 256 << 20
    max_unit_bytes: int = DEFAULT_MAX_UNIT_BYTES
    pool_wait_s: float = 20.0
    lease_s: float = 30.0
    backend: str | None = None  # ops backend for packing
    poll_s: float = 0.0005


@dataclass
class Waiting:
    """A unit to pack once a staging slot is free."""

    peer: Peer
    req: str
    unit: int
    chunk: Chunk
    since: float


@dataclass
class Packing:
    """Units packed by one launch, announced when the launch has completed."""

    done: Done
    units: list[tuple[Peer, str, int, int, int]] = field(default_factory=list)  # peer, req, unit, offset, bytes


class PrefillEndpoint:
    def __init__(self, cfg: SideConfig, rank: int, opts: PrefillOptions) -> None:
        self.cfg, self.rank, self.opts = cfg, rank, opts
        self.secret = load_secret()
        check_bind(opts.host, self.secret, f"prefill rank {rank}'s side channel")
        mem = RankMemory(cfg, rank, opts.pool_bytes, "prefill")
        self.spec, self.layouts, self.layout, self.geom = mem.spec, mem.layouts, mem.layout, mem.geom
        self.cache, self.staging, self.agent = mem.cache, mem.staging, mem.agent
        self.cache_reg, self.staging_reg = mem.cache_reg, mem.staging_reg
        self.unit_bytes = min(opts.max_unit_bytes, opts.pool_bytes)
        self.plans = PlanCache(self.spec, self.layout.conv_layout, self.layout.kv_layout, self.unit_bytes)
        self.pages = PageMap.flat(self.geom.num_layers, self.geom.num_blocks, self.geom.page_bytes)
        copier = Copier(self.cache, self.pages, self.staging, "prefill", opts.backend)
        # the core's sender: slots, launches and leases (this rank's FIFO of units is its own policy)
        self.sender = Sender(copier, opts.lease_s, opts.pool_wait_s, pool=mem.pool)
        self.packing: list[Packing] = []
        self.waiting: deque[Waiting] = deque()
        self.stats = {
            "packed_units": 0,
            "refused_handshakes": 0,
            "refused_auth": 0,
            "pool_timeouts": 0,
            "lease_expired": 0,
            "disconnects": 0,
        }
        self.channel = PrefillChannel(self, opts.host, opts.port)  # last: it serves decode ranks at once
        self.port = self.channel.port

    # ---- oracle fill (driver's request) ---------------------------------------------------------------

    def fill(self, seed: int, requests: list[dict], decode_block: int) -> None:
        from hybrid_kv.oracle.fill import fill_background, write_request

        fill_background(self.cache, self.geom, seed, 0, self.rank)  # page by page: no second copy
        for r in requests:
            write_request(
                self.cache,
                self.geom,
                self.layout,
                seed,
                r["id"],
                blocks_from(r["prefill_blocks"]),
                r["tokens"],
                self.layout.block_size,
                decode_block,
                "prefill",
            )

    # ---- event loop -----------------------------------------------------------------------------------

    def step(self, timeout: float | None = None) -> None:
        # Slots only need freeing promptly when units wait for one; otherwise sleep in select (a new
        # message wakes it) instead of burning a core polling notifications.
        if timeout is None:
            timeout = self.opts.poll_s if (self.waiting or self.packing) else IDLE_WAIT_S
        self.channel.poll(timeout)
        self._on_notifs()
        self._expire_leases()
        self._pack_waiting()
        self._announce()

    def forget_work(self, peer: Peer) -> None:
        """Free every slot held for `peer` and drop its queued and not yet announced units."""
        self.sender.free_where(lambda k, p=peer: k[0] == id(p))
        self.waiting = deque(w for w in self.waiting if w.peer is not peer)
        for batch in self.packing:  # packed for it, not announced yet: nobody will read those slots
            batch.units = [u for u in batch.units if u[0] is not peer]

    # ---- packing, unasked -------------------------------------------------------------------------------

    def prefilled(self, requests: list[dict]) -> None:
        """Requests whose prefill finished: queue every unit of each for every decode rank that reads
        from this rank and asked for packing (`mode`). A request that cannot be packed (bad block ids) is
        refused to each such peer, naming it."""
        now = time.monotonic()
        for r in requests:
            for peer in list(self.channel.peers.values()):
                if peer.agent is None or peer.part is None:
                    continue
                req = str(r["id"])
                try:
                    chunk = self._chunk(peer, r)
                except (ValueError, KeyError, TypeError) as e:
                    self.channel.error(peer, f"request {req}: {e}", req=req)
                    continue
                self.waiting.extend(Waiting(peer, req, u, chunk, now) for u in range(len(chunk.units)))

    def _chunk(self, peer: Peer, r: dict) -> Chunk:
        sizes = (self.cfg.block_size, peer.block_size)
        pair = self.plans.pair(self.cfg.tp_size, peer.tp_size, self.rank, peer.tp_rank, sizes, peer.part)
        blocks = blocks_from(r["prefill_blocks"])
        tokens = int(r["tokens"])
        if not 0 <= tokens <= MAX_TOKENS:
            raise ValueError(f"tokens={tokens} out of range [0, {MAX_TOKENS}]")
        bs = (self.layout.block_size, peer.layouts[0].block_size)
        return flat_chunk(self.plans.shapes, pair, self.pages, "prefill", tokens, blocks.state, blocks.kv, bs)

    def _pack_waiting(self) -> None:
        """Every waiting unit that finds a slot, in FIFO order, in one launch; the rest wait (bounded).
        With the synchronous torch backend one request (chunk) at a time, announced as it lands, NIXL
        progressing between them (READs of what is announced)."""
        now, sync = time.monotonic(), self.sender.copier.backend == "torch"  # torch: complete on return
        while self.waiting:
            run = list(self.waiting)
            if sync:  # the first chunk's units
                run = run[: next((i for i, w in enumerate(run) if w.chunk is not run[0].chunk), len(run))]
            items = [((id(w.peer), w.req), w.chunk, [w.unit]) for w in run]
            offsets, done = self.sender.launch(items, [], fit="fifo", leased=False)
            staged = [(w, o[0]) for w, o in zip(run, offsets) if o is not None]
            for _ in staged:  # FIFO: later units must not overtake (a started request's units come first)
                self.waiting.popleft()
            if staged:  # announced once its launch has completed
                self.packing.append(Packing(done, [(w.peer, w.req, w.unit, off, w.chunk.unit_bytes[w.unit])
                                                   for w, off in staged]))  # fmt: skip
            if len(staged) < len(run) or not sync:
                break
            self._announce()
            self._on_notifs()
        for w in list(self.waiting):
            if now - w.since <= self.opts.pool_wait_s:
                break
            self.waiting.remove(w)
            self.stats["pool_timeouts"] += 1
            self.channel.error(
                w.peer,
                f"staging pool full for {self.opts.pool_wait_s:g} s: request {w.req} unit {w.unit} waited "
                f"(pool {self.pool.capacity} B, {self.pool.in_use} B in use)",
                req=w.req,
                unit=w.unit,
            )

    def _announce(self) -> None:
        """Tell each decode rank about the units whose pack launch completed (the READ must see them), each
        leased from now (sent along: the decode rank's fence, `messages.LeaseClock`)."""
        while self.packing and self.packing[0].done.ready():
            batch = self.packing.pop(0)
            grouped: dict[tuple[int, str], tuple[Peer, list]] = {}
            for peer, req, unit, off, n in batch.units:
                self.stats["packed_units"] += 1
                grouped.setdefault((id(peer), req), (peer, []))[1].append((unit, off, n))
            for (key, req), (peer, units) in grouped.items():
                until = self.sender.lease([(key, req, u) for u, _, _ in units])
                if until is None or peer.sock.fileno() not in self.channel.peers:
                    continue  # dropped (a failed send of this batch, a disconnect): nobody reads these
                try:
                    send_msg(peer.sock, M.ready(req, units, until))
                except OSError as e:
                    self.channel.drop(peer, f"send failed: {e}")

    @property
    def pool(self):
        """The staging pool (the sender's)."""
        return self.sender.pool

    def release(self, peer: Peer, req: str) -> None:
        """A request the decode rank gave up: free what was staged for it and drop its queued units."""
        self.sender.free_where(lambda k: k[0] == id(peer) and k[1] == req)
        self.waiting = deque(w for w in self.waiting if not (w.peer is peer and w.req == req))

    def _on_notifs(self) -> None:
        for agent, msgs in self.agent.notifs().items():
            peer = next((p for p in self.channel.peers.values() if p.agent == agent), None)
            for m in msgs:
                parts = m.decode(errors="replace").split(":")
                if peer is None or len(parts) != 3 or parts[0] != "done":
                    continue  # strided-mode completions carry nothing to free
                try:
                    key = (id(peer), parts[1], int(parts[2]))
                except ValueError:
                    continue
                self.sender.release(key)

    def _expire_leases(self) -> None:
        self.stats["lease_expired"] += self.sender.reap()

    def counts(self) -> dict:
        return {
            **self.agent.counts(),
            "staging_slots": self.pool.live,
            "staging_in_use": self.pool.in_use,
            "peers": len(self.channel.peers),
            "waiting": len(self.waiting),
            "last_disconnect": self.channel.last_disconnect,
            "messages": dict(self.channel.messages),
            "peak_rss": peak_rss(),
            **self.stats,
        }

    def close(self) -> None:
        self.channel.close()
        self.agent.close()


def prefill_main(cfg: SideConfig, rank: int, opts: PrefillOptions, ctl) -> None:
    """Process entry: serve until the driver says stop (or the driver's pipe closes)."""
    init_rank_process()
    try:
        ep = PrefillEndpoint(cfg, rank, opts)
    except Exception as e:  # reported to the driver, which raises it
        ctl.send(("failed", f"{type(e).__name__}: {e}"))
        return
    ctl.send(("port", ep.port))
    try:
        while True:
            if ctl.poll():
                try:
                    cmd, *args = ctl.recv()
                except EOFError:
                    break
                if cmd == "fill":
                    try:
                        ep.fill(*args)
                    except Exception as e:
                        ctl.send(("failed", f"fill: {type(e).__name__}: {e}"))
                        continue
                    ctl.send(("filled",))
                elif cmd == "prefilled":
                    ep.prefilled(*args)
                elif cmd == "counts":
                    ctl.send(("counts", ep.counts()))
                elif cmd == "stop":
                    break
            ep.step()
    finally:
        ep.close()
        try:
            ctl.send(("closed", ep.counts()))
        except (BrokenPipeError, OSError):
            pass
