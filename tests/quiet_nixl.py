"""Test harness only: NIXL's UCX progress threads at the lowest CPU priority, on machines with few cores.

vLLM makes its NIXL agents with the UCX progress thread on, and NIXL's Python binding starts that thread
with no delay between polls, so each live agent keeps a core busy for as long as it lives. A 1 <-> 2 P/D
pair has three such agents, the in-process TP 2 <-> 4 tests six; on CI's 2 cores they left the engines a
fraction of the CPU (a first handshake once took 65 s, past vLLM's 30 s lease). Niced to 19, such a thread
still runs whenever a core is free, and the engines' configuration stays vLLM's default. Only threads that
the agent's constructor started and that are runnable in every sample are touched: a thread blocked in the
kernel (a listener, UCX's async thread) shows "S".
"""

from __future__ import annotations

import logging
import os
import time


def _tasks() -> set[str]:
    return set(os.listdir("/proc/self/task"))


def _state(tid: str) -> str:
    try:
        with open(f"/proc/self/task/{tid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except OSError:  # the thread ended
        return "X"


def _demote_spinners(before: set[str], samples: int = 40) -> list[int]:
    """Nice 19 for the threads started since `before` that never sleep; returns their ids."""
    spinning = _tasks() - before
    for _ in range(samples):
        spinning = {tid for tid in spinning if _state(tid) == "R"}  # a sleeper is out at its first "S"
        if not spinning:
            break
        time.sleep(0.005)
    out = []
    for tid in sorted(spinning):
        try:
            os.setpriority(os.PRIO_PROCESS, int(tid), 19)
            out.append(int(tid))
        except OSError:  # the thread ended
            pass
    return out


def install() -> None:
    """Wrap `nixl_agent.__init__` (once per process): every agent made afterwards gets its poller niced."""
    import nixl._api as api

    init = api.nixl_agent.__init__
    if getattr(init, "_hkv_quiet", False):
        return

    def quiet_init(self, *args, **kwargs) -> None:
        before = _tasks()
        init(self, *args, **kwargs)
        tids = _demote_spinners(before)
        logging.getLogger("vllm.hybrid_kv").info("test harness: nice 19 for NIXL's polling thread(s) %s", tids)

    quiet_init._hkv_quiet = True
    api.nixl_agent.__init__ = quiet_init
