"""vLLM's stock READ of a packed request, posted with its notification held back.

A prefill rank frees a request's blocks when its decode consumers have notified it, and with them the
request's staged state (`PrefillServer.forget`). vLLM attaches the notification to its own READ (attention
KV), or sends it at once when a source has no blocks of its own to give; either can reach the prefill rank
while the state READs from its staging are still in flight, and a slot freed then can be packed over by the
next request. So the stock READ goes out without it, and the notification is sent once every READ of the
request (stock and state) has completed: `send_held`."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

from vllm.logger import init_logger

log = init_logger("vllm.hybrid_kv")


class HeldNotifications:
    """The NIXL wrapper as vLLM's read path sees it on the engine thread: notifications are kept in `held`
    as (agent, message) instead of being attached or sent. Every other call, and any other thread's, passes
    through unchanged."""

    def __init__(self, nx, agents: dict[int, str], held: list[tuple[str, bytes]]) -> None:
        self._nx, self._agents, self._held = nx, agents, held
        self._owner = threading.get_ident()

    def _mine(self) -> bool:
        return threading.get_ident() == self._owner

    def make_prepped_xfer(self, op, local, local_ids, remote, remote_ids, notif_msg=b"", *args, **kwargs):
        if notif_msg and self._mine():
            self._held.append((self._agents[remote], notif_msg))
            notif_msg = b""
        return self._nx.make_prepped_xfer(op, local, local_ids, remote, remote_ids, notif_msg, *args, **kwargs)

    def send_notif(self, agent: str, notif_msg: bytes, *args, **kwargs):
        if self._mine():
            self._held.append((agent, notif_msg))
            return None
        return self._nx.send_notif(agent, notif_msg, *args, **kwargs)

    def __getattr__(self, name: str):
        return getattr(self._nx, name)


@contextmanager
def holding(worker, engine_id: str, held: list[tuple[str, bytes]]) -> Iterator[None]:
    """Within: `worker`'s READs to `engine_id` are posted without notifications, which land in `held`."""
    nx = worker.nixl_wrapper
    agents = {h: worker._remote_agents[engine_id][(0, r)] for r, h in worker.dst_xfer_side_handles[engine_id].items()}
    worker.nixl_wrapper = HeldNotifications(nx, agents, held)
    try:
        yield
    finally:
        worker.nixl_wrapper = nx


def send_held(worker, req_id: str, held: list[tuple[str, bytes]]) -> None:
    """Send a request's held notifications (every READ of it has completed). A failed send is logged and
    counted as vLLM counts its own; the prefill rank then frees the blocks at its abort timeout."""
    while held:
        agent, msg = held.pop(0)
        try:
            worker.nixl_wrapper.send_notif(agent, notif_msg=msg)
        except Exception as e:
            log.warning("hybrid-kv: notifying %s that request %s was read failed: %s", agent, req_id, e)
            worker.xfer_stats.record_failed_notification()
