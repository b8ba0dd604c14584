"""What a packed worker holds (`worker.hkv`): the set-up the pull and the push paths share - start-up
refusals, the staging buffer registered next to vLLM's caches, the prefill rank's side-channel server, the
decode rank's hello with each prefill rank, the pack fence, leak counts and shutdown.

What changes against vLLM's stock workers, for models with Mamba/GDN layers: the Mamba groups leave the
stock transfers, which would post 3 conv + 1 SSM descriptors per layer per block per source rank; the
state moves as one descriptor per (transfer unit, source rank) between staging buffers instead, and is
scattered into the decode pages before the request is reported received. Attention KV stays on the stock
path (each head slice of a kernel block is already one contiguous run). The NIXL compatibility hash
carries "hybrid-kv packed", so a stock peer and a packed peer refuse each other at handshake.

The worker (`HybridKVWorker`, `HybridKVPushWorker`) forwards vLLM's hooks here; `self.w` is that worker and `self.stock`
its vLLM implementation (`super()` bound to it). Every vLLM member reached through them is listed in
`hybrid_kv.vllm.surface`.
"""

from __future__ import annotations

import copy
import hashlib
import queue
from concurrent.futures import ThreadPoolExecutor

import torch
import vllm.envs as envs
from vllm.distributed.kv_transfer.kv_connector.v1.nixl.metadata import NixlHandshakePayload
from vllm.model_executor.layers.mamba import mamba_utils
from vllm.v1.kv_cache_interface import AttentionSpec, FullAttentionSpec, MambaSpec

from hybrid_kv.layout import RankLayout
from hybrid_kv.mover import log
from hybrid_kv.mover.geometry import AttentionPages, StateGeometry, attention_pages, flat_storage
from hybrid_kv.mover.link import PrefillLink, connect
from hybrid_kv.mover.plans import AnyTPPlans
from hybrid_kv.mover.receiver import Receiver
from hybrid_kv.mover.sender import Sender
from hybrid_kv.mover.server import PrefillServer
from hybrid_kv.ops import resolve_backend
from hybrid_kv.staging import messages as M
from hybrid_kv.staging.auth import load_secret
from hybrid_kv.staging.copier import Copier
from hybrid_kv.staging.cost import CAL_BYTES, copy_gbps
from hybrid_kv.staging.pool import LeasedPool
from hybrid_kv.staging.template import trim_oldest
from hybrid_kv.vllm.config import PackedConfig, refuse_unsupported, side_port
from hybrid_kv.vllm.pages import model_spec

COMPAT_TAG = "hybrid-kv-packed/1"
MAX_EXPIRED = 4096  # expired prefill-side leases remembered, to say why a late pack is refused


def without_groups(meta, groups):
    """A copy of a vLLM ReqMeta whose `groups` hold no blocks (on both sides): what the stock path moves."""
    out = copy.copy(meta)
    out.remote = copy.copy(meta.remote)
    drop = set(groups)

    def strip(ids):
        return [[] if g in drop else list(b) for g, b in enumerate(ids)]

    out.local_block_ids = strip(meta.local_block_ids)
    out.local_physical_block_ids = strip(meta.local_physical_block_ids)
    out.remote.block_ids = strip(meta.remote.block_ids)
    return out


