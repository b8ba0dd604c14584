"""Two vLLM engines on the CPU backend, prefill -> decode through HybridKVConnector (packed), against one
engine: greedy outputs must be identical, and a prefill engine with other weights must change them (so
the decode engine really continued from the transferred state rather than recomputing it)."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("vllm", reason="needs the vllm extra (CI installs it)")
pytest.importorskip("nixl", reason="needs the nixl extra (CI installs it)")
pytest.importorskip("transformers", reason="vllm brings transformers")


def test_prefill_decode_engines_match_one_engine(tmp_path):
    script = Path(__file__).with_name("e2e_pd.py")
    # own session, so that a timeout can kill the engines' processes too
    proc = subprocess.Popen(
        [sys.executable, str(script), str(tmp_path / "tiny-qwen3-next"), "--mode", "packed"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=1200)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        subprocess.run(["pkill", "-9", "-s", str(proc.pid)], check=False)  # orphans of its session

    lines = [ln for ln in out.splitlines() if ln.startswith('{"mode"')]
    assert proc.returncode == 0 and lines, err[-4000:]
    res = json.loads(lines[-1])
    assert res["remote_tp"] == [1, 1, 1]
    assert res["match"], f"P/D {res['got']} != single engine {res['want']}"
    assert res["control_differs"], "outputs did not depend on the prefill engine's state"
