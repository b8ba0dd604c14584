"""Decode-side prefix caching (vLLM's mamba_cache_mode 'align') through HybridKVConnector, on vLLM's own
objects (`vllm_pair.Pair`, real NIXL agents): both engines serve with prefix caching on, and the decode
scheduler's metadata is what vLLM's pull scheduler binds for each kind of local hit:

- no hit: every block of the request;
- a partial hit: its first KV block is already in the decode cache (shared with another request), so the
  metadata carries only the blocks after it, and the running-state block (vLLM clips the Mamba groups to it);
- a full hit: no groups at all, `()` (vLLM's own "full prefix cache hit" marker): nothing to load, the
  prefill side is only told to free the request's blocks.

Checked: every byte of every decode rank against the oracle (the held block keeps its bytes), the prefill
side frees all three requests, and no staging slot, receive or push outlives them."""

import socket
import time

import pytest

pytest.importorskip("vllm", reason="needs the vllm extra (CI installs it)")
pytest.importorskip("nixl", reason="needs the nixl extra (CI installs it)")

import vllm_steps as S
from bytecheck import assert_same_bytes
from vllm_steps import ALIGN


@pytest.mark.parametrize("mode", ["packed", "strided"])
@pytest.mark.parametrize(
    "name,ptp,dtp", [("qwen3-next-80b-a3b", 1, 2), ("nemotron-h-8b", 2, 1)], ids=["gdn-1to2", "mamba2-2to1"]
)
def test_local_prefix_hits_move_only_what_is_missing(pairs, ds_layout, mode, name, ptp, dtp):
    pair = pairs(name, ptp, dtp, mode, n=3, d_cache=ALIGN, p_cache=ALIGN)
    assert pair.d.vc.cache_config.mamba_cache_mode == "align"
    assert {s.mamba_cache_mode for s in pair.d.specs.values() if hasattr(s, "mamba_cache_mode")} == {"align"}
    none, full, part = pair.reqs  # 90, 790 and 1490 tokens: 1, 1 and 2 KV blocks
    kinds = [k for _, _, k in pair.d.groups()]
    assert all(len(ids) == 2 for ids, k in zip(part.d_blocks, kinds) if k == "attn")
    # the partial hit: the decode cache holds the first KV block, which must keep its bytes (the oracle
    # leaves it as background); vLLM's metadata carries the rest
    part.d_blocks = [ids[1:] if k == "attn" else ids for ids, k in zip(part.d_blocks, kinds)]
    full.d_blocks = ()  # vLLM's marker of a full local hit
    want = S.expected_with_hits(pair, {part.req_id: 1})
    # the first request connects the decode ranks' links, so the prefill ranks push the next two when they
    # finish (packed: pack at finish); the decode metadata comes once those pushes have arrived
    S.submit(pair.p, pair.d, [none])
    S.run_until(pair.p.conns, pair.d.conns, {none.req_id}, {S.p_id(none.req_id)})
    for c in pair.p.conns:
        S.step(c, S.send_meta([full, part]))
    links = [lk for c in pair.d.conns for lk in getattr(getattr(c.connector_worker, "hkv", None), "links", {}).values()]
    assert (mode == "packed") == bool(links)
    deadline = time.monotonic() + 30
    while not all(S.p_id(full.req_id) in lk._staged for lk in links):
        assert time.monotonic() < deadline, "the prefill ranks never pushed the full hit's units"
        time.sleep(0.01)
    for c in pair.d.conns:
        S.step(c, S.recv_meta([full, part], pair.p))
    # every request reported received (vLLM's stock worker reports the full hit too, once it told the
    # prefill side), and every one freed on the prefill side
    ids = {full.req_id, part.req_id}
    _, failed, _ = S.run_until(pair.p.conns, pair.d.conns, ids, {S.p_id(i) for i in ids})
    assert not any(failed), failed
    for r, w in enumerate(want):
        assert_same_bytes(pair.d.storage(r), w, f"decode rank {r} against the oracle")
    if mode == "packed":
        pair.wait_no_leaks()
        # the full hit's pushes are dropped when the decode side learns it will not READ them
        assert [lk.staged for lk in links] == [0] * len(links)


def test_pushes_nobody_takes_go_when_their_lease_ends():
    """A push for a request this decode rank never READs (one that came after the request was handled,
    or an aborted one) must not stay until 4096 others evict it: it goes once its lease has ended."""
    from hybrid_kv.mover.link import PrefillLink
    from hybrid_kv.staging import messages as M
    from hybrid_kv.staging.wire import send_msg

    with socket.create_server(("127.0.0.1", 0)) as srv:
        link = PrefillLink("127.0.0.1", srv.getsockname()[1], 5.0)
        conn, _ = srv.accept()
        try:
            now = time.monotonic()
            link.clock = M.LeaseClock(now, now, now)  # the same clock on both ends
            link.PURGE_EVERY_S = 0.0
            send_msg(conn, M.ready("late", [(0, 0, 8)], now + 0.3))
            send_msg(conn, M.ready("live", [(0, 8, 8)], now + 60))
            deadline = time.monotonic() + 10
            while link.staged < 2:
                assert time.monotonic() < deadline
                time.sleep(0.01)
            time.sleep(0.4)
            send_msg(conn, M.ready("next", [(0, 16, 8)], time.monotonic() + 60))  # an arrival purges
            while "next" not in link._staged:
                assert time.monotonic() < deadline
                time.sleep(0.01)
            assert link.take_staged("late") is None
            assert link.take_staged("live")["units"] == [[0, 8, 8]]
            assert link.take_staged("next") is not None
        finally:
            conn.close()
            link.close()
