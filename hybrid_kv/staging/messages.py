"""The one side-channel vocabulary of both shells (framing: `hybrid_kv.staging.wire`).

Decode rank -> prefill rank:

* ``hello``   {tp_size, tp_rank, fingerprint | rank fields, agent, nonce} (+ NIXL metadata in the CLI, without
  a secret) -> ``welcome`` {the prefill rank's fields, its staging region} or ``error``. With a shared
  secret, ``challenge`` / ``auth`` (+ the metadata) come first (`hybrid_kv.staging.auth`). Nothing else is
  served before the welcome.
* ``mode``    {part}: what the prefill rank packs for this decode rank from now on: null (nothing: the
  decode rank reads page to page, or with vLLM's stock descriptors), ["all", 0] or ["small", threshold]
  (auto's short runs) -> ``mode-ok``. Whatever it still held for the decode rank is dropped.
* ``pack``    {req, blocks} (the connector, only when nothing was pushed for the request) -> ``ready``,
  then ``ok`` (or ``error``).
* ``release`` {req}: the decode rank is done with the request's staged units (read, failed or given up).
* ``grant``   {req, units: [[unit, offset, nbytes], ...], until, blocks} (the connector's push mode): receive
  slots at `offset` of the decode rank's registered staging (named in its hello), one per transfer unit of
  the request's chunk from this prefill rank, usable until `until` on the *prefill* rank's clock. The
  prefill rank WRITEs each unit with one descriptor and a notification, and starts no WRITE for the request
  (state or attention) later than `until - PUSH_MARGIN_S`. No reply: a grant it will not use is answered
  with ``push-end``.
* ``ping`` -> ``pong`` (the auto cost model's round trip); ``bye``.

Prefill rank -> decode rank, unasked:

* ``ready``   {req, units: [[unit, offset, nbytes], ...], until, blocks?}: units staged for the request at
  `offset` of the prefill rank's registered staging, leased until `until` (its monotonic clock); the
  decode rank READs each with one descriptor, and uses the bytes only if the READ completed before that
  lease could have ended on its own clock (`LeaseClock`).
* ``error``   {message, req?}: a refused request (or message), named.
* ``push-end`` {req, why} (push mode): this prefill rank has nothing in flight to the decode rank for the
  request and will WRITE nothing more for it (a refused or expired grant, a failed WRITE): the decode rank
  fails the request and reuses its slots.

Every field is checked here, against the receiver's own plan, before it is used (`ready_units`, `part`,
`request_id`): a value that does not fit fails the request (or the message) with its name and value.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence

HELLO, WELCOME, MODE, MODE_OK, PACK, OK = "hello", "welcome", "mode", "mode-ok", "pack", "ok"
CHALLENGE, AUTH = "challenge", "auth"  # with a shared secret, between hello and welcome (staging/auth.py)
READY, RELEASE, PING, PONG, BYE, ERROR = "ready", "release", "ping", "pong", "bye", "error"
GRANT, PUSH_END = "grant", "push-end"  # the connector's push mode
PUSH_MARGIN_S = 5.0  # a grant's WRITEs start this long before it ends (the decode rank's fence)

MAX_REQUEST_ID = 512  # characters
MAX_THRESHOLD = 1 << 40


def _int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def int_in(v, lo: int, hi: int) -> bool:
    """Whether a peer's value is an integer (not a bool) in [lo, hi]."""
    return _int(v) and lo <= v <= hi


def _region_ok(addr, nbytes, dev) -> bool:
    return int_in(addr, 0, (1 << 64) - 1) and int_in(nbytes, 0, 1 << 50) and int_in(dev, 0, (1 << 16) - 1)


def request_id(v) -> str:
    """A request id as sent: a non-empty string of at most MAX_REQUEST_ID characters."""
    if not isinstance(v, str) or not 0 < len(v) <= MAX_REQUEST_ID:
        raise ValueError(f"request id {v!r:.80} (accepted: a string of 1 to {MAX_REQUEST_ID} characters)")
    return v


