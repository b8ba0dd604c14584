"""Host cost per request of the packed path: thread CPU time from block ids to the kernel launch call.

For each (model, prefill TP -> decode TP, tokens) and each shell, the per-request host work is timed on
the code the shells run, with the copy itself replaced by building its launch arguments (`Copier.slot_rows`:
the slot rows the kernel receives, every range checked):

* ``vllm``, prefill: `PrefillServer._prepack` (what the connector runs when a prefill finishes: block-id
  checks, plan memo hit, chunk, all-or-none leased staging allocation, launch arguments, the `staged`
  push to one connected decode rank) on a `StateGeometry` over views laid out as vLLM 0.32 allocates them
  (reference §2.3: slot k of every group at k * num_blocks * page); decode: what `HybridKVWorker` runs per
  request (`PullPath.read`'s receive: `Receiver.open`'s checks, source list and chunks, `alloc`'s receive
  slots; `Receiver.scatter`'s launch rows);
* ``transport``, prefill: `PrefillEndpoint._chunk` + a slot per unit + rows (what `_pack_waiting`
  does); decode: `DecodeRuns._chunk` + `Receiver.alloc_unit` per announced unit + `scatter_units`' rows.

`stock_host_us` is the baseline's own per-request host work: for ``transport`` the strided mode's
descriptor lists (`direct_runs` + the address arrays, before NIXL's post); for ``vllm`` the stock NIXL
worker's `_read_blocks_for_req` (descriptor ids, prep and post) on real vLLM engines, for the models
tests/vllm_util.py can build (others: null). `round_trips` counts the side-channel replies a request
waits for after warm-up, `launches_per_step` the copy launches per side for all requests ready in one
step. Prints one JSON object with --json.

    python bench/bench_host.py [--json] [--iters 300] [--device cuda] [--out FILE]

On `--device cuda` every copy launches for real (Triton, the copier's own stream, the slot rows uploaded
from pinned memory) and the time stops when the launch call returns (the copy runs on after it; the
loop synchronizes outside the timed region).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import socket
import sys
import threading
import time
import types
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_repack import environment

from hybrid_kv.layout import RankLayout, cdiv
from hybrid_kv.mover.receiver import Receiver
from hybrid_kv.mover.sender import Sender
from hybrid_kv.spec_hf import load_spec
from hybrid_kv.staging.chunk import direct_runs
from hybrid_kv.staging.copier import Copier, Done
from hybrid_kv.staging.pagemap import PageMap
from hybrid_kv.staging.pool import LeasedPool
from hybrid_kv.staging.template import ALL, PlanCache

ROWS = [("qwen3.5-27b", 2, 4), ("qwen3.5-397b-a17b", 8, 4), ("nemotron-h-8b", 1, 2)]
UNIT = 256 << 20  # the connector's default unit budget
VARIANTS = 4  # distinct block-id sets, cycled: consecutive requests never share their ids
STAGING = 1 << 30


_LAUNCH_AT: list[int | None] = [None]  # thread time when the (stubbed) launch was called


def _timed(fn, iters: int, after=None) -> dict:
    """Median and p10/p90 of `fn`'s thread CPU time in us, up to its launch call if it makes one (what
    follows the launch, such as the push of the staged offsets, is not host prep); `after` (not timed)
    runs after each call."""
    xs = []
    for i in range(iters + 5):
        _LAUNCH_AT[0] = None
        t = time.thread_time_ns()
        fn()
        end = time.thread_time_ns()
        dt = ((_LAUNCH_AT[0] or end) - t) / 1e3
        if after is not None:
            after()
        if i >= 5:
            xs.append(dt)
    a = np.array(xs)
    return {"median": float(np.median(a)), "p10": float(np.percentile(a, 10)), "p90": float(np.percentile(a, 90))}


DEVICE = ["cpu"]  # --device: on CUDA the copies launch for real (Triton, the copier's own stream)


def _empty(nbytes: int) -> torch.Tensor:
    return torch.empty(nbytes, dtype=torch.uint8, device=DEVICE[0])


def _backend() -> str:
    return "triton" if DEVICE[0].startswith("cuda") else "torch"


def _instrument(copier: Copier) -> Copier:
    """CPU: build and check the launch arguments, note the time of the launch call, skip the copy
    (excluded from host time by definition). CUDA: the real launch (slot-row upload, kernel enqueue on
    the copier's stream); the time is taken when the launch call returns, before the copy completes."""
    real = copier.run

    def rows_only(jobs, after=()):
        copier.slot_rows(jobs)  # what `Copier.run` builds before its launch
        _LAUNCH_AT[0] = time.thread_time_ns()
        return Done()

    def launched(jobs, after=()):
        done = real(jobs, after)
        _LAUNCH_AT[0] = time.thread_time_ns()
        return done

    copier.run = launched if DEVICE[0].startswith("cuda") else rows_only
    return copier


def _settle() -> None:
    if DEVICE[0].startswith("cuda"):
        torch.cuda.synchronize()


# ---- vLLM shell ------------------------------------------------------------------------------------------


def _vllm_geometry(spec, tp: int, rank: int, num_blocks: int):
    """A `StateGeometry` over one backing buffer laid out as vLLM 0.32 does (groups of state layers, slot
    k of each group at k * num_blocks * page)."""
    from hybrid_kv.mover.geometry import StateGeometry

    lay = RankLayout(spec, tp, rank)
    page = lay.page_bytes
    state = [layer for layer in spec.layers if layer.kind.value != "attention"]
    n_groups = max(1, cdiv(len(state), max(1, len(spec.attention_layers) or len(state))))
    group_size = cdiv(len(state), n_groups)
    buf = _empty(group_size * num_blocks * page)
    conv = (lay.conv_channels, lay.conv_rows)
    shapes = types.SimpleNamespace(shapes=(conv, (lay.ssm_shard.size, *spec.state.head_shape)))
    groups, caches, specs = [], {}, {}
    for g in range(n_groups):
        names = []
        for k, layer in enumerate(state[g::n_groups]):
            name = f"model.layers.{layer.index}.mixer"
            caches[name] = buf[k * num_blocks * page :].as_strided((num_blocks, page), (page, 1))
            specs[name] = shapes
            names.append(name)
        groups.append((g + 1, names))
    return StateGeometry(spec, lay, groups, caches, specs, num_blocks)


def vllm_row(name: str, ptp: int, dtp: int, tokens: int, iters: int) -> dict:
    from hybrid_kv.mover.server import PrefillServer
    from hybrid_kv.staging.chunk import state_chunk

    spec = load_spec(name)
    blocks = 8
    pgeom = _vllm_geometry(spec, ptp, 0, blocks)
    dgeom = _vllm_geometry(spec, dtp, 0, blocks)
    plans = PlanCache(spec, "DS", "HND", UNIT, kv=False)
    sources = plans.sources(ptp, dtp)[0]
    src = sources[0]
    staging = _empty(STAGING)
    sgeom = _vllm_geometry(spec, ptp, src, blocks)
    pack = Copier(sgeom.storage, sgeom.pages, staging, "prefill", _backend())
    sender = Sender(pack, 180.0, 60.0, geometry=sgeom, plans=plans)
    server = PrefillServer(
        host="127.0.0.1",
        port=0,
        sender=sender,
        staging_desc=(staging.data_ptr(), staging.numel(), 0),
        agent_name="bench",
        not_held=lambda r: None,
    )
    _instrument(sender.copier)
    # one decode rank connected (a socket pair stands in for its link): what the prefill worker runs
    # when the request's prefill finishes (`PrefillServer._prepack`: checks, chunk, slots, launch
    # arguments, and the `staged` push)
    ours, theirs = socket.socketpair()
    theirs.setblocking(False)
    server._peers[0] = (ours, threading.Lock(), RankLayout(spec, dtp, 0))
    # every request has other block ids (a memo of the last request's offsets must not flatter it)
    finished = [{"r": {g: [b] for g in pgeom.groups}} for b in range(VARIANTS)]
    turn = itertools.count()

    def prefill() -> None:
        server._prepack(finished[next(turn) % VARIANTS])

    def done() -> None:  # the READ's 'done' (not timed); drain the push
        sender.free_where(lambda k: True)
        try:
            while theirs.recv(1 << 16):
                pass
        except BlockingIOError:
            pass

    recv_stage = _empty(STAGING)
    dcopier = _instrument(Copier(dgeom.storage, dgeom.pages, recv_stage, "decode", _backend()))
    rx = Receiver(dgeom, plans, LeasedPool(STAGING), dcopier, 60.0)
    locals_ = [{g: [b] for g in dgeom.groups} for b in range(VARIANTS)]

    def decode() -> None:  # PullPath.read's receive (Receiver.open: checks, chunks; alloc) and the scatter's launch
        rx.alloc("r", rx.open("r", None, "p", ptp, locals_[next(turn) % VARIANTS], {}))
        rx.scatter(["r"])

    def retire() -> None:
        _settle()
        rx.scattered()
        rx.drop("r")

    try:
        hp = _timed(prefill, iters, done)
    finally:
        server.close()
    hd = _timed(decode, iters, retire)
    return {
        "model": name,
        "prefill_tp": ptp,
        "decode_tp": dtp,
        "tokens": tokens,
        "path": "vllm",
        "host_prep_us": {"prefill": hp["median"], "decode": hd["median"]},
        "spread_us": {"prefill": [hp["p10"], hp["p90"]], "decode": [hd["p10"], hd["p90"]]},
        "stock_host_us": None,
        "round_trips": 0,  # after warm-up: pushed when the prefill finished (tests/test_vllm_connector.py)
        "launches_per_step": {"prefill": 1, "decode": 1},  # every request finished / landed in one step
        "slots_per_request": len(
            state_chunk(plans.pair(ptp, dtp, src, 0), dgeom, locals_[0], "decode", plans.shapes).tpl
        ),
    }


# ---- CLI transport shell ---------------------------------------------------------------------------------


def transport_row(name: str, ptp: int, dtp: int, tokens: int, iters: int) -> dict:
    from hybrid_kv.transport.common import SideConfig
    from hybrid_kv.transport.prefill import Peer, PrefillEndpoint
    from hybrid_kv.transport.receive import DecodeRuns

    spec = load_spec(name)
    pcfg, dcfg = SideConfig(name, ptp, 1), SideConfig(name, dtp, 1)
    players, dlayers = pcfg.layouts(spec), dcfg.layouts(spec)
    nkv_p = cdiv(tokens, players[0].block_size) if spec.attention_layers else 0
    nkv_d = cdiv(tokens, dlayers[0].block_size) if spec.attention_layers else 0
    nbp, nbd = nkv_p + 2, nkv_d + 2
    n_layers = len(spec.layers)
    plans = PlanCache(spec, "DS", "HND", 64 << 20)
    sources = plans.sources(ptp, dtp, (16, 16))[0]
    src = sources[0]
    ppages = PageMap.flat(n_layers, nbp, players[0].page_bytes)
    dpages = PageMap.flat(n_layers, nbd, dlayers[0].page_bytes)
    pcache, dcache = _empty(ppages.storage_bytes), _empty(dpages.storage_bytes)
    pstage, dstage = _empty(STAGING), _empty(STAGING)
    pep = types.SimpleNamespace(
        plans=plans, cfg=types.SimpleNamespace(block_size=16, tp_size=ptp), rank=src, layout=players[src], pages=ppages
    )
    peer = Peer(None, agent="d", tp_size=dtp, tp_rank=0, layouts=dlayers, block_size=16, part=ALL)
    psender = Sender(_instrument(Copier(pcache, ppages, pstage, "prefill", _backend())), 180.0, 60.0)

    rng = np.random.default_rng(0)  # every request has other block ids
    reqs = []
    for _ in range(VARIANTS):
        ids = rng.permutation(nbp)[: 1 + nkv_p].tolist()
        reqs.append({"id": "r", "tokens": tokens, "prefill_blocks": [ids[0], ids[1:]]})
    turn = itertools.count()

    def prefill() -> None:  # PrefillEndpoint.prefilled + _pack_waiting (the core's Sender), for one decode peer
        chunk = PrefillEndpoint._chunk(pep, peer, reqs[next(turn) % VARIANTS])
        psender.launch([(("p", "r"), chunk)], [], fit="fifo", leased=False)

    dep = types.SimpleNamespace(
        plans=plans,
        pcfg=pcfg,
        cfg=dcfg,
        rank=0,
        player=players,
        layout=dlayers[0],
        pages=dpages,
        sources={p: types.SimpleNamespace(pages=ppages) for p in sources},  # their welcomes' page maps
    )
    dcopier = _instrument(Copier(dcache, dpages, dstage, "decode", _backend()))
    drx = Receiver(None, None, LeasedPool(STAGING), dcopier, 60.0)
    dep.rx = drx
    druns = DecodeRuns(dep)
    pbs = [types.SimpleNamespace(state=r["prefill_blocks"][0], kv=tuple(r["prefill_blocks"][1])) for r in reqs]
    dbs = []
    for _ in range(VARIANTS):
        ids = rng.permutation(nbd)[: 1 + nkv_d].tolist()
        dbs.append(types.SimpleNamespace(state=ids[0], kv=tuple(ids[1:])))

    def decode() -> None:  # DecodeRuns._start's chunks, a receive slot per announced unit, the step's scatter
        i = next(turn) % VARIANTS
        recv = drx.track("r", {p: druns._chunk(p, ALL, tokens, pbs[i], dbs[i])[0] for p in sources})
        units = [("r", p, u) for p, c in recv.chunks.items() for u in range(len(c.units))]
        for _, p, u in units:
            drx.alloc_unit("r", recv, p, u)
        drx.scatter_units(units)

    def stock() -> None:  # the strided mode's descriptors of one request (before NIXL's post)
        i = next(turn) % VARIANTS
        pb, db = pbs[i], dbs[i]
        for p in sources:
            dx, px = druns._chunk(p, ("large", 0), tokens, pb, db, prefill_side=True)
            runs = direct_runs(px, dx)
            np.stack([1 << 40 + runs[:, 1], runs[:, 2]], axis=1)
            np.stack([1 << 41 + runs[:, 0], runs[:, 2]], axis=1)

    hp = _timed(prefill, iters, lambda: (_settle(), psender.free_where(lambda k: True)))
    hd = _timed(decode, iters, lambda: (_settle(), drx.drop("r")))
    hs = _timed(stock, iters)
    chunk = PrefillEndpoint._chunk(pep, peer, reqs[0])
    return {
        "model": name,
        "prefill_tp": ptp,
        "decode_tp": dtp,
        "tokens": tokens,
        "path": "transport",
        "host_prep_us": {"prefill": hp["median"], "decode": hd["median"]},
        "spread_us": {"prefill": [hp["p10"], hp["p90"]], "decode": [hd["p10"], hd["p90"]]},
        "stock_host_us": hs["median"],
        "round_trips": 0,  # sources announce units unasked (tests/test_transport.py counts the messages)
        "launches_per_step": {"prefill": 1, "decode": 1},
        "slots_per_request": len(chunk.tpl),
        "units_per_request": len(chunk.units),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--iters", type=int, default=300)
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--device", default="cpu", help="cpu (launch arguments only) or cuda (real launches)")
    ap.add_argument("--out", default="", help="also write the JSON object to this file")
    a = ap.parse_args()
    DEVICE[0] = a.device
    torch.set_num_threads(1)
    rows = []
    import importlib.util

    have_vllm = importlib.util.find_spec("vllm") is not None  # the GPU host's image has no vLLM
    for name, ptp, dtp in ROWS:
        if have_vllm:
            rows.append(vllm_row(name, ptp, dtp, a.tokens, a.iters))
        else:
            rows.append({"model": name, "prefill_tp": ptp, "decode_tp": dtp, "path": "vllm", "skipped": "no vllm"})
        rows.append(transport_row(name, ptp, dtp, a.tokens, a.iters))
        if not a.json:
            for r in rows[-2:]:
                print(r, flush=True)
    env = environment(DEVICE[0])
    out = {
        "rows": rows,
        "device": env["device"],
        "versions": {"torch": env["torch"], "triton": env["triton"], "python": sys.version.split()[0]},
        "date": env["date"],
        "git": env["git"],
        "cpus": os.cpu_count(),
        "launches": "real (Triton on the copier's stream)" if a.device.startswith("cuda") else "arguments only",
    }
    text = json.dumps(out, indent=None if a.json else 2)
    print(text)
    if a.out:
        Path(a.out).write_text(text)


if __name__ == "__main__":
    main()
