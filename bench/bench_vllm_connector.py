"""HybridKVConnector inside vLLM 0.32: strided (stock) vs packed vs auto on the same requests, same run.

Builds a prefill and a decode engine per TP pair from vLLM's own objects (see tests/vllm_util.py: a real
model config at full layer count, vLLM's block alignment, KV cache grouping and allocation, one connector
per rank, real NIXL/UCX on DRAM), fills the prefill caches, and times requests from the decode workers'
`start_load_kv` to every decode rank reporting the request received (the step loop is driven in-process,
as vLLM's model runner would). Reports per mode: descriptors per request (NIXL's own telemetry, summed over
decode ranks, split into state and attention), bytes, p50 / p10-p90 latency and what auto chose, and
verifies every decode rank byte for byte against the oracle after the timed requests. `--rounds N` runs
the modes in turn N times (this VM's speed drifts between runs; compare rows of one round). No host-time
column: over UCX on CPU the posting thread performs the copy itself, so its CPU time is the copy's.

    python bench/bench_vllm_connector.py [--models nemotron-h-8b qwen3-next-80b-a3b] [--iters 8]
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
os.environ.setdefault("VLLM_SSM_CONV_STATE_LAYOUT", "DS")

import vllm_util as U
from bench_repack import environment

MODELS = ("nemotron-h-8b", "qwen3-next-80b-a3b")  # whole models; --block-size as in tests/vllm_util.MODELS


def one(name: str, ptp: int, dtp: int, mode: str, iters: int, tokens: int, tmp: Path) -> dict:
    os.environ["HYBRID_KV_TRANSFER"] = mode
    path = U.model_dir(tmp, name, trim=False)
    extra = {"hybrid_kv_staging_bytes": 512 << 20}
    p = U.build_engine(path, name, ptp, "prefill", blocks=4, extra=extra)
    d = U.build_engine(path, name, dtp, "decode", blocks=4, extra=extra)
    try:
        p_free, d_free = list(range(p.kcc.num_blocks)), list(range(d.kcc.num_blocks))
        random.Random(0).shuffle(p_free)
        random.Random(1).shuffle(d_free)
        reqs = [U.make_request("r0", p, d, tokens, p_free, d_free, 0)]
        for r, buf in enumerate(U.fill(p, reqs, "prefill", 3)):
            p.storage(r).copy_(buf)
        for r, buf in enumerate(U.fill(d, [], "decode", 4)):  # the background the oracle expects around
            d.storage(r).copy_(buf)
        lat, tel0 = [], None
        for it in range(iters + 1):  # the first request also pays the handshakes: not timed
            q = reqs[0]
            q.req_id = f"it{it}"
            t0 = time.perf_counter()
            U.submit(p, d, [q])
            _, failed, _ = U.run_until(p.conns, d.conns, {q.req_id}, {"p" + q.req_id}, timeout=120)
            if any(failed):
                raise RuntimeError(f"{name} {ptp}->{dtp} {mode}: request failed")
            if it:
                lat.append(time.perf_counter() - t0)

            else:
                tel0 = [len(c.connector_worker.xfer_stats.data["num_descriptors"]) for c in d.conns]
        want = U.fill(d, reqs, "decode", 4)
        exact = all(bool((d.storage(r) == want[r]).all()) for r in range(d.tp))
        desc = (
            sum(sum(c.connector_worker.xfer_stats.data["num_descriptors"][n:]) for c, n in zip(d.conns, tel0)) / iters
        )
        nbytes = (
            sum(sum(c.connector_worker.xfer_stats.data["bytes_transferred"][n:]) for c, n in zip(d.conns, tel0)) / iters
        )
        state = (
            sum(sum(v for k, v in c.connector_worker.hkv_descriptors.items() if k != "it0") for c in d.conns) / iters
            if mode != "strided"
            else None
        )
        chose = sorted({ch["reads"] for c in d.conns for ch in getattr(c.connector_worker, "hkv_auto", {}).values()})
        ms = np.array(lat) * 1e3
        return {
            "model": name,
            "pair": f"{ptp}->{dtp}",
            "mode": mode,
            "auto_chose": "/".join(chose) if mode == "auto" else None,
            "descriptors": desc,
            "state_descriptors": state,
            "bytes": nbytes,
            "p50_ms": float(np.median(ms)),
            "p10_ms": float(np.percentile(ms, 10)),
            "p90_ms": float(np.percentile(ms, 90)),
            "verified": exact,
        }
    finally:
        p.shutdown()
        d.shutdown()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=list(MODELS))
    ap.add_argument("--pairs", nargs="+", default=["1:2", "2:1", "2:4", "4:2"])
    ap.add_argument("--iters", type=int, default=8)
    ap.add_argument("--modes", nargs="+", default=["strided", "packed", "auto"])
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--out", default="bench/results/vllm_connector_cpu.txt")
    a = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in a.models:
            for pair in a.pairs:
                ptp, dtp = map(int, pair.split(":"))
                for rnd in range(a.rounds):
                    for mode in a.modes:
                        r = one(name, ptp, dtp, mode, a.iters, a.tokens, Path(tmp) / f"{name}{pair}{mode}{rnd}")
                        rows.append({**r, "round": rnd})
                        print(rows[-1], flush=True)
    env = environment("cpu")
    lines = [f"# {k}: {v}" for k, v in env.items()]
    lines.append(
        f"# HybridKVConnector, {a.tokens}-token requests, {a.iters} timed requests each (handshake excluded), "
        "descriptors/bytes = NIXL telemetry per request summed over decode ranks"
    )
    head = (
        f"{'model':<20} {'pair':<5} {'mode':<14} {'descr/req':>10} {'state':>6} {'MB/req':>8} {'p50 ms':>8} "
        f"{'p10-p90 ms':>14} ok"
    )
    lines.append(head)
    for r in rows:
        st = "-" if r["state_descriptors"] is None else f"{r['state_descriptors']:g}"
        mode = r["mode"] + (f" ({r['auto_chose']})" if r["auto_chose"] else "")
        lines.append(
            f"{r['model']:<20} {r['pair']:<5} {mode:<14} {r['descriptors']:>10g} {st:>6} "
            f"{r['bytes'] / 1e6:>8.1f} {r['p50_ms']:>8.1f} {r['p10_ms']:>6.1f}-{r['p90_ms']:<7.1f} {r['verified']}"
        )
    Path(a.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