def part(v) -> tuple | None:
    """A `mode` message's part: null, ["all", 0] or ["small", threshold] (checked, never trusted)."""
    if v is None:
        return None
    if isinstance(v, list) and len(v) == 2 and v[0] in ("all", "small") and int_in(v[1], 0, MAX_THRESHOLD):
        if v[0] == "all" and v[1] != 0:
            raise ValueError(f"mode part={v!r:.80} (['all', 0] takes no threshold)")
        return (v[0], v[1])
    raise ValueError(f"mode part={v!r:.80} (accepted: null, ['all', 0], ['small', threshold >= 0])")


def region(v, where: str) -> list[int]:
    """A registered region as the connector's welcome names it: [addr, nbytes, dev], integers in range."""
    if not (isinstance(v, list) and len(v) == 3 and _region_ok(*v)):
        raise ValueError(f"{where}: staging={v!r:.80} (accepted: [addr, nbytes, dev], non-negative integers)")
    return v


def region_record(v, where: str, key: str) -> dict:
    """A registered region as the CLI's welcome names it: {addr, nbytes, dev, mem} (never trusted)."""
    ok = isinstance(v, dict) and _region_ok(v.get("addr"), v.get("nbytes"), v.get("dev"))
    if not ok or v.get("mem") not in ("DRAM", "VRAM"):
        raise ValueError(f"{where}: {key}={v!r:.120} (accepted: {{addr, nbytes, dev: integers, mem: DRAM or VRAM}})")
    return v


def ready(req: str, units: Sequence[tuple[int, int, int]], until: float, blocks: dict | None = None) -> dict:
    """The `ready` announcement of `units` ((unit, offset, nbytes), offsets into the sender's staging),
    leased until `until` on the sender's monotonic clock (the receiver's fence: `LeaseClock`)."""
    msg = {"type": READY, "req": req, "units": [[int(u), int(o), int(n)] for u, o, n in units], "until": until}
    if blocks is not None:
        msg["blocks"] = [[int(g), [int(b) for b in ids]] for g, ids in blocks.items()]
    return msg


def ready_units(msg: dict, sizes: Sequence[int], staging_bytes: int, source: str) -> list[tuple[int, int, int]]:
    """The (unit, offset, nbytes) a `ready` announces, checked against the receiver's own chunk (`sizes`
    of its units, which both sides compute from their own block ids) and the source's registered
    staging: each unit index in range and announced once, its size the planned size, its range inside
    the staging. Anything else raises, naming what was announced and what the plan holds."""
    got = msg.get("units")
    ok = isinstance(got, list) and 0 < len(got) <= len(sizes)
    out: list[tuple[int, int, int]] = []
    if ok:
        for e in got:
            if not (isinstance(e, list) and len(e) == 3 and all(_int(x) for x in e)):
                ok = False
                break
            u, off, n = e
            if not (0 <= u < len(sizes) and n == sizes[u] and 0 <= off and off + n <= staging_bytes):
                ok = False
                break
            out.append((u, off, n))
        ok = ok and len({u for u, _, _ in out}) == len(out)
    if not ok:
        raise ValueError(
            f"{source} announced units={got!r:.200}, which its plan for this rank does not hold "
            f"(unit sizes {list(sizes)!r:.120} inside its {staging_bytes}-byte staging)"
        )
    return out


def grant(req: str, units: Sequence[tuple[int, int, int]], until: float, blocks: dict) -> dict:
    """The decode rank's `grant` of receive slots ((unit, offset, nbytes), offsets into its staging) for the
    request's units from one prefill rank, usable until `until` on that rank's clock."""
    msg = ready(req, units, until, blocks)
    msg["type"] = GRANT
    return msg


def push_end(req: str, why: str) -> dict:
    return {"type": PUSH_END, "req": req, "why": str(why)[:2000]}


