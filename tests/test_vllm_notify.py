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


def polled(nx, transfers, states: dict) -> tuple[set, set]:
    for handles in transfers.values():
        for h in handles:
            states[h] = nx.check_xfer_state(h)
    return set(), set()


@pytest.mark.parametrize(
    ("name", "ptp", "dtp"),
    [
        pytest.param("qwen3-next-80b-a3b", 1, 2, id="gdn-1to2"),  # every READ of a source carries KV heads
        pytest.param("nemotron-h-8b", 2, 1, id="mamba2-2to1"),  # two sources, one notification each
    ],
)
def test_prefill_keeps_staging_until_every_read_completed(pairs, name, ptp, dtp):
    """The decode ranks post their READs and NIXL completes them, but the engine does not see them complete
    (its completion polling is held back). Then each decode rank sends a marker notification to its sources,
    and the test waits until every prefill rank has received every marker: a notification the decode rank
    sent earlier (with the READs' posting, or carried by a READ) reached the prefill before it. Until the
    decode engine sees the READs complete, no prefill rank may report the requests sent or free staging.

    Bug caught: the held notification sent as the READs are posted instead of after they completed (with a
    wall-clock window in place of the marker, a loaded machine delivered it too late to be seen)."""
    pair = pairs(name, ptp, dtp, "packed", n=2)
    ids = {q.req_id for q in pair.reqs}
    workers = [c.connector_worker for c in pair.d.conns]
    states: dict = {}  # READ handle -> NIXL's last state of it
    for w in workers:  # a decode engine whose READs complete unseen: it polls (which progresses the
        # transfers and sends what they carry) but sees no request complete
        w._pop_done_transfers = lambda transfers, nx=w.nixl_wrapper: polled(nx, transfers, states)
    markers = {c.connector_worker.tp_rank: 0 for c in pair.p.conns}
    for c in pair.p.conns:  # count the markers each prefill rank's agent hands to vLLM
        nx = c.connector_worker.nixl_wrapper

        def notifs(nx=nx, real=nx.get_new_notifs, rank=c.connector_worker.tp_rank):
            got = real()
            markers[rank] += sum(m.startswith(b"HB:hkv-marker") for msgs in got.values() for m in msgs)
            return got

        nx.get_new_notifs = notifs
    S.submit(pair.p, pair.d, pair.reqs)

    def poll_all() -> None:  # as the engines would, each step
        for c in pair.d.conns:
            S.step(c, NixlConnectorMetadata())
            c.connector_worker.get_transfer_results()
        for c in pair.p.conns:
            S.step(c, NixlConnectorMetadata())
            sent = c.connector_worker.get_transfer_results().finished_sending
            assert not sent, f"prefill rank freed {sorted(sent)} before the decode rank saw its READs complete"
        time.sleep(0.002)

    def wait(cond, what: str) -> None:
        deadline = time.monotonic() + 60
        while not cond():
            assert time.monotonic() < deadline, f"{what} not within 60 s"
            poll_all()

    def reads_done() -> bool:
        handles = [h for w in workers for hs in w._recving_transfers.values() for h in hs]
        posted = all(set(w.hkv.rx.recvs) == ids and all(r.posted for r in w.hkv.rx.recvs.values()) for w in workers)
        return posted and bool(handles) and all(states.get(h) == "DONE" for h in handles)

    wait(reads_done, "every READ of the decode ranks posted and completed (NIXL's state)")
    servers = [c.connector_worker.hkv.server for c in pair.p.conns]
    held = [s.sender.live_slots for s in servers]
    assert all(n > 0 for n in held), held
    readers = dict.fromkeys(markers, 0)
    for w in workers:  # vLLM reads a heartbeat naming no request it holds as nothing
        for (_, p), agent in w._remote_agents[pair.p.engine_id].items():
            w.nixl_wrapper.send_notif(agent, notif_msg=f"HB:hkv-marker-{w.tp_rank}".encode())
            readers[p] += 1
    wait(lambda: markers == readers, f"the decode ranks' markers at their sources ({readers})")
    assert [s.sender.live_slots for s in servers] == held
    for w in workers:
        del w._pop_done_transfers  # the class's method again: completions are seen, the notifications go
    S.run_until(pair.p.conns, pair.d.conns, ids, {S.p_id(i) for i in ids})
    assert_exact(pair)
    pair.wait_no_leaks()
