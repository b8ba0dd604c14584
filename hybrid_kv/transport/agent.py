"""A thin, leak-accounted wrapper over one NIXL agent (UCX backend): registrations, remote agents,
READ requests with notifications, telemetry. Every handle it creates is tracked so that `counts()`
can prove none leaked and `close()` releases what is left."""

from __future__ import annotations

import logging
import os
import sys

import numpy as np
import torch


def _nixl():
    try:
        from nixl._api import nixl_agent, nixl_agent_config
    except ImportError as e:
        raise RuntimeError("the transport needs NIXL: pip install 'hybrid-kv[nixl]'") from e
    # NIXL's Python logger writes INFO lines to stdout, which would corrupt `--json` output: send it to
    # stderr, at WARNING unless NIXL_LOG_LEVEL asks for more.
    log = logging.getLogger("nixl")
    for h in log.handlers:
        if isinstance(h, logging.StreamHandler) and h.stream is sys.stdout:
            h.setStream(sys.stderr)
    if not os.environ.get("NIXL_LOG_LEVEL"):
        log.setLevel(logging.WARNING)
    return nixl_agent, nixl_agent_config


def mem_type(t: torch.Tensor) -> tuple[str, int]:
    """NIXL memory type and device id of a tensor's memory."""
    if t.device.type == "cuda":
        return "VRAM", t.device.index or 0
    if t.device.type == "cpu":
        return "DRAM", 0
    raise ValueError(f"device {t.device} is not supported (supported: cpu, cuda)")


class Agent:
    def __init__(self, name: str, backends: tuple[str, ...] = ("UCX",), telemetry: bool = True) -> None:
        nixl_agent, nixl_agent_config = _nixl()
        # No progress thread: our event loops poll (check_xfer_state, get_new_notifs), which drives UCX;
        # a busy progress thread per rank process oversubscribes small hosts.
        cfg = nixl_agent_config(enable_prog_thread=False, backends=list(backends), capture_telemetry=telemetry)
        self.nx = nixl_agent(name, cfg)
        if not set(backends) <= set(self.nx.backends):
            raise RuntimeError(f"NIXL backends {backends} unavailable (have {sorted(self.nx.backends)})")
        self.name = name
        self._regs: list = []
        self._remotes: set[str] = set()
        self._xfers: set = set()

    # ---- memory and peers --------------------------------------------------------------------------

    def register(self, t: torch.Tensor) -> dict:
        mem, dev = mem_type(t)
        descs = self.nx.register_memory([(t.data_ptr(), t.numel() * t.element_size(), dev, "")], mem)
        self._regs.append(descs)
        return {"addr": t.data_ptr(), "nbytes": t.numel() * t.element_size(), "mem": mem, "dev": dev}

    def metadata(self) -> bytes:
        return self.nx.get_agent_metadata()

    def add_remote(self, metadata: bytes) -> str:
        name = self.nx.add_remote_agent(metadata)
        name = name.decode() if isinstance(name, bytes) else name
        self._remotes.add(name)
        return name

    def remove_remote(self, name: str) -> None:
        if name in self._remotes:
            self._remotes.discard(name)
            self.nx.remove_remote_agent(name)

    # ---- transfers ---------------------------------------------------------------------------------

    def read(
        self, local: np.ndarray, remote: np.ndarray, remote_name: str, notif: bytes, mem: str, dev: int, remote_dev: int
    ):
        """Post one READ of `len(local)` descriptors: rows (addr, nbytes) on each side."""
        loc = np.column_stack([local[:, 0], local[:, 1], np.full(len(local), dev)]).astype(np.uint64)
        rem = np.column_stack([remote[:, 0], remote[:, 1], np.full(len(remote), remote_dev)]).astype(np.uint64)
        h = self.nx.initialize_xfer(
            "READ", self.nx.get_xfer_descs(loc, mem), self.nx.get_xfer_descs(rem, mem), remote_name, notif
        )
        self._xfers.add(h)
        state = self.nx.transfer(h)
        if state == "ERR":
            self.release(h)
            raise RuntimeError(f"NIXL refused to post a READ of {len(local)} descriptors from {remote_name}")
        return h

    def poll(self, h) -> str:
        return self.nx.check_xfer_state(h)

    def telemetry(self, h) -> dict:
        try:
            t = self.nx.get_xfer_telemetry(h)
        except Exception:  # telemetry is best effort: not every backend/handle reports it
            return {}
        return {"post_us": t.postDuration, "xfer_us": t.xferDuration, "desc_count": t.descCount, "bytes": t.totalBytes}

    def release(self, h) -> None:
        if h in self._xfers:
            self._xfers.discard(h)
            h.release()

    def notifs(self) -> dict[str, list[bytes]]:
        got = self.nx.get_new_notifs()
        return {(k.decode() if isinstance(k, bytes) else k): v for k, v in got.items()}

    # ---- accounting --------------------------------------------------------------------------------

    def counts(self) -> dict[str, int]:
        return {"registrations": len(self._regs), "remote_agents": len(self._remotes), "xfer_handles": len(self._xfers)}

    def close(self) -> None:
        for h in list(self._xfers):
            try:
                self.release(h)
            except Exception:  # a handle whose peer died may refuse release; nothing else to do
                self._xfers.discard(h)
        for name in list(self._remotes):
            self.remove_remote(name)
        for descs in self._regs:
            self.nx.deregister_memory(descs)
        self._regs.clear()
