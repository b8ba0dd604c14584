"""Requests and scheduler steps for connector tests on `vllm_util` engines: each request's oracle state and
block ids, the caches filled from the oracle, the metadata vLLM's schedulers bind each step, and the
completion polling a model runner does, bounded by a deadline."""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
from vllm.distributed.kv_transfer.kv_connector.v1.nixl.metadata import NixlConnectorMetadata
from vllm_util import Engine, layer_names, layouts, page_fn

from hybrid_kv.oracle.state import random_bytes, random_global_state, write_shards
from hybrid_kv.spec import LayerKind

ALIGN = {"enable_prefix_caching": True, "mamba_cache_mode": "align"}  # vLLM's prefix caching for hybrids


def p_id(req_id: str) -> str:
    """The prefill engine's id of a decode request: the same base id with another random suffix, as vLLM
    gives each engine (its push flow matches the two by the base)."""
    return f"{req_id}-0000beef"


@dataclass
class Request:
    """One request: its global state and its block ids per transfer group on both sides."""

    req_id: str
    tokens: int
    state: object
    p_blocks: list[list[int]]
    d_blocks: list[list[int]]


def make_request(
    req_id: str, p: Engine, d: Engine, tokens: int, p_free: list[int], d_free: list[int], seed: int
) -> Request:
    gen = np.random.default_rng(seed)
    bs = p.vc.cache_config.block_size
    assert bs == d.vc.cache_config.block_size, "tests pair engines with one block size"
    n_kv = -(-tokens // bs)
    p_blocks, d_blocks = [], []
    for _, _, kind in p.groups():
        n = n_kv if kind == "attn" else 1
        p_blocks.append([p_free.pop() for _ in range(n)])
        d_blocks.append([d_free.pop() for _ in range(n)])
    state = random_global_state(p.spec, n_kv * bs, gen)
    return Request(req_id, tokens, state, p_blocks, d_blocks)


def _layer_blocks(eng: Engine, blocks: list[list[int]]):
    """(state block per state layer, kv blocks per attention layer) from per-group block lists."""
    names = layer_names(eng)
    group_of = {n: g for g, ns, _ in eng.groups() for n in ns}
    state, kv = {}, {}
    for layer in eng.spec.layers:
        ids = blocks[group_of[names[layer.index]]]
        if layer.kind is LayerKind.ATTENTION:
            kv[layer.index] = ids
        else:
            state[layer.index] = ids[-1]
    return state, kv


def fill(eng: Engine, reqs: list[Request], side: str, seed: int) -> list[torch.Tensor]:
    """Random background on every rank's storage, then each request's shards at its blocks. Returns the
    filled bytes per rank (on the prefill side: what is in the caches; on decode: what must end up there)."""
    out = []
    for r in range(eng.tp):
        st = eng.storage(r)
        buf = random_bytes(st.numel(), np.random.default_rng([seed, r]))
        page_of = page_fn(eng, r, buf)
        lay = layouts(eng, r)
        for q in reqs:
            state, kv = _layer_blocks(eng, q.p_blocks if side == "prefill" else q.d_blocks)
            n_tok = len(next(iter(kv.values()))) * lay.block_size if kv else 0
            write_shards(buf, lay, 0, q.state, state, kv, n_tok, page_of=page_of)
        out.append(buf)
    return out


def step(conn, meta) -> None:
    conn.bind_connector_metadata(meta)
    conn.start_load_kv(None)
    conn.clear_connector_metadata()


def send_meta(reqs: list[Request], lease_s: float = 60.0, prefilled: bool = True):
    """The prefill scheduler's metadata once `reqs` finished prefill (blocks held for the decode side);
    `prefilled` adds their block ids as hybrid-kv's scheduler does (`push_finished_blocks`), so the
    packed prefill workers pack them at once."""
    m = NixlConnectorMetadata()
    for q in reqs:
        m.reqs_in_batch.add(p_id(q.req_id))
        m.reqs_to_send[p_id(q.req_id)] = time.perf_counter() + lease_s
        if prefilled:
            m.push_finished_blocks[p_id(q.req_id)] = [list(g) for g in q.p_blocks]
    return m


def recv_meta(reqs: list[Request], p: Engine, d: Engine | None = None):
    """The decode scheduler's metadata for `reqs` (kv_transfer_params as the prefill side returns them).
    With the decode engine `d` given, push mode: vLLM's push scheduler registers each request (its block
    ids, this engine's side channel) for the workers to send to the prefill engine, and knows no prefill
    block ids."""
    m = NixlConnectorMetadata()
    port = int(p.scheduler.connector_scheduler.side_channel_port)
    for q in reqs:
        params = {
            "remote_block_ids": () if d else q.p_blocks,
            "remote_engine_id": p.engine_id,
            "remote_request_id": p_id(q.req_id),
            "remote_host": "127.0.0.1",
            "remote_port": port,
            "tp_size": p.tp,
        }
        m.add_new_req_to_recv(q.req_id, q.d_blocks, params, awaiting_kvs=True)
        if d is not None:
            sched = d.scheduler.connector_scheduler
            m.push_registrations[q.req_id] = {
                "request_id": q.req_id,
                "decode_engine_id": d.engine_id,
                "decode_host": "127.0.0.1",
                "decode_port": int(sched.side_channel_port),
                "decode_tp_size": d.tp,
                "local_block_ids": [list(g) for g in q.d_blocks],
                "remote_engine_id": p.engine_id,
                "remote_host": "127.0.0.1",
                "remote_port": port,
                "remote_tp_size": p.tp,
                "remote_pp_size": 1,
            }
    return m


def submit(p: Engine, d: Engine, reqs: list[Request], push: bool = False) -> None:
    """One step's metadata on both sides: P holds `reqs` for the decode side, D starts loading them (push:
    D registers them first, then P's prefills finish)."""
    if push:
        for c in d.conns:
            step(c, recv_meta(reqs, p, d))
    for c in p.conns:
        step(c, send_meta(reqs))
    if not push:
        for c in d.conns:
            step(c, recv_meta(reqs, p))


def run_until(conns_p, conns_d, want_recv: set[str], want_sent: set[str], timeout: float = 60.0):
    """Drive the workers' completion polling (what vLLM's model runner does each step) until every decode
    rank reports `want_recv` done and every prefill rank `want_sent`; bounded by `timeout`."""
    recv = [set() for _ in conns_d]
    failed = [set() for _ in conns_d]
    sent = [set() for _ in conns_p]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for c in (*conns_d, *conns_p):  # a model-runner step: start_load_kv with this step's (empty) metadata
            step(c, NixlConnectorMetadata())
        for i, c in enumerate(conns_d):
            res = c.connector_worker.get_transfer_results()
            recv[i] |= res.finished_recving
            failed[i] |= res.failed_recving
        for i, c in enumerate(conns_p):
            res = c.connector_worker.get_transfer_results()
            sent[i] |= res.finished_sending
        if all(want_recv <= s for s in recv) and all(want_sent <= s for s in sent):
            return recv, failed, sent
        time.sleep(0.002)
    raise TimeoutError(f"not finished in {timeout}s: recv {recv}, failed {failed}, sent {sent}")


def expected_with_hits(pair, held: dict[str, int]) -> list[torch.Tensor]:
    """The decode ranks' bytes after the receives, by the oracle: each request's shards at its decode blocks;
    the first `held[req]` KV blocks of a request are the decode cache's own (not written: scratch pages)."""
    d = pair.d
    out = []
    for r in range(d.tp):
        buf = pair.background[r].clone()
        page_of = page_fn(d, r, buf)
        lay = layouts(d, r)
        scratch = torch.empty(max(s.page_size_bytes for s in d.specs.values()), dtype=torch.uint8)
        for q in pair.reqs:
            if not q.d_blocks:
                continue  # full hit: nothing moves
            state, kv = _layer_blocks(d, q.d_blocks)
            n = held.get(q.req_id, 0)
            kv = {i: [-1] * n + ids for i, ids in kv.items()}
            n_tok = len(next(iter(kv.values()))) * lay.block_size
            write_shards(
                buf,
                lay,
                0,
                q.state,
                state,
                kv,
                n_tok,
                page_of=lambda i, b, pg=page_of, sc=scratch: sc if b < 0 else pg(i, b),
            )
        out.append(buf)
    return out
