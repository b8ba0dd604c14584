"""The connector tests' harness frees what it builds: a closed engine's NIXL agents are gone once collected.

vLLM's NIXL agents run UCX progress threads that poll without sleeping; one engine held past its test
costs CI's 2-core machine a core for the rest of the run (a whole CI run timed out so, 2026-12-04)."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("vllm", reason="needs the vllm extra (CI installs it)")
pytest.importorskip("nixl", reason="needs the nixl extra (CI installs it)")

# A fresh process, as the first engine of a pytest run is built: the leak this guards against (vLLM's
# audio module keeping its torchcodec ImportError's traceback, and with it the stack of whoever imported
# it first) only takes the first engine of a process.
SCRIPT = textwrap.dedent(
    """
    import gc, os, sys, weakref
    sys.path.insert(0, sys.argv[1])
    import vllm_util as U
    from pathlib import Path
    eng = U.build_engine(U.model_dir(Path(sys.argv[2]), "jamba-v0.1"), "jamba-v0.1", 1, "e")
    refs = [weakref.ref(c.connector_worker.nixl_wrapper) for c in eng.conns]
    nice = [os.getpriority(os.PRIO_PROCESS, int(t)) for t in os.listdir("/proc/self/task")]
    print("NICED", nice.count(19), "OF", len(nice))
    eng.shutdown()
    del eng
    gc.collect()
    print("ALIVE", sum(r() is not None for r in refs), "OF", len(refs))
    """
)


def test_closed_first_engine_frees_its_nixl_agents(tmp_path):
    """Also: the harness niced the agent's polling thread (quiet_nixl), and only that thread."""
    env = {"HYBRID_KV_TRANSFER": "packed", "VLLM_SSM_CONV_STATE_LAYOUT": "DS"}
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(Path(__file__).parent), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **env},
    )
    line = [ln for ln in out.stdout.splitlines() if ln.startswith("ALIVE")]
    assert out.returncode == 0 and line, out.stdout[-3000:] + out.stderr[-3000:]
    assert line[0] == "ALIVE 0 OF 1", line[0]
    niced = [ln.split() for ln in out.stdout.splitlines() if ln.startswith("NICED")]
    # the agent's UCX progress thread, and nothing else of the process (quiet_nixl)
    assert niced and niced[0][1] == "1", niced
