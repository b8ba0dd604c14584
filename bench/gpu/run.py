"""One prepared GPU run: validate the GPU path and measure it, writing CSV/JSON under OUT.

    python bench/gpu/run.py OUT [--dry-run]        (or: bash bench/gpu/run.sh OUT)

Steps, each bounded in time and recorded in OUT/summary.json (status ok | failed | skipped, reason,
seconds, files):

  env             device, driver, Python / torch / Triton / NIXL versions, git sha, date
  cuda-tests      first: the `cuda`-marked tests, the kernel natively, byte-exact against the oracle
  host            host time per request, block ids -> launch call, real launches, against the stock
                  descriptor lists of the same requests (bench/bench_host.py)
  vram-transfer   VRAM -> VRAM over NIXL between rank processes on the one GPU: contiguous, packed and
                  strided READs, p50/p99 per request, every byte of every run verified against the oracle;
                  UCX set for cuda_ipc (TRANSFER_ENV), its protocol tables saved (ucx_proto.txt) and the
                  GPU-to-GPU paths it chose, and whether any is software emulation, in the summary
  kernels         the kernel both shells launch (the staging copier's slot copy), pack / unpack bandwidth
                  against torch copy_ and an SM copy of the same bytes, 1 / 8 / 64 requests
  memcheck        one kernel test under compute-sanitizer memcheck (where it is installed)
The steps share one time budget (--budget, 480 s): a step gets at most what is left.

Without a GPU (or with --dry-run) every step that needs one is reported as skipped by name, and runs a
CPU smoke version of itself instead (tiny sizes), so that the script cannot rot: CI runs the dry run.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(Path(__file__).resolve().parent))
import ucx_proto  # noqa: E402  (this folder's module, not a package)

PY = sys.executable


def _gpu() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def _have(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


# UCX settings of the VRAM transfer: GET zero-copy over cuda_ipc is off where UCX detects no NVLink
# (UCX_CUDA_IPC_ENABLE_GET_ZCOPY=auto), and memory from PyTorch's expandable segments (VMM) cannot be exported
# without a fabric handle: either makes UCX fall back to software emulation over TCP. UCX_PROTO_INFO=y prints
# the protocol tables the step saves (ucx_proto.txt) and checks for emulation.
TRANSFER_ENV = {
    "UCX_CUDA_IPC_ENABLE_GET_ZCOPY": "y",
    "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:False",
    "UCX_PROTO_INFO": "y",
}
# issue #31: these configurations, 8192 tokens, concurrency 1 and 16 (a timeout keeps the rows so far)
TRANSFER_CASES = ",".join(
    f"{m}:{p}:{d}:8192:{c}"
    for m, p, d in [("nemotron-h-8b", 1, 2), ("qwen3.5-27b", 2, 4), ("qwen3.5-27b", 1, 8), ("falcon-h1-0.5b", 2, 4)]
    for c in (1, 16)
)


def steps(out: Path, gpu: bool) -> list[dict]:
    """(name, command on GPU, CPU smoke command, limit in seconds, what it needs, environment)."""
    kcases = "qwen3.5-27b:2:4,qwen3.5-27b:1:8,qwen3.5-397b-a17b:8:4,nemotron-h-8b:2:4,falcon-h1-0.5b:2:4"
    one = "tests/test_kernels.py::test_slot_copy_non_integer_ratios_random_ids[cuda]"
    # the kernels and the staging pool (its stream/event ordering is only real on a GPU); no vLLM there
    ctests = ["tests/test_kernels.py", "tests/test_staging.py", "tests/test_upload.py"]
    bench = [PY, "bench/bench_repack.py", "--requests", "1", "8", "64"]
    tbench = [PY, "bench/bench_transfer.py", "--verify", "--modes", "contiguous,packed,strided"]
    return [
        dict(
            name="cuda-tests",  # first: numbers of a wrong kernel are worth nothing
            needs=["gpu"],
            limit=90,
            gpu=[PY, "-m", "pytest", "-q", "-m", "cuda", *ctests, f"--junitxml={out}/cuda-tests.xml"],
            cpu=[PY, "-m", "pytest", "-q", "--co", "-m", "cuda", *ctests],
        ),
        dict(
            name="host",  # host time per request with real launches vs the stock descriptor lists
            needs=["gpu"],
            limit=90,
            gpu=[PY, "bench/bench_host.py", "--json", "--device", "cuda", "--out", f"{out}/host.json"],
            cpu=[PY, "bench/bench_host.py", "--json", "--iters", "5", "--out", f"{out}/host-cpu.json"],
        ),
        dict(
            name="vram-transfer",  # packed vs strided between rank processes, every byte verified
            needs=["gpu", "nixl"],
            limit=270,
            env=TRANSFER_ENV,
            gpu=[
                *tbench,
                "--device",
                "cuda",
                "--repeats",
                "3",
                "--csv",
                f"{out}/transfer.csv",
                "--cases",
                TRANSFER_CASES,
            ],
            cpu=[
                *tbench,
                "--device",
                "cpu",
                "--repeats",
                "1",
                "--layers",
                "2,1",
                "--cases",
                "falcon-h1-0.5b:1:2:64:1",
                "--csv",
                f"{out}/transfer-cpu.csv",
            ],
        ),
        dict(
            name="kernels",  # the copier's slot copy vs torch copy_ and an SM copy of the same bytes
            needs=["gpu"],
            limit=120,
            gpu=[*bench, "--device", "cuda", "--cases", kcases, "--csv", f"{out}/kernels.csv"],
            cpu=[
                *bench[:2],
                "--device",
                "cpu",
                "--cases",
                "qwen3.5-27b:2:4",
                "--requests",
                "1",
                "--layers",
                "2,1",
                "--repeats",
                "1",
                "--tokens",
                "64",
                "--csv",
                f"{out}/kernels-cpu.csv",
            ],
        ),
        dict(
            name="memcheck",
            needs=["gpu", "compute-sanitizer"],
            limit=90,
            gpu=[
                "compute-sanitizer",
                "--tool",
                "memcheck",
                "--error-exitcode",
                "1",
                PY,
                "-m",
                "pytest",
                "-q",
                "-m",
                "cuda",
                one,
            ],
            cpu=[PY, "-m", "pytest", "-q", "--co", one],
        ),
    ]


def env_info(gpu: bool) -> dict:
    info = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "python": sys.version.split()[0]}
    from importlib import metadata

    for dist in ("torch", "triton", "nixl", "numpy", "hybrid-kv"):
        try:
            info[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:  # a missing package is a fact to record here
            info[dist] = "not installed"
    try:
        info["git"] = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10
        ).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        info["git"] = "unknown"
    if gpu:
        import torch

        info["device"] = torch.cuda.get_device_name(0)
        info["cuda"] = torch.version.cuda
        if shutil.which("nvidia-smi"):
            q = subprocess.run(
                ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=30,
            )
            info["nvidia_smi"] = q.stdout.strip()
    else:
        info["device"] = "cpu (no GPU: dry run)"
    return info


def run_step(step: dict, gpu: bool, out: Path) -> dict:
    missing = [
        n
        for n in step["needs"]
        if (n == "gpu" and not gpu)
        or (n == "nixl" and not _have("nixl"))
        or (n not in ("gpu", "nixl") and shutil.which(n) is None)
    ]
    rec = {"name": step["name"]}
    cmd = step["cpu"] if missing else step["gpu"]
    if missing:
        rec.update(status="skipped", reason=f"needs {', '.join(missing)}", smoke=True)
    log = out / f"{step['name']}.log"
    t0 = time.monotonic()
    env = {**os.environ, **step.get("env", {})}
    try:
        with open(log, "w") as f:
            rc = subprocess.run(
                cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, timeout=step["limit"], env=env
            ).returncode
    except subprocess.TimeoutExpired:
        rc = f"timeout after {step['limit']:.0f} s"
    rec["seconds"] = round(time.monotonic() - t0, 1)
    rec["log"] = log.name
    if step.get("env", {}).get("UCX_PROTO_INFO"):
        found = ucx_proto.paths(log.read_text(errors="replace"))
        (out / "ucx_proto.txt").write_text("\n".join(found) + "\n")
        rec["ucx_vram_paths"] = ucx_proto.vram(found)
        rec["ucx_emulation"] = ucx_proto.emulated(rec["ucx_vram_paths"])
    if rc != 0:
        # a failing smoke run is a failure too: it means the GPU command has rotted
        rec.update(status="failed", reason=f"{'smoke ' if missing else ''}exit {rc} (see {log.name})")
    elif not missing:
        rec["status"] = "ok"
    return rec


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", help="folder for the CSV / JSON results and logs")
    ap.add_argument("--dry-run", action="store_true", help="treat the machine as GPU-less")
    ap.add_argument("--only", default="", help="comma list of step names")
    ap.add_argument("--budget", type=float, default=480, help="seconds for all steps together (default 480)")
    args = ap.parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    gpu = _gpu() and not args.dry_run
    if not gpu:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    summary = {"env": env_info(gpu), "steps": []}
    t_end = time.monotonic() + args.budget
    for step in steps(out, gpu):
        if args.only and step["name"] not in args.only.split(","):
            continue
        left = t_end - time.monotonic()
        if left < 10:
            rec = {
                "name": step["name"],
                "status": "skipped",
                "reason": f"out of the {args.budget:.0f} s budget",
                "seconds": 0.0,
            }
        else:
            step["limit"] = min(step["limit"], left)  # a slow step cannot push the run past the budget
            rec = run_step(step, gpu, out)
        summary["steps"].append(rec)
        print(f"{rec['name']:<14} {rec['status']:<8} {rec['seconds']:>6.1f} s  {rec.get('reason', '')}", flush=True)
        (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return 1 if any(s["status"] == "failed" for s in summary["steps"]) else 0


if __name__ == "__main__":
    raise SystemExit(main())
