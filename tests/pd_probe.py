"""Observers inside real vLLM engines, for the end-to-end P/D tests (`e2e_pd.py`). Nothing here moves a byte.

- `ProbeConnector` is `HybridKVConnector` (either `HYBRID_KV_TRANSFER` mode; `ProbePushConnector` the same
  for `HybridKVPushConnector`) plus two hooks on the decode side: when a request's load starts (metadata
  bound, before any transfer is posted) it copies the pages the transfer will write; when the worker
  reports the request received (`get_transfer_results`, before any forward step can touch its blocks) it
  copies them again, with a digest of every page of the rank. It
  also records failed loads, and keeps the connector's log lines, so a failure carries its reason.
- `ProbeWorker` (vLLM's `worker_extension_cls`) dumps a prefill rank's pages of given blocks on request
  (`LLM.collective_rpc("hkv_dump", ...)`), while the prefill engine holds them for the decode engine.

Files go to `$HKV_PROBE_DIR` as `torch.save` dicts; `pd_check.py` compares them with the oracle.
"""

from __future__ import annotations

import hashlib
import logging
import os

import quiet_nixl
import torch
from pd_check import group_ids
from vllm.v1.kv_cache_interface import MambaSpec

from hybrid_kv.vllm import HybridKVConnector, HybridKVPushConnector

LOGGERS = ("vllm.hybrid_kv", "vllm.distributed.kv_transfer")
quiet_nixl.install()  # every engine process imports this module (the connector's module path) first


def _worker():
    from vllm.distributed.kv_transfer import get_kv_transfer_group

    return get_kv_transfer_group().connector_worker


def _layers(w) -> tuple[dict[str, int], dict[str, str]]:
    """vLLM layer name -> transfer group, and -> "state" | "attn"."""
    group, kind = {}, {}
    for g, grp in enumerate(w.kv_cache_config.transfer_groups):
        for n in grp.layer_names:
            group[n] = g
            kind[n] = "state" if isinstance(w._layer_specs[n], MambaSpec) else "attn"
    return group, kind


def _span(w, name: str, block: int) -> tuple[int, int]:
    """(byte offset in the rank's backing storage, size) of one page. vLLM aliases its cache groups in one
    buffer, so pages of different layers can be the same bytes: compare pages by span, not by name."""
    t = w.device_kv_caches[name]
    nb = int(w.kv_cache_config.num_blocks)
    if t.shape[0] != nb:
        raise AssertionError(f"{name}: leading dim {t.shape[0]} is not the block dim ({nb} blocks)")
    size = t.stride(0) * t.element_size()
    return t.data_ptr() - t.untyped_storage().data_ptr() + block * size, size


def _flat(w) -> torch.Tensor:
    st = next(iter(w.device_kv_caches.values())).untyped_storage()
    return torch.empty(0, dtype=torch.uint8).set_(st, 0, (st.nbytes(),), (1,))


def _page(w, name: str, block: int) -> torch.Tensor:
    off, size = _span(w, name, block)
    return _flat(w)[off : off + size]


def write_set(w, block_ids) -> list[tuple[str, int]]:
    """(layer, block) pages a receive writes: every attention block, the last (running) state block."""
    group, kind = _layers(w)
    out = []
    for n in sorted(group):
        ids = group_ids(block_ids, group[n])
        if not ids:
            continue
        out += [(n, b) for b in ids] if kind[n] == "attn" else [(n, ids[-1])]
    return out


def snapshot(w, pages) -> dict[tuple[str, int], torch.Tensor]:
    return {(n, b): _page(w, n, b).clone() for n, b in pages}


def digests(w) -> dict[int, bytes]:
    """Page start offset -> digest, for every distinct page of the rank."""
    group, _ = _layers(w)
    nb = int(w.kv_cache_config.num_blocks)
    flat = _flat(w).numpy()
    spans = {_span(w, n, b) for n in group for b in range(nb)}
    return {off: hashlib.blake2b(flat[off : off + size].tobytes(), digest_size=16).digest() for off, size in spans}


def _meta(w) -> dict:
    from vllm.model_executor.layers.mamba import mamba_utils

    group, kind = _layers(w)
    mamba = next(s for s in w._layer_specs.values() if isinstance(s, MambaSpec))
    attn = next(s for s in w._layer_specs.values() if not isinstance(s, MambaSpec))
    return {
        "tp_rank": w.tp_rank,
        "tp_size": w.world_size,
        "group": group,
        "kind": kind,
        "block_size": int(w.block_size),
        "num_blocks": int(w.kv_cache_config.num_blocks),
        "dtypes": {"conv": str(mamba.dtypes[0]), "ssm": str(mamba.dtypes[1]), "kv": str(attn.dtype)},
        "conv_layout": "DS" if mamba_utils.is_conv_state_dim_first() else "SD",
        "conv_rows": min(mamba.shapes[0]),  # K - 1 + speculative tokens, in either conv layout
    }


