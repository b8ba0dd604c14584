"""The packed push worker: `HybridKVPushWorker`, vLLM's NIXL push worker (the prefill WRITEs) forwarding the
hooks it overrides to the object it holds, `hkv` (a `PushPath`), with the recurrent state moved by the state
mover: the decode rank grants receive slots when its engine registers a
request (`PushReceiver`, `hybrid_kv.vllm.push_recv`), the prefill rank packs and WRITEs one descriptor per
transfer unit into them when the prefill has finished (`PushSender`, `hybrid_kv.vllm.push_send`), and the
decode rank scatters and reports the request received once the scatter has completed. No pack request, no
reply on the critical path. The attention KV, the registration, the handshakes, leases and heartbeats are
vLLM's own push path.
"""

from __future__ import annotations

from collections.abc import Callable

from vllm.distributed.kv_transfer.kv_connector.v1.nixl.push_worker import NixlPushConnectorWorker

from hybrid_kv.vllm.anytp import refuse_non_dividing
from hybrid_kv.vllm.push_recv import PushReceiver
from hybrid_kv.vllm.push_send import PushSender
from hybrid_kv.vllm.rank import PackedRank
from hybrid_kv.vllm.surface import dim_first_view


class PushPath(PackedRank):
    """The push worker's hooks (`HybridKVPushWorker` below forwards them)."""

    # auto's choice rests on READs the decode rank times against the source's staging; in push the decode
    # rank holds no READ path, so the cost model has nothing to measure
    MODES = ("packed",)

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.recv = PushReceiver(self)
        self.send = PushSender(self)

    def register(self, kv_caches) -> None:
        super().register(kv_caches)
        self.recv.registered()
        self.send.hook()

    def handshake(self, host: str, port: int, remote_tp: int, engine_id: str, stock: Callable[[], object]):
        """A decode rank's handshake with a prefill engine (for a registration or a heartbeat) first says hello
        to every source prefill rank on hybrid-kv's side channel, naming its receive staging; a prefill rank's
        handshake with a decode engine it pushes to (`stock`: vLLM's handshake) has no hello."""
        w, fresh = self.w, []
        receiving = w.kv_transfer_config.kv_role != "kv_producer" and engine_id not in self.send.dests
        sizes = (remote_tp, w.world_size) if receiving else (w.world_size, remote_tp)
        refuse_non_dividing(*sizes, "the push connector's attention KV is vLLM's, which needs the ratio")
        if self.geom is not None and receiving:
            push = {"engine_id": w.engine_id, "staging": list(self.desc)}
            for p in self.plans.sources(remote_tp, w.world_size)[w.tp_rank]:
                if (engine_id, p) not in self.links:
                    self.connect((engine_id, p), remote_tp, host, port, push)
                    fresh.append((engine_id, p))
        try:
            return stock()
        except BaseException:
            for key in fresh:
                self.links.pop(key).close()
            raise

    # ---- each step ------------------------------------------------------------------------------------

    def start_load(self, metadata) -> None:
        self.fence(getattr(metadata, "reqs_to_send", None) or {})  # before any push of them can pack
        self.recv.register(metadata)  # before vLLM sends the registrations
        self.stock.start_load_kv(metadata)
        self.recv.grant()

    def transfer_results(self):
        self.recv.grant()
        res = self.stock.get_transfer_results()
        self.recv.failed_by_vllm(res.failed_recving)
        if self.server is not None:
            self.send.poll(res.finished_sending)
            for req_id in res.finished_sending:  # written (or expired): nothing of it is staged any more
                self.server.sender.forget(req_id)
        return res

    def leaks(self) -> dict[str, int]:
        out = super().leaks()
        send, recv = self.send, self.recv
        out.update(
            pushes=len(send.out.pushes) if send.out else 0,
            awaiting_grants=len(send.out.awaiting) if send.out else 0,
            withheld=len(send.withheld),
            granting=recv.push.waiting() if recv.push else 0,
            quarantined=len(recv.push.quarantine) if recv.push else 0,
            grants_kept=self.server.grants.kept if self.server is not None else 0,
        )
        return out


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
