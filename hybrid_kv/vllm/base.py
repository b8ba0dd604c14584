"""What the pull and the push packed workers share: start-up refusals, the staging buffer registered next
to vLLM's caches, the prefill rank's side-channel server, the decode rank's hello with each prefill rank,
the pack fence, leak counts and shutdown. A mixin placed before vLLM's `NixlPullConnectorWorker` or
`NixlPushConnectorWorker` in the MRO (`hybrid_kv.vllm.worker`, `hybrid_kv.vllm.push_worker`).

What changes against vLLM's stock workers, for models with Mamba/GDN layers: the Mamba groups leave the
stock transfers, which would post 3 conv + 1 SSM descriptors per layer per block per source rank; the
state moves as one descriptor per (transfer unit, source rank) between staging buffers instead, and is
scattered into the decode pages before the request is reported received. Attention KV stays on the stock
path (each head slice of a kernel block is already one contiguous run). The NIXL compatibility hash
carries "hybrid-kv packed", so a stock peer and a packed peer refuse each other at handshake.
"""

from __future__ import annotations

import dataclasses
import hashlib
import queue
from concurrent.futures import ThreadPoolExecutor

import torch
import vllm.envs as envs
from vllm.distributed.kv_transfer.kv_connector.v1 import ssm_conv_transfer_utils
from vllm.distributed.kv_transfer.kv_connector.v1.nixl import base_worker
from vllm.distributed.kv_transfer.kv_connector.v1.nixl.metadata import NixlHandshakePayload
from vllm.logger import init_logger
from vllm.model_executor.layers.mamba import mamba_utils
from vllm.platforms import current_platform
from vllm.v1.kv_cache_interface import AttentionSpec, FullAttentionSpec, MambaSpec

from hybrid_kv.layout import RankLayout
from hybrid_kv.ops import resolve_backend
from hybrid_kv.staging.auth import load_secret
from hybrid_kv.staging.copier import Copier, Done
from hybrid_kv.staging.cost import copy_gbps
from hybrid_kv.staging.pool import LeasedPool
from hybrid_kv.vllm import auto
from hybrid_kv.vllm.anytp import AnyTPPlans
from hybrid_kv.vllm.channel import PrefillServer
from hybrid_kv.vllm.config import PackedConfig, side_port
from hybrid_kv.vllm.kvpages import AttentionPages, attention_pages
from hybrid_kv.vllm.link import PrefillLink
from hybrid_kv.vllm.receive import RecvState
from hybrid_kv.vllm.state import StateGeometry, flat_storage, model_spec

# under vLLM's "vllm" logger, so that its handler prints these lines with the engine's own
log = init_logger("vllm.hybrid_kv")

COMPAT_TAG = "hybrid-kv-packed/1"


def refuse_unsupported(vllm_config, kv_cache_config, mode: str) -> None:
    """Deployments the packed state path does not handle (the stock one may): a clear start-up error."""
    has_state = any(
        isinstance(s, MambaSpec)
        for g in kv_cache_config.transfer_groups
        for s in (getattr(g.kv_cache_spec, "kv_cache_specs", {}) or {None: g.kv_cache_spec}).values()
    )
    if not has_state:
        return
    pc, kt = vllm_config.parallel_config, vllm_config.kv_transfer_config
    bad = {
        "kv_buffer_device=cpu on an accelerator (host staging)": current_platform.device_type != "cpu"
        and kt.kv_buffer_device == "cpu",
        f"decode_context_parallel_size={pc.decode_context_parallel_size}": pc.decode_context_parallel_size > 1,
        f"prefill_context_parallel_size={pc.prefill_context_parallel_size}": pc.prefill_context_parallel_size > 1,
        f"pipeline_parallel_size={pc.pipeline_parallel_size}": pc.pipeline_parallel_size > 1,
    }
    for what, hit in bad.items():
        if hit:
            raise ValueError(f"HYBRID_KV_TRANSFER={mode} does not support {what}; use HYBRID_KV_TRANSFER=strided")


