"""When the prefill rank may free a request: only once the decode rank has completed every READ of it.

The prefill rank frees a request's blocks and its staged state when its consumers notify it. In packed
pull mode the state READs (from staging) and vLLM's own READ (attention KV, which carries the
notification) are separate transfers: a notification that arrives while a state READ is in flight lets the
next request be packed over bytes still being read. Real engines and NIXL agents, as in
test_vllm_connector.py."""

from __future__ import annotations

import time

import pytest

pytest.importorskip("vllm", reason="needs the vllm extra (CI installs it)")
pytest.importorskip("nixl", reason="needs the nixl extra (CI installs it)")

import vllm_steps as S
from vllm.distributed.kv_transfer.kv_connector.v1.nixl.metadata import NixlConnectorMetadata
from vllm_pair import assert_exact

pytestmark = pytest.mark.usefixtures("ds_layout")


def polled(nx, transfers) -> tuple[set, set]:
    for handles in transfers.values():
        for h in handles:
            nx.check_xfer_state(h)
    return set(), set()


@pytest.mark.parametrize(
    ("name", "ptp", "dtp"),
    [
        pytest.param("qwen3-next-80b-a3b", 1, 2, id="gdn-1to2"),  # every READ of a source carries KV heads
        pytest.param("nemotron-h-8b", 2, 1, id="mamba2-2to1"),  # two sources, one notification each
    ],
)
def test_prefill_keeps_staging_until_every_read_completed(pairs, name, ptp, dtp):
    pair = pairs(name, ptp, dtp, "packed", n=2)
    ids = {q.req_id for q in pair.reqs}
    workers = [c.connector_worker for c in pair.d.conns]
    for w in workers:  # a decode engine whose state READs are still in flight: it polls (which progresses
        # the transfers and sends what they carry) but sees no request complete
        w._pop_done_transfers = lambda transfers, nx=w.nixl_wrapper: polled(nx, transfers)
    S.submit(pair.p, pair.d, pair.reqs)

    def poll_prefill() -> None:  # as the prefill engines would, each step
        for c in pair.p.conns:
            S.step(c, NixlConnectorMetadata())
            sent = c.connector_worker.get_transfer_results().finished_sending
            assert not sent, f"prefill rank freed {sorted(sent)} before the decode rank saw its READs complete"

    deadline = time.monotonic() + 60
    while not all(set(w._hkv_recv) == ids and all(r.posted for r in w._hkv_recv.values()) for w in workers):
        assert time.monotonic() < deadline, "the decode ranks did not post their READs in 60 s"
        for c in pair.d.conns:
            S.step(c, NixlConnectorMetadata())
            c.connector_worker.get_transfer_results()
        poll_prefill()
        time.sleep(0.002)
    servers = [c.connector_worker._hkv_server for c in pair.p.conns]
    held = [s.live_slots for s in servers]
    assert all(n > 0 for n in held), held
    until = time.monotonic() + 1.5  # the READs run on meanwhile (the decode ranks poll them too)
    while time.monotonic() < until:
        for c in pair.d.conns:
            c.connector_worker.get_transfer_results()
        poll_prefill()
        time.sleep(0.005)
    assert [s.live_slots for s in servers] == held
    for w in workers:
        del w._pop_done_transfers  # the class's method again: completions are seen, the notifications go
    S.run_until(pair.p.conns, pair.d.conns, ids, {S.p_id(i) for i in ids})
    assert_exact(pair)
    pair.wait_no_leaks()
