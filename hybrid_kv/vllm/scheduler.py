"""The scheduler side of the packed backend: vLLM's pull scheduler, plus the block ids of every request
whose prefill just finished, handed to the prefill workers in the step's metadata so that they pack the
request's state at once, before any decode rank asks (`push_finished_blocks`, a field of vLLM's metadata
that pull mode leaves unused)."""

from __future__ import annotations

from vllm.distributed.kv_transfer.kv_connector.v1.nixl.pull_scheduler import NixlPullConnectorScheduler


class HybridKVScheduler(NixlPullConnectorScheduler):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._hkv_finished: dict[str, list[list[int]]] = {}

    def request_finished(self, request, block_ids):
        delay, params = super().request_finished(request, block_ids)
        if delay and params and params.get("do_remote_decode"):
            # the ids the decode side will read (vLLM's clipped list, as in kv_transfer_params)
            self._hkv_finished[request.request_id] = [list(g) for g in params["remote_block_ids"]]
        return delay, params

    def build_connector_meta(self, scheduler_output):
        meta = super().build_connector_meta(scheduler_output)
        if self._hkv_finished:
            meta.push_finished_blocks = self._hkv_finished
            self._hkv_finished = {}
        return meta
