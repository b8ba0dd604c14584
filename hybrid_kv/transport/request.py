"""What the decode rank keeps per source (its side channel, clock, lease, pages) and per request (its
pending units, error and timings), and a request's result row for the driver."""

from __future__ import annotations

import socket
from dataclasses import dataclass, field

from hybrid_kv.staging import messages as M
from hybrid_kv.staging.pagemap import PageMap
from hybrid_kv.staging.wire import FrameReader

MSG_TIMEOUT_S = 10.0  # a source's message must be whole this long after its first byte arrived


@dataclass
class Source:
    rank: int
    sock: socket.socket
    agent: str
    info: dict
    alive: bool = True
    lease_s: float = 30.0  # the source's staging lease (its welcome), for the fence in `_landing`
    clock: M.LeaseClock | None = None  # the source's clock, from the handshake
    pages: PageMap | None = None  # the source's cache pages, from its welcome (page-to-page READs)
    reader: FrameReader | None = None  # its side channel after the handshake (never a blocking read)

    def __post_init__(self) -> None:
        if self.reader is None:
            self.reader = FrameReader(self.sock, MSG_TIMEOUT_S)


@dataclass
class Request:
    id: str
    tokens: int
    pblocks: object
    dblocks: object
    chunks: dict  # prefill rank -> this rank's chunk of the packed part
    start: float = 0.0
    end: float = 0.0
    pending: set = field(default_factory=set)  # (prefill rank, unit) not yet landed
    error: str | None = None
    descriptors: int = 0
    nbytes: int = 0
    post_us: float = 0.0
    xfer_us: float = 0.0
    nixl_descs: int = 0
    ready_s: float = 0.0  # first 'ready' from a source, after the request started
    read_s: float = 0.0  # READ post -> completion seen, summed over READs
    scatter_s: float = 0.0  # unpack launches, summed

    @property
    def done(self) -> bool:
        return self.error is not None or not self.pending


def result_row(r: Request) -> dict:
    return {
        "id": r.id,
        "ok": r.error is None,
        "error": r.error,
        "start": r.start,
        "end": r.end,
        "descriptors": r.descriptors,
        "bytes": r.nbytes,
        "post_us": r.post_us,
        "xfer_us": r.xfer_us,
        "nixl_descs": r.nixl_descs,
        "ready_s": r.ready_s,
        "read_s": r.read_s,
        "scatter_s": r.scatter_s,
    }