class _Lines(logging.Handler):
    def __init__(self, path: str) -> None:
        super().__init__(logging.INFO)
        self.path = path

    def emit(self, record: logging.LogRecord) -> None:
        with open(self.path, "a") as f:
            f.write(f"{record.levelname} {record.name}: {record.getMessage()}\n")


class _Recorder:
    """Records what each decode-side receive wrote (see the module docstring); before a connector class."""

    def __init__(self, vllm_config, role, kv_cache_config) -> None:
        super().__init__(vllm_config, role, kv_cache_config)
        self._dir = os.environ.get("HKV_PROBE_DIR")
        # digests of every page of the rank, for the "nothing else changed" check of requests received alone
        # (HKV_PROBE_WHOLE=0: a soak of concurrent receives, whose check covers their write sets only)
        self._whole = os.environ.get("HKV_PROBE_WHOLE", "1") != "0"
        self._loads: dict[str, dict] = {}
        if self._dir and self.connector_worker is not None:
            path = os.path.join(self._dir, f"log-{vllm_config.kv_transfer_config.kv_role}-{os.getpid()}.txt")
            for name in LOGGERS:
                logging.getLogger(name).addHandler(_Lines(path))

    def bind_connector_metadata(self, connector_metadata) -> None:
        super().bind_connector_metadata(connector_metadata)
        w = self.connector_worker
        if not self._dir or w is None:
            return
        for req_id, meta in getattr(connector_metadata, "reqs_to_recv", {}).items():
            if req_id in self._loads:
                continue
            pages = write_set(w, meta.local_block_ids)
            self._loads[req_id] = {
                "remote_request_id": meta.remote.request_id,
                "local_block_ids": [list(x) for x in meta.local_block_ids],
                "remote_block_ids": [list(x) for x in meta.remote.block_ids],
                "before": snapshot(w, pages),
                "write_offsets": sorted({_span(w, n, b)[0] for n, b in pages}),
                "digests_before": digests(w) if self._whole else {},
            }

    def get_transfer_results(self, finished_req_ids):
        res = super().get_transfer_results(finished_req_ids)
        w = self.connector_worker
        if self._dir and w is not None:
            for req_id in res.finished_recving | res.failed_recving:
                rec = self._loads.pop(req_id, None)
                if rec is None:
                    continue
                failed = req_id in res.failed_recving
                rec.update(_meta(w), request_id=req_id, failed=failed)
                if not failed:
                    rec["after"] = snapshot(w, rec["before"])
                    rec["digests_after"] = digests(w) if self._whole else {}
                name = f"D{w.tp_rank}-{rec['remote_request_id']}.pt"
                torch.save(rec, os.path.join(self._dir, name + ".tmp"))
                os.replace(os.path.join(self._dir, name + ".tmp"), os.path.join(self._dir, name))
        return res


class ProbeConnector(_Recorder, HybridKVConnector):
    pass


class ProbePushConnector(_Recorder, HybridKVPushConnector):
    """(push: the registration that lets the prefill write is sent after the metadata is bound, so "before"
    is taken before any byte can land)"""


class ProbeWorker:
    """Mixed into vLLM's worker class (`worker_extension_cls`): prefill-side page dumps."""

    def hkv_dump(self, path: str, request_id: str, block_ids: list[list[int]]) -> str:
        w = _worker()
        pages = snapshot(w, write_set(w, block_ids))
        rec = {**_meta(w), "request_id": request_id, "block_ids": block_ids, "pages": pages}
        out = os.path.join(path, f"P{w.tp_rank}-{request_id}.pt")
        torch.save(rec, out)
        return out

    def hkv_state(self) -> dict:
        """What must be zero once every request ended (the soak's leak check): hybrid-kv's slots and
        requests (`hkv.leaks()`), vLLM's transfers and held requests, and the NIXL agents this rank knows."""
        w = _worker()
        return {
            "tp_rank": w.tp_rank,
            **(w.hkv.leaks() if hasattr(w, "hkv") else {}),  # (vLLM's stock worker, HYBRID_KV_TRANSFER=strided: none)
            "recving_transfers": sum(len(h) for h in w._recving_transfers.values()),
            "sending_transfers": sum(len(h) for h in getattr(w, "_sending_transfers", {}).values()),
            "reqs_to_send": len(w._reqs_to_send),
            "remote_agents": sum(len(a) for a in w._remote_agents.values()),
        }
