"""The packed push worker: vLLM's NIXL push worker (the prefill WRITEs) with the recurrent state moved by
hybrid-kv: the decode rank grants receive slots when its engine registers a request
(`hybrid_kv.vllm.push_recv`), the prefill rank packs and WRITEs one descriptor per transfer unit into them
when the prefill has finished (`hybrid_kv.vllm.push_send`), and the decode rank scatters and reports the
request received once the scatter has completed. No pack request, no reply on the critical path. The
attention KV, the registration, the handshakes, leases and heartbeats are vLLM's own push path.
"""

from __future__ import annotations

from vllm.distributed.kv_transfer.kv_connector.v1.nixl.push_worker import NixlPushConnectorWorker

from hybrid_kv.vllm.anytp import refuse_non_dividing
from hybrid_kv.vllm.base import PackedWorker
from hybrid_kv.vllm.push_recv import PushReceive
from hybrid_kv.vllm.push_send import PushSend


class HybridKVPushWorker(PackedWorker, PushSend, PushReceive, NixlPushConnectorWorker):
    """`NixlPushConnectorWorker` that WRITEs Mamba/GDN state packed: one descriptor per unit per decode rank."""

    # auto's choice rests on READs the decode rank times against the source's staging; in push the decode
    # rank holds no READ path, so the cost model has nothing to measure
    MODES = ("packed",)

    def __init__(self, vllm_config, engine_id: str, kv_cache_config, mode: str = "packed") -> None:
        super().__init__(vllm_config, engine_id, kv_cache_config, mode)
        self._hkv_push_recv_init()
        self._hkv_push_send_init()

    def register_kv_caches(self, kv_caches) -> None:
        super().register_kv_caches(kv_caches)
        self._hkv_hook_server()

    # ---- decode side: the hello with each source prefill rank ------------------------------------------

    def _nixl_handshake(
        self,
        host: str,
        port: int,
        remote_tp_size: int,
        expected_engine_id: str,
        remote_dcp_size: int = 1,
        remote_pp_size: int = 1,
        notif_agents_only: bool = False,
    ):
        """A decode rank's handshake with a prefill engine (for a registration or a heartbeat) first says
        hello to every source prefill rank on hybrid-kv's side channel, naming its receive staging; a prefill
        rank's handshake with a decode engine it pushes to has no hello."""
        fresh = []
        receiving = self.kv_transfer_config.kv_role != "kv_producer" and expected_engine_id not in self._hkv_dests
        sizes = (remote_tp_size, self.world_size) if receiving else (self.world_size, remote_tp_size)
        refuse_non_dividing(*sizes, "the push connector's attention KV is vLLM's, which needs the ratio")
        if self._hkv_geom is not None and receiving:
            push = {"engine_id": self.engine_id, "staging": list(self._hkv_desc)}
            for p in self._hkv_plans.sources(remote_tp_size, self.world_size)[self.tp_rank]:
                key = (expected_engine_id, p)
                if key not in self._hkv_links:
                    self._hkv_connect(key, remote_tp_size, host, port, push)
                    fresh.append(key)
        try:
            return super()._nixl_handshake(
                host, port, remote_tp_size, expected_engine_id, remote_dcp_size, remote_pp_size, notif_agents_only
            )
        except BaseException:
            for key in fresh:
                self._hkv_links.pop(key).close()
            raise

    # ---- each step --------------------------------------------------------------------------------------

    def start_load_kv(self, metadata) -> None:
        self._hkv_fence(getattr(metadata, "reqs_to_send", None) or {})  # before any push of them can pack
        self._hkv_register(metadata)  # before vLLM sends the registrations
        super().start_load_kv(metadata)
        self._hkv_grant()

    def get_transfer_results(self):
        self._hkv_grant()
        res = super().get_transfer_results()
        self._hkv_failed_by_vllm(res.failed_recving)
        if self._hkv_server is not None:
            self._hkv_poll_pushes(res.finished_sending)
            for req_id in res.finished_sending:  # written (or expired): nothing of it is staged any more
                self._hkv_server.forget(req_id)
        return res

    def hkv_leaks(self) -> dict[str, int]:
        out = super().hkv_leaks()
        server = self._hkv_server
        out.update(
            pushes=len(self._hkv_pushes),
            awaiting_grants=len(self._hkv_awaiting),
            withheld=len(self._hkv_withheld),
            granting=sum(r in self._hkv_recv for r in self._hkv_granting),
            quarantined=len(self._hkv_quarantine),
            grants_kept=len(server._grants) if server is not None else 0,
        )
        return out
