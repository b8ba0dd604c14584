"""The version surface: every member of vLLM the connectors read, call, construct, override or patch, and
the three run-time patches themselves.

vLLM promises none of the NIXL worker's private members, and they change every release (issue #32). This
table is the one place that names them, with each method's parameters as vLLM 0.32.0 writes them.
`hybrid_kv.vllm.compat` checks a vLLM release's sources against it without importing them, and
`tests/test_vllm_surface.py` fails when the adapter touches a vLLM member that is not listed here, and when
a vLLM behaviour a patch relies on changes. Importable without vLLM (the checker's): the patches import it
when they run.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from hybrid_kv.mover import log
from hybrid_kv.mover.plans import divides
from hybrid_kv.vllm.compat import Owner

NIXL = "vllm.distributed.kv_transfer.kv_connector.v1.nixl"
UTILS = "vllm.distributed.kv_transfer.kv_connector.utils"
SSM_CONV = "vllm.distributed.kv_transfer.kv_connector.v1.ssm_conv_transfer_utils"
MAMBA_UTILS = "vllm.model_executor.layers.mamba.mamba_utils"


_WORKER = {  # hooks both workers override
    "__init__": "self vllm_config engine_id kv_cache_config",
    "register_kv_caches": "self kv_caches",
    "_nixl_handshake": "self host port remote_tp_size expected_engine_id remote_dcp_size remote_pp_size "
    "notif_agents_only",
    "start_load_kv": "self metadata",
    "get_transfer_results": "self",
    "_reap_expired_send_leases": "self done_sending",
    "shutdown": "self",
    "_pop_done_transfers": "self transfers",
}
_FAILED = {"_handle_failed_transfer": "self req_id handle failed_req_ids record_failed_transfer"}
_SHARED = "_group_spec_types _recv_failures _recving_transfers _remote_agents _reqs_to_process _reqs_to_send"
_SHARED += " kv_transfer_config nixl_memory_type nixl_wrapper tp_rank transfer_topo world_size xfer_stats"

SURFACE: tuple[Owner, ...] = (
    Owner(
        f"{NIXL}.pull_worker",
        "NixlPullConnectorWorker",
        override={
            **_WORKER,
            "add_remote_agent": "self nixl_agent_meta remote_tp_rank remote_tp_size remote_dcp_size",
            "_read_blocks_for_req": "self req_id meta",
        },
        call={**_FAILED, "_log_failure": "self failure_type req_id msg error meta **extra_context"},
        read=f"{_SHARED} _engine_last_active _has_mamba _invalid_remote_engines _layer_specs _recving_metadata "
        "block_size compat_hash dst_xfer_side_handles kv_cache_config kv_cache_layout kv_caches_base_addr "
        "model_config nixl_backends num_blocks vllm_config xfer_handshake_metadata",
    ),
    Owner(
        f"{NIXL}.push_worker",
        "NixlPushConnectorWorker",
        override={
            **_WORKER,
            "_get_new_notifs": "self",
            "_do_start_push_kv": "self request_id local_block_ids registration_data",
            "_xfer_blocks": "self read_spec dst_engine_id request_id remote_request_id local_xfer_side_handle "
            "remote_xfer_side_handle",
            "_xfer_blocks_for_req": "self req_id meta",
        },
        call={**_FAILED, "_as_grouped_block_ids": "block_ids"},
        read=f"{_SHARED} _deferred_push_inbox _evict_finished_inbox _handshake_lock _pending_completion_notifs "
        "_push_writer_wake _sending_transfers consumer_notification_counts_by_req engine_id use_mla",
    ),
    Owner(
        f"{NIXL}.pull_scheduler",
        "NixlPullConnectorScheduler",
        override={
            "__init__": "self vllm_config engine_id kv_cache_config",
            "request_finished": "self request block_ids",
            "build_connector_meta": "self scheduler_output",
        },
    ),
    Owner(f"{NIXL}.push_scheduler", "NixlPushConnectorScheduler"),  # subclassed, nothing overridden
    *(
        Owner(
            f"{NIXL}.connector",
            cls,
            override={"__init__": "self vllm_config role kv_cache_config"},
            read="connector_scheduler connector_worker engine_id",
        )
        for cls in ("NixlPullConnector", "NixlPushConnector")
    ),
    # the connectors call the base's constructor and skip the pull/push one's (it would build a stock worker)
    Owner(f"{NIXL}.connector", "NixlBaseConnector", call={"__init__": "self vllm_config role kv_cache_config"}),
    # vLLM >= 0.33 asks whether a connector follows sleep mode's KV-cache remap: ours say no (connector.py)
    Owner(
        "vllm.distributed.kv_transfer.kv_connector.v1.base",
        "KVConnectorBase_V1",
        override={"supports_sleep_mode": "cls kv_transfer_config"},
        since="0.33.0",
    ),
    # vLLM >= 0.34 allocates the KV cache by the connector's declared access: ours register it with NIXL and
    # export it to peers over cuda_ipc, as the stock NIXL connector does (connector.py)
    Owner(
        "vllm.distributed.kv_transfer.kv_connector.v1.base",
        "KVConnectorBase_V1",
        override={"kv_cache_access": "cls kv_transfer_config"},
        since="0.34.0",
    ),
    Owner("vllm.config.kv_transfer", "KVCacheAccess", read="IN_PROCESS REGISTERS EXPORTS_FABRIC", since="0.34.0"),
    Owner("vllm.config.kv_transfer", "KVTransferConfig", read="kv_buffer_device"),
    Owner(
        UTILS,
        "TransferTopology",
        override={"handshake_target_ranks": "self remote_tp_size remote_dcp_size"},
        call={
            "get_engine_info": "self remote_engine_id remote_pp_rank",
            "register_remote_engine": "self remote_engine_id info",
        },
        read="block_size tp_rank tp_size",
    ),
    Owner(
        UTILS,
        "EngineTransferInfo",
        fields="remote_tp_size remote_block_size remote_block_len remote_physical_blocks_per_logical remote_dcp_size",
    ),
    Owner(f"{NIXL}.metadata", "NixlHandshakePayload", fields="compatibility_hash agent_metadata_bytes"),
    Owner(
        f"{NIXL}.metadata",
        "NixlAgentMetadata",
        fields="agent_metadata block_lens block_size engine_id kv_caches_base_addr "
        "physical_blocks_per_logical_kv_block",
    ),
    Owner(f"{NIXL}.metadata", "ReqMeta", fields="local_block_ids local_physical_block_ids remote awaiting_kvs"),
    Owner(f"{NIXL}.metadata", "RemoteMeta", fields="block_ids engine_id request_id"),
    Owner(f"{NIXL}.metadata", "NixlConnectorMetadata", read="reqs_to_recv push_finished_blocks"),
    Owner(f"{NIXL}.tp_mapping", "ReadSpec", fields="remote_rank local_block_ids remote_block_ids"),
    # swapped during the stock worker's __init__ when the conv state is SD (`dim_first_view` below)
    Owner(MAMBA_UTILS, functions={"is_conv_state_dim_first": ""}),
    Owner(SSM_CONV, functions={"is_conv_state_dim_first": ""}),
    Owner(f"{NIXL}.base_worker", functions={"derive_mamba_conv_split": "mamba_spec local_tp ..."}),
    Owner("vllm.envs", env="VLLM_NIXL_SIDE_CHANNEL_HOST VLLM_NIXL_SIDE_CHANNEL_PORT"),
)

# What each method the adapter overrides or calls did in the release it was written against (0.32.0), as
# `srcindex.body_digest`: the check lists the ones a release changed, for review. The constructors in
# BYPASSED are skipped by the adapter (connector.py): a change there is a problem, not a note.
REVIEWED = {
    ("NixlPullConnectorWorker", "__init__"): "7051edee454d55fe",
    ("NixlPullConnectorWorker", "register_kv_caches"): "1bf6f7db670d57d7",
    ("NixlPullConnectorWorker", "_nixl_handshake"): "72b0c847e2d5808e",
    ("NixlPullConnectorWorker", "start_load_kv"): "260ca80cbced3714",
    ("NixlPullConnectorWorker", "get_transfer_results"): "0f74a72448583bb0",
    ("NixlPullConnectorWorker", "_reap_expired_send_leases"): "e59fb8f196d1f24a",
    ("NixlPullConnectorWorker", "shutdown"): "9e72c09d80a312c7",
    ("NixlPullConnectorWorker", "_pop_done_transfers"): "599aa9d5edcc2a56",
    ("NixlPullConnectorWorker", "add_remote_agent"): "04f97c0090fd2359",
    ("NixlPullConnectorWorker", "_read_blocks_for_req"): "e8340078c005880d",
    ("NixlPullConnectorWorker", "_handle_failed_transfer"): "c3025fddc1c4e91e",
    ("NixlPullConnectorWorker", "_log_failure"): "4c4ee1ead61944da",
    ("NixlPushConnectorWorker", "__init__"): "6ca6d997072b6470",
    ("NixlPushConnectorWorker", "register_kv_caches"): "9e433d4065172bf7",
    ("NixlPushConnectorWorker", "_nixl_handshake"): "72b0c847e2d5808e",
    ("NixlPushConnectorWorker", "start_load_kv"): "96b0d9403add3b62",
    ("NixlPushConnectorWorker", "get_transfer_results"): "fba53a99d9e53cf2",
    ("NixlPushConnectorWorker", "_reap_expired_send_leases"): "e59fb8f196d1f24a",
    ("NixlPushConnectorWorker", "shutdown"): "523faa838beffe9f",
    ("NixlPushConnectorWorker", "_pop_done_transfers"): "599aa9d5edcc2a56",
    ("NixlPushConnectorWorker", "_get_new_notifs"): "9c8051367e1b0262",
    ("NixlPushConnectorWorker", "_do_start_push_kv"): "bde1330bff1f4953",
    ("NixlPushConnectorWorker", "_xfer_blocks"): "0fd187108c9d3f3e",
    ("NixlPushConnectorWorker", "_xfer_blocks_for_req"): "96a783bc5c435b66",
    ("NixlPushConnectorWorker", "_handle_failed_transfer"): "c3025fddc1c4e91e",
    ("NixlPushConnectorWorker", "_as_grouped_block_ids"): "7261646510ce8bb7",
    ("NixlPullConnectorScheduler", "__init__"): "7051edee454d55fe",
    ("NixlPullConnectorScheduler", "request_finished"): "fab68f54414fd384",
    ("NixlPullConnectorScheduler", "build_connector_meta"): "04afbfd9321d8e94",
    ("NixlPullConnector", "__init__"): "bd8cd52f270f369a",
    ("NixlPushConnector", "__init__"): "5dfa815f6a885df5",
    ("NixlBaseConnector", "__init__"): "e8830788853218b1",
    ("TransferTopology", "handshake_target_ranks"): "b5be2e64e35ff736",
    ("TransferTopology", "get_engine_info"): "a5885e9fca42114c",
    ("TransferTopology", "register_remote_engine"): "53ff39643194441a",
}
BYPASSED = {("NixlPullConnector", "__init__"), ("NixlPushConnector", "__init__")}


# ---- the run-time patches, each with a test of the vLLM behaviour it relies on (test_vllm_surface.py) ----


@contextmanager
def dim_first_view() -> Iterator[None]:
    """Within (the stock worker's `__init__`): vLLM's asserts of the DS conv layout see DS. Its 3-read needs
    channel-contiguous x|B|C; packing addresses each channel slice itself, so SD works too (the stock Mamba
    descriptors the asserts guard are registered but never used in packed mode). Relies on vLLM looking the
    three functions up on their modules at call time."""
    from vllm.distributed.kv_transfer.kv_connector.v1 import ssm_conv_transfer_utils
    from vllm.distributed.kv_transfer.kv_connector.v1.nixl import base_worker
    from vllm.model_executor.layers.mamba import mamba_utils

    if mamba_utils.is_conv_state_dim_first():
        yield
        return
    swapped = ((mamba_utils, "is_conv_state_dim_first"), (ssm_conv_transfer_utils, "is_conv_state_dim_first"),
               (base_worker, "derive_mamba_conv_split"))  # fmt: skip
    saved = [(m, n, getattr(m, n)) for m, n in swapped]
    split = base_worker.derive_mamba_conv_split
    for m, name, _ in saved[:2]:
        setattr(m, name, lambda: True)
    # its conv split reads the (dim, rows) shape: hand it the DS view of the same state (later releases add
    # keyword parameters, e.g. 0.34's require_dim_first: passed on)
    base_worker.derive_mamba_conv_split = lambda spec, tp, *a, **k: split(
        dataclasses.replace(spec, shapes=(tuple(reversed(spec.shapes[0])), *spec.shapes[1:])), tp, *a, **k
    )
    try:
        yield
    finally:
        for m, name, f in saved:
            setattr(m, name, f)


def route_handshakes(topo, sources: Callable[[int], list[int]]) -> None:
    """After vLLM built its topology: when the TP sizes do not divide, a decode rank handshakes with the
    prefill ranks hybrid-kv's plan reads from, `sources(remote_tp)` (everything else that needs the ratio
    still asserts: only the packed worker's own paths run for such an engine). Relies on vLLM asking
    `handshake_target_ranks` of this object for its handshakes."""
    from vllm.distributed.kv_transfer.kv_connector.utils import TransferTopology

    if type(topo) is not TransferTopology:
        return

    class HybridTopology(TransferTopology):
        def handshake_target_ranks(self, remote_tp_size: int, remote_dcp_size: int = 1) -> list[int]:
            if remote_dcp_size == 1 and not divides(remote_tp_size, self.tp_size):
                return sources(remote_tp_size)
            return super().handshake_target_ranks(remote_tp_size, remote_dcp_size)

    topo.__class__ = HybridTopology


class _HeldNotifications:
    """The NIXL wrapper as vLLM's read path sees it on the engine thread: notifications are kept in `held`
    as (agent, message) instead of being attached or sent. Every other call, and any other thread's, passes
    through unchanged."""

    def __init__(self, nx, agents: dict[int, str], held: list[tuple[str, bytes]]) -> None:
        self._nx, self._agents, self._held = nx, agents, held
        self._owner = threading.get_ident()

    def make_prepped_xfer(self, op, local, local_ids, remote, remote_ids, notif_msg=b"", *args, **kwargs):
        if notif_msg and threading.get_ident() == self._owner:
            self._held.append((self._agents[remote], notif_msg))
            notif_msg = b""
        return self._nx.make_prepped_xfer(op, local, local_ids, remote, remote_ids, notif_msg, *args, **kwargs)

    def send_notif(self, agent: str, notif_msg: bytes, *args, **kwargs):
        if threading.get_ident() == self._owner:
            self._held.append((agent, notif_msg))
            return None
        return self._nx.send_notif(agent, notif_msg, *args, **kwargs)

    def __getattr__(self, name: str):
        return getattr(self._nx, name)


@contextmanager
def holding(worker, engine_id: str, held: list[tuple[str, bytes]]) -> Iterator[None]:
    """Within: `worker`'s stock READs to `engine_id` are posted without notifications, which land in `held`.

    A prefill rank frees a request's blocks, and with them its staged state, when its decode consumers have
    notified it. vLLM attaches the notification to its own READ (attention KV), or sends it at once when a
    source has no blocks of its own to give; either can reach the prefill rank while the state READs from its
    staging are still in flight, and a slot freed then can be packed over by the next request. So the stock
    READ goes out without it, and `send_held` sends it once every READ of the request has completed. Relies on
    vLLM posting through `make_prepped_xfer` / `send_notif` of `worker.nixl_wrapper`."""
    nx = worker.nixl_wrapper
    agents = {h: worker._remote_agents[engine_id][(0, r)] for r, h in worker.dst_xfer_side_handles[engine_id].items()}
    worker.nixl_wrapper = _HeldNotifications(nx, agents, held)
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
