"""The packed workers: vLLM's NIXL pull and push workers, each forwarding the hooks it overrides to the object
it holds, `hkv` (`hybrid_kv.vllm.pull.PullPath`, `hybrid_kv.vllm.push.PushPath`), which calls vLLM's own
implementation where the stock path runs. Nothing of hybrid-kv's state lives on the worker but `hkv`; the
hooks and the vLLM members the paths reach are the version surface (`hybrid_kv.vllm.surface`).
"""

from __future__ import annotations

from vllm.distributed.kv_transfer.kv_connector.v1.nixl.pull_worker import NixlPullConnectorWorker
from vllm.distributed.kv_transfer.kv_connector.v1.nixl.push_worker import NixlPushConnectorWorker

from hybrid_kv.vllm.pull import PullPath
from hybrid_kv.vllm.push import PushPath
from hybrid_kv.vllm.surface import dim_first_view


class HybridKVWorker(NixlPullConnectorWorker):
    """`NixlPullConnectorWorker` that moves Mamba/GDN state packed: one descriptor per unit per source (and
    attention KV with it where the TP sizes do not divide each other: `hybrid_kv.vllm.anytp`)."""

    def __init__(self, vllm_config, engine_id: str, kv_cache_config, mode: str = "packed") -> None:
        # refusals first: before the stock worker creates its NIXL agent
        self.hkv = PullPath(self, super(), vllm_config, kv_cache_config, mode)
        with dim_first_view():
            super().__init__(vllm_config, engine_id, kv_cache_config)

    def register_kv_caches(self, kv_caches) -> None:
        self.hkv.register(kv_caches)

    def _nixl_handshake(self, host: str, port: int, remote_tp_size: int, expected_engine_id: str, *args, **kwargs):
        self.hkv.handshake(host, port, remote_tp_size)
        return super()._nixl_handshake(host, port, remote_tp_size, expected_engine_id, *args, **kwargs)

    def add_remote_agent(self, nixl_agent_meta, remote_tp_rank: int = 0, remote_tp_size: int = 1,
                         remote_dcp_size: int = 1):  # fmt: skip
        return self.hkv.add_remote_agent(nixl_agent_meta, remote_tp_rank, remote_tp_size, remote_dcp_size)

    def start_load_kv(self, metadata) -> None:
        self.hkv.start_load(metadata)

    def get_transfer_results(self):
        return self.hkv.transfer_results()

    def _read_blocks_for_req(self, req_id: str, meta) -> None:
        self.hkv.read(req_id, meta)

    def _pop_done_transfers(self, transfers):
        return self.hkv.pop_done(transfers)

    def _reap_expired_send_leases(self, done_sending: set[str]) -> None:
        self.hkv.reap_expired(done_sending)

    def shutdown(self) -> None:
        self.hkv.close()
        super().shutdown()


class HybridKVPushWorker(NixlPushConnectorWorker):
    """`NixlPushConnectorWorker` that WRITEs Mamba/GDN state packed: one descriptor per unit per decode rank."""

    def __init__(self, vllm_config, engine_id: str, kv_cache_config, mode: str = "packed") -> None:
        self.hkv = PushPath(self, super(), vllm_config, kv_cache_config, mode)
        with dim_first_view():
            super().__init__(vllm_config, engine_id, kv_cache_config)

    def register_kv_caches(self, kv_caches) -> None:
        self.hkv.register(kv_caches)

    def _nixl_handshake(self, host: str, port: int, remote_tp_size: int, expected_engine_id: str,
                        remote_dcp_size: int = 1, remote_pp_size: int = 1,
                        notif_agents_only: bool = False):  # fmt: skip
        def stock():
            return super(HybridKVPushWorker, self)._nixl_handshake(
                host, port, remote_tp_size, expected_engine_id, remote_dcp_size, remote_pp_size, notif_agents_only
            )

        return self.hkv.handshake(host, port, remote_tp_size, expected_engine_id, stock)

    def start_load_kv(self, metadata) -> None:
        self.hkv.start_load(metadata)

    def get_transfer_results(self):
        return self.hkv.transfer_results()

    def _get_new_notifs(self) -> set[str]:
        return self.hkv.recv.new_notifs()

    def _pop_done_transfers(self, transfers):
        return self.hkv.recv.pop_done(transfers)

    def _do_start_push_kv(self, request_id: str, local_block_ids, registration_data: dict) -> None:
        self.hkv.send.start_push(request_id, local_block_ids, registration_data)

    def _xfer_blocks_for_req(self, req_id: str, meta) -> None:
        self.hkv.send.xfer_for_req(req_id, meta)

    def _xfer_blocks(self, read_spec, dst_engine_id: str, request_id: str, remote_request_id: str, *args, **kwargs):
        return self.hkv.send.xfer_blocks(read_spec, dst_engine_id, request_id, remote_request_id, *args, **kwargs)

    def _reap_expired_send_leases(self, done_sending: set[str]) -> None:
        self.hkv.reap_expired(done_sending)

    def shutdown(self) -> None:
        self.hkv.close()
        super().shutdown()
