"""The prepared GPU run (bench/gpu/run.sh) as a CPU dry run: every GPU step is reported skipped by name and
its CPU smoke version passes, so the script and the benchmarks it calls cannot rot without a GPU."""

import json
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STEPS = ["kernels", "cuda-tests", "host", "vram-transfer", "memcheck"]  # the kernel first


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
    assert '"verified": true' in logs["vram-transfer"]