class PackedWorker:
    """Set-up, registration and shutdown of a packed worker (see the module docstring)."""

    MODES: tuple[str, ...] = ("packed", "auto")

    def __init__(self, vllm_config, engine_id: str, kv_cache_config, mode: str = "packed") -> None:
        if mode not in self.MODES:
            raise ValueError(
                f"{type(self).__name__} mode {mode!r} (accepted: {', '.join(self.MODES)}; strided is vLLM's worker)"
            )
        self.hkv_mode = mode
        self.hkv = PackedConfig.from_transfer_config(vllm_config.kv_transfer_config)
        self._hkv_secret = load_secret(self.hkv.secret)  # a bad secret fails before any agent exists
        refuse_unsupported(vllm_config, kv_cache_config, mode)  # before the stock worker creates its NIXL agent
        # The stock worker asserts the DS conv layout because its 3-read needs channel-contiguous x|B|C.
        # Packing addresses each channel slice itself, so SD works too: let those asserts see DS (the stock
        # Mamba descriptors they guard are registered but never used in packed mode).
        sd = not mamba_utils.is_conv_state_dim_first()
        saved = [(m, "is_conv_state_dim_first") for m in (mamba_utils, ssm_conv_transfer_utils)]
        saved.append((base_worker, "derive_mamba_conv_split"))
        saved = [(m, name, getattr(m, name)) for m, name in saved]
        if sd:
            split = base_worker.derive_mamba_conv_split
            for m, name, _ in saved[:2]:
                setattr(m, name, lambda: True)
            # its conv split reads the (dim, rows) shape: hand it the DS view of the same state
            # (later releases add keyword parameters, e.g. 0.34's require_dim_first: passed on)
            base_worker.derive_mamba_conv_split = lambda spec, tp, *a, **k: split(
                dataclasses.replace(spec, shapes=(tuple(reversed(spec.shapes[0])), *spec.shapes[1:])), tp, *a, **k
            )
        try:
            super().__init__(vllm_config, engine_id, kv_cache_config)
        finally:
            for m, name, f in saved:
                setattr(m, name, f)
        self._hkv_geom: StateGeometry | None = None
        self._hkv_plans: AnyTPPlans | None = None
        self._hkv_server: PrefillServer | None = None
        self._hkv_links: dict[tuple[str, int], PrefillLink] = {}
        self._hkv_recv: dict[str, RecvState] = {}
        self._hkv_ready: queue.Queue = queue.Queue()
        self._hkv_client = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hybrid-kv-client")
        self._hkv_reg = None
        self._hkv_pool: LeasedPool | None = None
        self._hkv_backend: str | None = None
        self._hkv_expired: dict[str, None] = {}  # recently expired P-side leases, oldest first (bounded)
        self._hkv_copier: Copier | None = None
        self._hkv_scattering: list[tuple[Done, list[str]]] = []  # launched scatters not yet complete
        self.hkv_descriptors: dict[str, int] = {}  # state descriptors posted per request (telemetry aside)
        self.hkv_round_trips: dict[str, int] = {}  # pack replies each request waited for
        self.hkv_auto: dict[str, dict] = {}  # auto: prefill engine -> this rank's choice and its inputs
        self._hkv_copy_gbps: float | None = None
        self._hkv_cal_addr = 0

    # ---- registration ---------------------------------------------------------------------------------

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        if self._has_mamba:
            # Staging must be registered before the stock registration, which snapshots this agent's
            # metadata (with every registered region) for the handshake.
            self._hkv_setup(kv_caches)
        try:
            super().register_kv_caches(kv_caches)
        except BaseException:
            self._hkv_deregister()
            raise
        # Tag the compatibility hash whether or not the model has state: the peers must agree on the mode.
        self.compat_hash = hashlib.sha256(f"{self.compat_hash}|{COMPAT_TAG}".encode()).hexdigest()
        if self.xfer_handshake_metadata is not None:
            self.xfer_handshake_metadata = NixlHandshakePayload(
                compatibility_hash=self.compat_hash,
                agent_metadata_bytes=self.xfer_handshake_metadata.agent_metadata_bytes,
            )
        if self._hkv_geom is not None and self.kv_transfer_config.kv_role in ("kv_producer", "kv_both"):
            held = self._reqs_to_send, self._reqs_to_process
            self._hkv_server = PrefillServer(
                host=envs.VLLM_NIXL_SIDE_CHANNEL_HOST,
                port=self._hkv_port(self._local_side_port(), self.tp_rank),
                geometry=self._hkv_geom,
                plans=self._hkv_plans,
                staging=self._hkv_staging,
                staging_desc=self._hkv_desc,
                agent_name=self.nixl_wrapper.name,
                not_held=lambda r: None if r in held[0] or r in held[1] else self._hkv_why_gone(r),
                lease_s=float(self.hkv.lease_s),
                timeout_s=self.hkv.timeout_s,
                backend=self._hkv_backend,
                secret=self._hkv_secret,
            )

    def _reap_expired_send_leases(self, done_sending: set[str]) -> None:
        before = set(done_sending)
        super()._reap_expired_send_leases(done_sending)
        for req in done_sending - before:  # remembered so that a late pack can say why it is refused
            self._hkv_expired[req] = None
            while len(self._hkv_expired) > 4096:
                self._hkv_expired.pop(next(iter(self._hkv_expired)))

    def _hkv_why_gone(self, req: str) -> str:
        if req in self._hkv_expired:
            lease = self.vllm_config.kv_transfer_config.get_from_extra_config("kv_lease_duration", 30)
            return (
                f"its KV lease expired (kv_lease_duration={lease} s in the prefill engine's "
                "kv_connector_extra_config) before this decode rank asked for it; a decode engine renews the "
                "lease only while it holds the request, so send the decode request when the prefill ends"
            )
        return "unknown, already read, or aborted"

    def _hkv_setup(self, kv_caches: dict[str, torch.Tensor]) -> None:
        groups = [
            (g, list(grp.layer_names))
            for g, grp in enumerate(self.kv_cache_config.transfer_groups)
            if issubclass(self._group_spec_types[g], MambaSpec)
        ]
        specs = self._layer_specs
        mamba = next(s for s in specs.values() if isinstance(s, MambaSpec))
        attn = next((s for s in specs.values() if isinstance(s, AttentionSpec)), None)
        spec = model_spec(self.model_config.hf_config.to_dict(), mamba, attn, name=str(self.model_config.model))
        conv_layout = "DS" if mamba_utils.is_conv_state_dim_first() else "SD"
        kv_layout = "NHD" if self.kv_cache_layout in ("NHD", "LBNHC") else "HND"
        layout = RankLayout(spec, self.world_size, self.tp_rank, conv_layout, kv_layout)
        attn_groups = [
            (g, list(grp.layer_names))
            for g, grp in enumerate(self.kv_cache_config.transfer_groups)
            if issubclass(self._group_spec_types[g], FullAttentionSpec)
        ]
        block = int(self.vllm_config.cache_config.block_size)
        first = kv_caches[attn_groups[0][1][0]] if attn_groups else None
        kv_pages = attention_pages(
            layout,
            attn_groups,
            kv_caches,
            flat_storage(kv_caches[groups[0][1][0]]).data_ptr(),
            block,
            int(first.shape[2]) if first is not None and first.dim() == 4 else block,
            self.kv_cache_layout,
        )
        attention = kv_pages if isinstance(kv_pages, AttentionPages) else None
        n_blocks = int(self.kv_cache_config.num_blocks)
        geom = StateGeometry(spec, layout, groups, kv_caches, specs, n_blocks, attention)
        dev = geom.storage.device
        self._hkv_plans = AnyTPPlans(
            spec, conv_layout, kv_layout, self.hkv.max_unit_bytes, block, None if attention else kv_pages
        )
        self._hkv_backend = resolve_backend(self.hkv.backend, dev)
        cal = auto.CAL_BYTES if self.hkv_mode == "auto" else 0  # outside the pool: no request's slot
        whole = torch.empty(self.hkv.staging_bytes + cal, dtype=torch.uint8, device=dev)
        self._hkv_staging = whole[: self.hkv.staging_bytes]
        self._hkv_copier = Copier(geom.storage, geom.pages, self._hkv_staging, "decode", self._hkv_backend)
        self._hkv_pool = LeasedPool(self.hkv.staging_bytes)
        self._hkv_desc = (whole.data_ptr(), whole.numel(), dev.index or 0)
        self._hkv_cal_addr = whole.data_ptr() + self.hkv.staging_bytes
        if self.hkv_mode == "auto":
            half = min(32 << 20, self.hkv.staging_bytes // 2)
            self._hkv_copy_gbps = self.hkv.copy_gbps or copy_gbps(whole[:half], whole[half : 2 * half])
        self._hkv_reg = self.nixl_wrapper.get_reg_descs([(*self._hkv_desc, "")], self.nixl_memory_type)
        self.nixl_wrapper.register_memory(self._hkv_reg, backends=self.nixl_backends)
        self._hkv_geom = geom
        log.info(
            "hybrid-kv packed state transfer: %d Mamba layers in %d groups, staging %d MiB (%s)",
            len(geom.layers),
            len(groups),
            self.hkv.staging_bytes >> 20,
            self._hkv_backend,
        )

    def _hkv_deregister(self) -> None:
        if self._hkv_reg is not None:
            try:
                self.nixl_wrapper.deregister_memory(self._hkv_reg)
            except Exception as e:
                log.warning("hybrid-kv: deregistering staging failed: %s", e)
            self._hkv_reg = None

    def _local_side_port(self) -> int:
        return side_port(envs.VLLM_NIXL_SIDE_CHANNEL_PORT, self.vllm_config.parallel_config.data_parallel_index)

    def _hkv_port(self, nixl_side_port: int, rank: int) -> int:
        return nixl_side_port + self.hkv.port_offset * (rank + 1)

    # ---- decode side: hello with one prefill rank -----------------------------------------------------------

    def _hkv_connect(self, key: tuple[str, int], remote_tp: int, host: str, port: int, push: dict | None = None):
        """hello with one prefill rank (its vLLM side channel at host:port): both sides check the other's
        pages before any descriptor exists. `push`: this rank's engine id and receive staging (push mode)."""
        assert self._hkv_geom is not None and self._hkv_plans is not None and self.transfer_topo is not None
        p_rank = key[1]
        sources = self._hkv_plans.sources(remote_tp, self.world_size)  # refuses TP sizes the model cannot shard
        targets = set(self.transfer_topo.handshake_target_ranks(remote_tp, 1))
        missing = set(sources[self.tp_rank]) - targets
        if missing:
            raise ValueError(f"hybrid-kv reads state from prefill ranks {sorted(missing)} that vLLM does not handshake")
        link = PrefillLink(host, self._hkv_port(port, p_rank), self.hkv.timeout_s)
        try:
            fp = self._hkv_geom.fingerprint()
            peer = link.hello(fp, self.world_size, self.tp_rank, self._hkv_secret, push)
            if (peer["tp_size"], peer["tp_rank"]) != (remote_tp, p_rank):
                raise ValueError(
                    f"hybrid-kv side channel {host}:{self._hkv_port(port, p_rank)} is prefill rank "
                    f"{peer['tp_rank']}/{peer['tp_size']}, expected {p_rank}/{remote_tp}"
                )
        except BaseException as e:
            log.error("hybrid-kv: handshake with prefill rank %d of %s refused: %s", p_rank, key[0], e)
            link.close()
            raise
        self._hkv_links[key] = link
        return link

    # ---- prefill side ----------------------------------------------------------------------------------

    def _hkv_fence(self, reqs) -> None:
        """On the engine thread: one event on its stream for the requests that became sendable this step, so
        that packs on other threads run after the step that wrote their state (with async scheduling the
        engine thread runs ahead of the device; a pack thread's current stream is not the model's). On CPU
        every step has completed when the next one starts: nothing to record."""
        if reqs and self._hkv_server is not None and self._hkv_geom.storage.is_cuda:
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(self._hkv_geom.storage.device))
            self._hkv_server.fence(reqs, event)

    # ---- shutdown ---------------------------------------------------------------------------------------

    def hkv_leaks(self) -> dict[str, int]:
        """Counts that must be zero once every request has finished (tests check them)."""
        return {
            "receive_slots": self._hkv_pool.live if self._hkv_pool else 0,
            "staging_slots": self._hkv_server.live_slots if self._hkv_server else 0,
            "receives": len(self._hkv_recv),
            "scatters": len(self._hkv_scattering),
        }

    def shutdown(self) -> None:
        self._hkv_client.shutdown(wait=True, cancel_futures=True)
        if self._hkv_server is not None:
            self._hkv_server.close()
            self._hkv_server = None
        for link in self._hkv_links.values():
            link.close()
        self._hkv_links.clear()
        self._hkv_deregister()
        super().shutdown()