class PackedRank:
    """Set-up, registration, hello and shutdown of a packed worker (see the module docstring)."""

    MODES: tuple[str, ...] = ("packed", "auto")

    def __init__(self, worker, stock, vllm_config, kv_cache_config, mode: str = "packed") -> None:
        if mode not in self.MODES:
            raise ValueError(
                f"{type(worker).__name__} mode {mode!r} (accepted: {', '.join(self.MODES)}; strided is vLLM's worker)"
            )
        self.w, self.stock, self.mode = worker, stock, mode
        self.cfg = PackedConfig.from_transfer_config(vllm_config.kv_transfer_config)
        self.secret = load_secret(self.cfg.secret)  # a bad secret fails before any agent exists
        refuse_unsupported(vllm_config, kv_cache_config, mode)  # before the stock worker creates its NIXL agent
        self.geom: StateGeometry | None = None
        self.plans: AnyTPPlans | None = None
        self.server: PrefillServer | None = None
        self.links: dict[tuple[str, int], PrefillLink] = {}
        self.rx: Receiver | None = None
        self.ready: queue.Queue = queue.Queue()  # (request, future of its checked units): READs to post
        self.client = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hybrid-kv-client")
        self.backend: str | None = None
        self.descriptors: dict[str, int] = {}  # state descriptors posted per request (telemetry aside)
        self.round_trips: dict[str, int] = {}  # pack replies each request waited for
        self.auto: dict[str, dict] = {}  # auto: prefill engine -> this rank's choice and its inputs
        self.copy_gbps: float | None = None
        self.cal_addr = 0
        self.staging = None  # (the registered staging, its NIXL region)
        self.desc = (0, 0, 0)
        self._reg = None
        self._expired: dict[str, None] = {}  # recently expired P-side leases, oldest first (bounded)

    # ---- registration ---------------------------------------------------------------------------------

    def register(self, kv_caches: dict[str, torch.Tensor]) -> None:
        w = self.w
        if w._has_mamba:
            # Staging must be registered before the stock registration, which snapshots this agent's
            # metadata (with every registered region) for the handshake.
            self._setup(kv_caches)
        try:
            self.stock.register_kv_caches(kv_caches)
        except BaseException:
            self._deregister()
            raise
        # Tag the compatibility hash whether or not the model has state: the peers must agree on the mode.
        w.compat_hash = hashlib.sha256(f"{w.compat_hash}|{COMPAT_TAG}".encode()).hexdigest()
        if w.xfer_handshake_metadata is not None:
            w.xfer_handshake_metadata = NixlHandshakePayload(
                compatibility_hash=w.compat_hash,
                agent_metadata_bytes=w.xfer_handshake_metadata.agent_metadata_bytes,
            )
        if self.geom is not None and w.kv_transfer_config.kv_role in ("kv_producer", "kv_both"):
            held = w._reqs_to_send, w._reqs_to_process
            copier = Copier(self.geom.storage, self.geom.pages, self.staging, "prefill", self.backend)
            sender = Sender(copier, float(self.cfg.lease_s), self.cfg.timeout_s, geometry=self.geom, plans=self.plans)
            self.server = PrefillServer(
                host=envs.VLLM_NIXL_SIDE_CHANNEL_HOST,
                port=self.port(self._local_side_port(), w.tp_rank),
                sender=sender,
                staging_desc=self.desc,
                agent_name=w.nixl_wrapper.name,
                not_held=lambda r: None if r in held[0] or r in held[1] else self._why_gone(r),
                secret=self.secret,
            )

    def reap_expired(self, done_sending: set[str]) -> None:
        before = set(done_sending)
        self.stock._reap_expired_send_leases(done_sending)
        for req in done_sending - before:  # remembered so that a late pack can say why it is refused
            self._expired[req] = None
            trim_oldest(self._expired, MAX_EXPIRED)

    def _why_gone(self, req: str) -> str:
        if req in self._expired:
            lease = self.w.vllm_config.kv_transfer_config.get_from_extra_config("kv_lease_duration", 30)
            return (
                f"its KV lease expired (kv_lease_duration={lease} s in the prefill engine's "
                "kv_connector_extra_config) before this decode rank asked for it; a decode engine renews the "
                "lease only while it holds the request, so send the decode request when the prefill ends"
            )
        return "unknown, already read, or aborted"

    def _setup(self, kv_caches: dict[str, torch.Tensor]) -> None:
        w, cfg = self.w, self.cfg
        groups_of = w.kv_cache_config.transfer_groups
        groups = [(g, list(grp.layer_names)) for g, grp in enumerate(groups_of)
                  if issubclass(w._group_spec_types[g], MambaSpec)]  # fmt: skip
        specs = w._layer_specs
        mamba = next(s for s in specs.values() if isinstance(s, MambaSpec))
        attn = next((s for s in specs.values() if isinstance(s, AttentionSpec)), None)
        spec = model_spec(w.model_config.hf_config.to_dict(), mamba, attn, name=str(w.model_config.model))
        conv_layout = "DS" if mamba_utils.is_conv_state_dim_first() else "SD"
        kv_layout = "NHD" if w.kv_cache_layout in ("NHD", "LBNHC") else "HND"
        layout = RankLayout(spec, w.world_size, w.tp_rank, conv_layout, kv_layout)
        attn_groups = [(g, list(grp.layer_names)) for g, grp in enumerate(groups_of)
                       if issubclass(w._group_spec_types[g], FullAttentionSpec)]  # fmt: skip
        block = int(w.vllm_config.cache_config.block_size)
        first = kv_caches[attn_groups[0][1][0]] if attn_groups else None
        base = flat_storage(kv_caches[groups[0][1][0]]).data_ptr()
        kernel_block = int(first.shape[2]) if first is not None and first.dim() == 4 else block
        kv_pages = attention_pages(layout, attn_groups, kv_caches, base, block, kernel_block, w.kv_cache_layout)
        attention = kv_pages if isinstance(kv_pages, AttentionPages) else None
        geom = StateGeometry(spec, layout, groups, kv_caches, specs, int(w.kv_cache_config.num_blocks), attention)
        dev = geom.storage.device
        self.plans = AnyTPPlans(spec, conv_layout, kv_layout, cfg.max_unit_bytes, block,
                                None if attention else kv_pages)  # fmt: skip
        self.backend = resolve_backend(cfg.backend, dev)
        cal = CAL_BYTES if self.mode == "auto" else 0  # outside the pool: no request's slot
        whole = torch.empty(cfg.staging_bytes + cal, dtype=torch.uint8, device=dev)
        self.staging = whole[: cfg.staging_bytes]
        copier = Copier(geom.storage, geom.pages, self.staging, "decode", self.backend)
        self.rx = Receiver(geom, self.plans, LeasedPool(cfg.staging_bytes), copier, cfg.timeout_s)
        self.desc = (whole.data_ptr(), whole.numel(), dev.index or 0)
        self.cal_addr = whole.data_ptr() + cfg.staging_bytes
        if self.mode == "auto":
            half = min(32 << 20, cfg.staging_bytes // 2)
            self.copy_gbps = cfg.copy_gbps or copy_gbps(whole[:half], whole[half : 2 * half])
        self._reg = w.nixl_wrapper.get_reg_descs([(*self.desc, "")], w.nixl_memory_type)
        w.nixl_wrapper.register_memory(self._reg, backends=w.nixl_backends)
        self.geom = geom
        log.info(
            "hybrid-kv packed state transfer: %d Mamba layers in %d groups, staging %d MiB (%s)",
            len(geom.layers),
            len(groups),
            cfg.staging_bytes >> 20,
            self.backend,
        )

    def _deregister(self) -> None:
        if self._reg is not None:
            try:
                self.w.nixl_wrapper.deregister_memory(self._reg)
            except Exception as e:
                log.warning("hybrid-kv: deregistering staging failed: %s", e)
            self._reg = None

    def _local_side_port(self) -> int:
        return side_port(envs.VLLM_NIXL_SIDE_CHANNEL_PORT, self.w.vllm_config.parallel_config.data_parallel_index)

    def port(self, nixl_side_port: int, rank: int) -> int:
        return nixl_side_port + self.cfg.port_offset * (rank + 1)

    # ---- decode side: hello with one prefill rank -----------------------------------------------------

    def connect(self, key: tuple[str, int], remote_tp: int, host: str, port: int, push: dict | None = None):
        """hello with one prefill rank (its vLLM side channel at host:port): both sides check the other's
        pages before any descriptor exists. `push`: this rank's engine id and receive staging (push mode)."""
        assert self.geom is not None and self.plans is not None and self.w.transfer_topo is not None
        w, p_rank = self.w, key[1]
        sources = self.plans.sources(remote_tp, w.world_size)  # refuses TP sizes the model cannot shard
        targets = set(w.transfer_topo.handshake_target_ranks(remote_tp, 1))
        missing = set(sources[w.tp_rank]) - targets
        if missing:
            raise ValueError(f"hybrid-kv reads state from prefill ranks {sorted(missing)} that vLLM does not handshake")
        where = (host, self.port(port, p_rank))
        try:
            link = connect(*where, self.cfg.timeout_s, self.geom.fingerprint(), (w.world_size, w.tp_rank),
                           (remote_tp, p_rank), self.secret, push)  # fmt: skip
        except BaseException as e:
            log.error("hybrid-kv: handshake with prefill rank %d of %s refused: %s", p_rank, key[0], e)
            raise
        self.links[key] = link
        return link

    # ---- prefill side ---------------------------------------------------------------------------------

    def fence(self, reqs) -> None:
        """On the engine thread: one event on its stream for the requests that became sendable this step, so
        that packs on other threads run after the step that wrote their state (with async scheduling the
        engine thread runs ahead of the device; a pack thread's current stream is not the model's). On CPU
        every step has completed when the next one starts: nothing to record."""
        if reqs and self.server is not None and self.geom.storage.is_cuda:
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(self.geom.storage.device))
            self.server.sender.fence(reqs, event)

    # ---- the decode side: a request's end --------------------------------------------------------------

    def scatter(self, landed: list[str], done: set[str], failed: set[str]) -> None:
        """One launch for the requests whose state landed (a refused one fails); those whose scatter has
        completed are retired and reported received (`done`), never before."""
        for req_id in self.rx.scatter(landed):
            self.retire(req_id)
            failed.add(req_id)
        for req_id in self.rx.scattered():
            self.retire(req_id)
            if req_id in self.w._recving_metadata:  # (not if vLLM failed it meanwhile: reported already)
                done.add(req_id)

    def retire(self, req_id: str) -> None:
        """Landed and scattered (or refused): the request's receive slots go."""
        self.rx.drop(req_id)

    def release(self, engine_id: str, req: str, ranks) -> None:
        """(client thread) tell source prefill ranks this rank is done with `req`: their staging slots (pull)
        or unused grants (push) go; if the message is lost, their lease or the grant's end frees them."""
        for p in ranks:
            link = self.links.get((engine_id, p))
            try:
                if link is not None:  # (no link: nothing was granted or staged there)
                    link.send({"type": M.RELEASE, "req": req})
            except Exception as e:
                log.warning("hybrid-kv: could not release request %s on prefill rank %d: %s", req, p, e)

    def fail(self, req_id: str, err: BaseException) -> None:
        log.error("hybrid-kv: state transfer of request %s failed: %s", req_id, err)
        self.rx.drop(req_id)
        self.w._handle_failed_transfer(req_id, None, self.w._recv_failures)

    # ---- shutdown -------------------------------------------------------------------------------------

    def leaks(self) -> dict[str, int]:
        """Counts that must be zero once every request has finished (tests check them)."""
        rx = self.rx
        return {
            "receive_slots": rx.pool.live if rx else 0,
            "staging_slots": self.server.sender.live_slots if self.server else 0,
            "receives": len(rx.recvs) if rx else 0,
            "scatters": len(rx.scattering) if rx else 0,
        }

    def close(self) -> None:
        self.client.shutdown(wait=True, cancel_futures=True)
        if self.server is not None:
            self.server.close()
            self.server = None
        for link in self.links.values():
            link.close()
        self.links.clear()
        self._deregister()