# The NIXL notification a push's state WRITE carries (NIXL sends it once the WRITE's data has landed).
STATE_NOTIF = b"HKV1:"


def state_notif(prefill_rank: int, req: str) -> bytes:
    return STATE_NOTIF + f"{int(prefill_rank)}:{req}".encode()


def parse_state_notif(msg: bytes) -> tuple[int, str] | None:
    """(prefill rank, request) of a state notification; None for any other notification (vLLM's own)."""
    if not msg.startswith(STATE_NOTIF):
        return None
    try:
        rank, req = msg[len(STATE_NOTIF) :].decode().split(":", 1)
        if not rank.isdigit():
            raise ValueError(rank)
        return int(rank), request_id(req)
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"state notification {msg[:80]!r} (accepted: HKV1:<prefill rank>:<request id>)") from e


def blocks_of(v) -> dict[int, list[int]]:
    """[[group, [block ids]], ...] as sent -> {group: ids} (ints only; ranges are the receiver's check)."""
    if not isinstance(v, list) or not all(
        isinstance(e, list) and len(e) == 2 and _int(e[0]) and isinstance(e[1], list) and all(_int(b) for b in e[1])
        for e in v
    ):
        raise ValueError(f"blocks={v!r:.120} (accepted: [[group, [block ids]], ...] of integers)")
    return {g: list(ids) for g, ids in v}


def clock_by_ping(ping, tries: int = 3) -> LeaseClock:
    """The peer's clock from `tries` ping/pong exchanges (`ping()` sends a ping, returns the pong), the
    tightest one kept: both shells map lease deadlines with it."""
    best = None
    for _ in range(tries):
        sent = time.monotonic()
        pong = ping()
        clock = LeaseClock(pong.get("now"), sent, time.monotonic())
        if best is None or clock.offset < best.offset:
            best = clock
    return best


LEASE_MARGIN = 0.25  # of the source's staging lease: a READ must be over this long before the lease ends
MAX_LEASE_S = 86400.0


def lease_seconds(v, where: str) -> float:
    """A peer's staging lease (its welcome's `lease_s`), checked: seconds in (0, 1 day]."""
    if not _seconds(v) or not 0 < v <= MAX_LEASE_S:
        raise ValueError(f"{where}: lease_s={v!r:.40} (accepted: seconds in (0, {MAX_LEASE_S:g}])")
    return float(v)


def _seconds(v) -> bool:
    """A finite number of seconds (JSON as Python parses it admits NaN and Infinity)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


class LeaseClock:
    """A peer's monotonic clock seen from here, from one exchange: the peer read `peer_now` between our
    `sent` and `received`. `local(t)` maps the peer's time `t` to the earliest local time it can be, so a
    deadline mapped with it is never late; `remote(t)` maps a local deadline to the earliest peer time it
    can be, so a deadline handed to the peer is never late on this side either (the exchange's round trip
    is the margin; drift over a lease is negligible)."""

    def __init__(self, peer_now, sent: float, received: float) -> None:
        if not _seconds(peer_now) or received < sent:
            raise ValueError(f"peer clock reading {peer_now!r:.40} (accepted: the peer's monotonic seconds)")
        self.offset = float(peer_now) - sent  # the largest offset the exchange allows
        self.rtt = received - sent

    def remote(self, t: float) -> float:
        return float(t) + self.offset - self.rtt  # the smallest offset the exchange allows

    def local(self, t) -> float:
        if not _seconds(t):
            raise ValueError(f"lease deadline {t!r:.40} (accepted: the peer's monotonic seconds)")
        return float(t) - self.offset

    def read_by(self, until, lease_s: float) -> float:
        """The latest local time a READ of bytes the peer leased until `until` (its clock) may complete and
        still count: the lease's end here less `LEASE_MARGIN` of the lease. The one fence both shells use."""
        return self.local(until) - lease_s * LEASE_MARGIN
