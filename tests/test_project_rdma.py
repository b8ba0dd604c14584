"""bench/project_rdma.py: the projection's arithmetic on hand-built inputs, and which rows were measured."""

import csv
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import project_rdma as P

FIELDS = ["model", "prefill_tp", "decode_tp", "requests", "stage", "bytes_rw", "median_us", "variant"]


def _inputs(tmp_path: Path) -> tuple[Path, Path]:
    kernels = tmp_path / "kernels.csv"
    with open(kernels, "w", newline="") as f:
        w = csv.DictWriter(f, FIELDS)
        w.writeheader()
        q = dict(model="qwen3.5-27b", prefill_tp=2, decode_tp=4, requests=1, variant="triton")
        # moved = bytes_rw / 2: pack 1e9 B in 1000 us (1e12 B/s), unpack 1e9 B in 2000 us (5e11 B/s)
        w.writerow({**q, "stage": "pack", "bytes_rw": 2_000_000_000, "median_us": 1000})
        w.writerow({**q, "stage": "unpack", "bytes_rw": 2_000_000_000, "median_us": 2000})
        # rows the projection must ignore: other variants and batch sizes
        w.writerow({**q, "requests": 8, "stage": "pack", "bytes_rw": 2, "median_us": 1e9})
        w.writerow({**q, "variant": "roofline", "stage": "pack", "bytes_rw": 2, "median_us": 1e9})
    host = tmp_path / "host.json"
    host.write_text(json.dumps({"rows": [
        {"model": "qwen3.5-27b", "prefill_tp": 2, "decode_tp": 4, "path": "transport",
         "host_prep_us": {"prefill": 100.0, "decode": 80.0}, "stock_host_us": 50.0},
        {"model": "qwen3.5-27b", "prefill_tp": 2, "decode_tp": 4, "path": "vllm", "skipped": "no vllm"},
    ]}))  # fmt: skip
    return kernels, host


def test_busiest_decode_rank_counts_match_the_plan_table():
    # qwen3.5-27b 2->4 at 1024 tokens, 1024-token blocks: 208 strided reads vs 1 unit per decode rank
    # (tests/test_plan.py and RESULTS §3)
    nbytes, n_s, n_p = P.busiest("qwen3.5-27b", 2, 4, 1024)
    assert (n_s, n_p) == (208, 1) and round(nbytes / 1e6, 1) == 55.3


def test_projection_arithmetic_and_flags(tmp_path, monkeypatch):
    kernels, host = _inputs(tmp_path)
    monkeypatch.setattr(P, "CASES", [("qwen3.5-27b", 2, 4, 1024), ("nemotron-h-8b", 1, 2, 1024)])
    rows = P.project(kernels, host, [2.0], 400)
    q, n = rows
    nbytes, n_s, n_p = P.busiest("qwen3.5-27b", 2, 4, 1024)
    wire = nbytes / 50e9
    copy = nbytes / 1e12 + nbytes / 5e11
    assert q["strided_ms"] == pytest.approx((50e-6 + n_s * 2e-6 + wire) * 1e3)
    assert q["packed_ms"] == pytest.approx((180e-6 + n_p * 2e-6 + wire + copy) * 1e3)
    assert q["c_even_us"] == pytest.approx((180 - 50 + copy * 1e6) / (n_s - n_p))
    assert q["measured"] == ""
    assert n["measured"] == "~k~h"  # nothing measured for it: the medians (here the only row) stand in
    target = P.project(kernels, host, [2.0], 400, host_us=20.0)[0]
    assert target["packed_ms"] == pytest.approx((40e-6 + n_p * 2e-6 + wire + copy) * 1e3)
    assert target["strided_ms"] == pytest.approx(q["strided_ms"])


def test_the_shipped_gpu_files_project(capsys):
    assert P.main([]) == 0
    text = capsys.readouterr().out
    assert "PROJECTION" in text and "NIXL PR #115" in text and text.count("| qwen3.5-27b |") == 2 * 2
