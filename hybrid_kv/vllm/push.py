"""The packed push path (`HybridKVPushWorker.hkv`): vLLM's NIXL push worker (the prefill WRITEs) with the
recurrent state moved by the state mover: the decode rank grants receive slots when its engine registers a
request (`PushReceiver`, `hybrid_kv.vllm.push_recv`), the prefill rank packs and WRITEs one descriptor per
transfer unit into them when the prefill has finished (`PushSender`, `hybrid_kv.vllm.push_send`), and the
decode rank scatters and reports the request received once the scatter has completed. No pack request, no
reply on the critical path. The attention KV, the registration, the handshakes, leases and heartbeats are
vLLM's own push path.
"""

from __future__ import annotations

from collections.abc import Callable

from hybrid_kv.vllm.anytp import refuse_non_dividing
from hybrid_kv.vllm.push_recv import PushReceiver
from hybrid_kv.vllm.push_send import PushSender
from hybrid_kv.vllm.rank import PackedRank


class PushPath(PackedRank):
    """The push worker's hooks (`hybrid_kv.vllm.worker.HybridKVPushWorker` forwards them)."""

    # auto's choice rests on READs the decode rank times against the source's staging; in push the decode
    # rank holds no READ path, so the cost model has nothing to measure
    MODES = ("packed",)

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.recv = PushReceiver(self)
        self.send = PushSender(self)

    def register(self, kv_caches) -> None:
        super().register(kv_caches)
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
            pushes=len(send.pushes),
            awaiting_grants=len(send.awaiting),
            withheld=len(send.withheld),
            granting=sum(r in self.rx.recvs for r in recv.granting) if self.rx else 0,
            quarantined=len(recv.quarantine),
            grants_kept=self.server.grants.kept if self.server is not None else 0,
        )
        return out
