"""The prepared GPU run (bench/gpu/run.sh) as a CPU dry run: every GPU step is reported skipped by name and
its CPU smoke version passes, so the script and the benchmarks it calls cannot rot without a GPU."""

import csv
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench" / "gpu"))
import ucx_proto  # noqa: E402

STEPS = ["cuda-tests", "host", "vram-transfer", "kernels", "memcheck"]  # correctness first, then #31's


def test_gpu_script_dry_run(tmp_path):
    out = subprocess.run(
        ["bash", str(ROOT / "bench/gpu/run.sh"), str(tmp_path), "--dry-run"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    summary = json.loads((tmp_path / "summary.json").read_text())
    logs = {s["name"]: (tmp_path / s["log"]).read_text()[-3000:] for s in summary["steps"]}
    assert out.returncode == 0, (out.stdout, logs)
    assert [s["name"] for s in summary["steps"]] == STEPS
    for s in summary["steps"]:
        assert s["status"] == "skipped" and s["reason"].startswith("needs gpu") and s["smoke"], s
    assert summary["env"]["device"] == "cpu (no GPU: dry run)" and summary["env"]["git"]
    assert json.loads((tmp_path / "host-cpu.json").read_text())["rows"]
    assert (tmp_path / "kernels-cpu.csv").stat().st_size > 0
    rows = list(csv.DictReader(open(tmp_path / "transfer-cpu.csv")))
    assert {(r["mode"], r["verified"]) for r in rows} == {
        ("contiguous", "False"),
        ("packed", "True"),
        ("strided", "True"),
    }
    # UCX printed its protocol tables (UCX_PROTO_INFO=y from the step's environment); on CPU memory no GPU path
    step = next(s for s in summary["steps"] if s["name"] == "vram-transfer")
    assert (tmp_path / "ucx_proto.txt").read_text().strip() and step["ucx_vram_paths"] == []
    assert step["ucx_emulation"] is False


def test_ucx_paths_of_the_h200_run_name_the_emulation():
    """The first H200 run's log (bench/results/h200): both decode ranks' VRAM READs by software emulation."""
    text = (ROOT / "bench/results/h200/transfer_verified_run3_ucx_tls.txt").read_text()
    got = ucx_proto.vram(ucx_proto.paths(text))
    want = [
        f"decode-{r} intra-node cfg#2 / remote memory read by ucp_get*(multi) into cuda/GPU0 from cuda/dev[1] "
        "| 0..inf | software emulation | tcp/lo"
        for r in ("0-7f1614b98410", "1-7fc322b985c0")
    ]
    assert got == want and ucx_proto.emulated(got)
    zcopy = [w.replace("software emulation | tcp/lo", "zero-copy | cuda_ipc/cuda") for w in want]
    assert not ucx_proto.emulated(zcopy)


def test_ucx_paths_start_a_new_table_after_rows():
    text = """[1.5] [h:1:0]   +----+
[1.5] [h:1:0]   | ep cfg#0 |
[1.5] [h:1:0]   | remote memory write by ucp_put* from cuda/GPU0 to cuda |
[1.5] [h:1:0]   | Range | Description | Config |
[1.5] [h:1:0]   | 0..inf | zero-copy | cuda_ipc/cuda |
| ep cfg#1 |
| active message by ucp_am_send* from host memory |
| 0..8 | short | tcp/lo |
"""
    assert ucx_proto.paths(text) == [
        "ep cfg#0 / remote memory write by ucp_put* from cuda/GPU0 to cuda | 0..inf | zero-copy | cuda_ipc/cuda",
        "ep cfg#1 / active message by ucp_am_send* from host memory | 0..8 | short | tcp/lo",
    ]
