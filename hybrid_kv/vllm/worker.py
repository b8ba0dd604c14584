"""The packed pull worker: vLLM's NIXL pull worker with the recurrent state moved by hybrid-kv.

Per request the decode rank READs one descriptor per (transfer unit, source rank) from the prefill rank's
staging (packed when the prefill finished and pushed unasked, or packed on its `pack`) into its own
staging, and scatters into its pages before the request is reported done. The stock READ of a request
(attention KV) is posted only after every source rank has packed, because its notification is what lets
the prefill side free the request's blocks. Everything else (handshake, TP mapping, attention reads,
leases, heartbeats, failure reporting through `kv_load_failure_policy`) is vLLM's own code path; the
shared set-up is `hybrid_kv.vllm.base`.
"""

from __future__ import annotations

from vllm.distributed.kv_transfer.kv_connector.v1.nixl.pull_worker import NixlPullConnectorWorker

from hybrid_kv.staging import messages as M
from hybrid_kv.vllm import auto
from hybrid_kv.vllm.anytp import AnyTP, refuse_non_dividing
from hybrid_kv.vllm.base import PackedWorker, log
from hybrid_kv.vllm.receive import PackedReceive


class HybridKVWorker(PackedWorker, AnyTP, PackedReceive, NixlPullConnectorWorker):
    """`NixlPullConnectorWorker` that moves Mamba/GDN state packed: one descriptor per unit per source (and
    attention KV with it where the TP sizes do not divide each other: `hybrid_kv.vllm.anytp`)."""

    def __init__(self, vllm_config, engine_id: str, kv_cache_config, mode: str = "packed") -> None:
        super().__init__(vllm_config, engine_id, kv_cache_config, mode)
        self._hkv_peer_addr: tuple[str, int] | None = None

    # ---- handshake ------------------------------------------------------------------------------------

    def register_kv_caches(self, kv_caches) -> None:
        super().register_kv_caches(kv_caches)
        self._hkv_any_tp()

    def _nixl_handshake(self, host: str, port: int, remote_tp_size: int, expected_engine_id: str, *args, **kwargs):
        self._hkv_peer_addr = (host, port)  # handshakes run one at a time on the initiator thread
        if self._hkv_geom is None:  # no state: vLLM's worker as it is (refusing TP sizes that do not divide)
            refuse_non_dividing(remote_tp_size, self.world_size, "the model has no recurrent state to pack")
        elif self._hkv_foreign(remote_tp_size):  # before any NIXL agent is added: refused here, with the reason
            self._hkv_plans.sources(remote_tp_size, self.world_size)
        return super()._nixl_handshake(host, port, remote_tp_size, expected_engine_id, *args, **kwargs)

    def add_remote_agent(
        self, nixl_agent_meta, remote_tp_rank: int = 0, remote_tp_size: int = 1, remote_dcp_size: int = 1
    ):
        key = (nixl_agent_meta.engine_id, remote_tp_rank)
        fresh = self._hkv_geom is not None and key not in self._hkv_links
        if fresh:
            if self._hkv_peer_addr is None:
                raise RuntimeError("hybrid-kv: add_remote_agent called outside a NIXL handshake")
            self._hkv_connect(key, remote_tp_size, *self._hkv_peer_addr)
        try:
            if self._hkv_foreign(remote_tp_size):
                name = self._hkv_add_foreign_agent(nixl_agent_meta, remote_tp_rank, remote_tp_size, remote_dcp_size)
            else:
                name = super().add_remote_agent(nixl_agent_meta, remote_tp_rank, remote_tp_size, remote_dcp_size)
        except BaseException:
            if fresh:
                self._hkv_links.pop(key).close()
            raise
        if fresh and self.hkv_mode == "auto":
            self._hkv_choose(key, remote_tp_size, name)
        return name

    def _hkv_choose(self, key: tuple[str, int], remote_tp: int, agent_name: str) -> None:
        """auto: decide once per prefill engine (on the handshake thread); tell each of its ranks that
        reads the stock way to stop staging for this rank."""
        link = self._hkv_links[key]
        if key[0] not in self.hkv_auto and self._hkv_foreign(remote_tp):
            self.hkv_auto[key[0]] = {"reads": "packed", "why": "TP sizes do not divide: vLLM has no descriptors"}
        if key[0] not in self.hkv_auto:
            try:
                choice = auto.choose(self, remote_tp, agent_name, link.peer["staging"])
            except Exception as e:  # packing is exact for every pair: the safe choice when unsure
                choice = {"reads": "packed", "why": f"cost model failed ({type(e).__name__}: {e})"}
            self.hkv_auto[key[0]] = choice
            log.info("hybrid-kv auto: state from engine %s read %s: %s", key[0], choice["reads"], choice["why"])
        if self.hkv_auto[key[0]]["reads"] == "stock":
            try:
                link.call({"type": M.MODE, "part": None}, M.MODE_OK)
            except Exception as e:  # the source's staged copies expire with their lease
                log.warning("hybrid-kv: could not tell prefill rank %d to stop staging: %s", key[1], e)

    # ---- each step --------------------------------------------------------------------------------------

    def start_load_kv(self, metadata) -> None:
        self._hkv_progress()
        if self._hkv_server is not None:  # before the stock worker holds them: no pack can run unfenced
            self._hkv_fence(getattr(metadata, "reqs_to_send", None) or {})
        super().start_load_kv(metadata)
        finished = getattr(metadata, "push_finished_blocks", None)
        if self._hkv_server is not None and finished and self._hkv_geom is not None:
            groups = self._hkv_geom.groups + self._hkv_geom.attn_groups  # (KV only for pairs that move it)
            todo = {}  # prefills done: pack now (one launch), before any decode rank asks
            for req_id, ids in finished.items():
                blocks = {g: list(ids[g]) for g in groups if g < len(ids) and ids[g]}
                if blocks:
                    todo[req_id] = blocks
            if todo:
                self._hkv_server.prepack(todo)

    def get_transfer_results(self):
        self._hkv_progress()
        res = super().get_transfer_results()
        if self._hkv_server is not None:
            for req_id in res.finished_sending:  # read (or expired): its staged copies can go
                self._hkv_server.forget(req_id)
        return res
