"""hybrid-kv's vLLM connectors inside vLLM 0.32: pull vs push x strided (stock) vs packed (pull also auto) on
the same requests, one run.

Builds a prefill and a decode engine per TP pair from vLLM's own objects (see tests/vllm_util.py: a real
model config at full layer count, vLLM's block alignment, KV cache grouping and allocation, one connector
per rank, real NIXL/UCX on DRAM), fills the prefill caches, and times each request from the step in which
its prefill finished (the prefill workers' `start_load_kv` with it) to every decode rank reporting it
received, driving the step loop in-process as vLLM's model runners would. Pull: the decode engine learns
of the request after the prefill finished (as a P/D proxy sends it); push: the decode engine registered it
while the prefill ran (the point of push: its side of the work is done by then), so the clock starts at
the prefill's end there too. Reports per row: descriptors per request (NIXL's telemetry, both engines:
the decode posts them in pull, the prefill in push), of which hybrid-kv's state, bytes, p50 / p10-p90
latency, engine-thread CPU time per request (the driver plays every rank's engine thread: CPU time of
its connector calls in the timed window, polling included) and what auto chose; every decode rank is
verified byte for byte against the oracle after the timed requests. `--rounds N` runs the rows in turn
N times (this VM's speed drifts between runs; compare rows of one round).

    python bench/bench_vllm_connector.py [--models nemotron-h-8b] [--pairs 1:2 2:1] [--iters 8]
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

import vllm_steps as S
import vllm_util as U
from bench_repack import environment

MODELS = ("nemotron-h-8b", "qwen3-next-80b-a3b")  # whole models; --block-size as in tests/vllm_util.MODELS
ROWS = ("pull:strided", "pull:packed", "push:strided", "push:packed")


def _timed_request(p, d, q, push: bool) -> tuple[float, float]:
    """(latency s, engine-thread CPU s) of one request, from its prefill's end to every decode rank's report."""
    if push:  # the decode engine registered it while the prefill ran: registration (and grants) arrived
        for c in d.conns:
            S.step(c, S.recv_meta([q], p, d))

        def arrived(w) -> bool:
            server = getattr(w, "_hkv_server", None)
            granted = server is None or any(k[2] == q.req_id for k in server._grants)
            return granted and q.req_id in w._pending_d_registrations

        deadline = time.monotonic() + 60
        while not all(arrived(c.connector_worker) for c in p.conns):
            if time.monotonic() > deadline:
                raise TimeoutError("grants did not arrive")
            for c in (*d.conns, *p.conns):  # engine steps (they also wake vLLM's push writer threads)
                S.step(c, S.NixlConnectorMetadata())
                c.connector_worker.get_transfer_results()
            time.sleep(0.001)
    cpu0, t0 = time.thread_time(), time.perf_counter()
    for c in p.conns:
        S.step(c, S.send_meta([q]))
    if not push:
        for c in d.conns:
            S.step(c, S.recv_meta([q], p))
    _, failed, sent = S.run_until(p.conns, d.conns, {q.req_id}, set(), timeout=120)
    lat, cpu = time.perf_counter() - t0, time.thread_time() - cpu0
    if any(failed):
        raise RuntimeError(f"request {q.req_id} failed")
    if not all(S.p_id(q.req_id) in s for s in sent):  # freed on the prefill side (untimed)
        S.run_until([c for c, s in zip(p.conns, sent) if S.p_id(q.req_id) not in s], d.conns, set(),
                    {S.p_id(q.req_id)}, timeout=120)  # fmt: skip
    return lat, cpu


def _telemetry(engines, key: str) -> list[int]:
    return [sum(c.connector_worker.xfer_stats.data[key]) for e in engines for c in e.conns]


EDITS = {"heads12": U.heads12}  # (tests/vllm_util.py)


def one(name: str, ptp: int, dtp: int, row: str, iters: int, tokens: int, tmp: Path, edit: str | None = None) -> dict:
    kind, mode = row.split(":")
    push = kind == "push"
    os.environ["HYBRID_KV_TRANSFER"] = mode
    path = U.model_dir(tmp, name, EDITS[edit] if edit else None, trim=False)
    extra = {"hybrid_kv_staging_bytes": 512 << 20}
    p = U.build_engine(path, name, ptp, "prefill", blocks=4, extra=extra, push=push)
    d = U.build_engine(path, name, dtp, "decode", blocks=4, extra=extra, push=push)
    try:
        p_free, d_free = list(range(p.kcc.num_blocks)), list(range(d.kcc.num_blocks))
        random.Random(0).shuffle(p_free)
        random.Random(1).shuffle(d_free)
        q = S.make_request("r0", p, d, tokens, p_free, d_free, 0)
        for r, buf in enumerate(S.fill(p, [q], "prefill", 3)):
            p.storage(r).copy_(buf)
        for r, buf in enumerate(S.fill(d, [], "decode", 4)):  # the background the oracle expects around
            d.storage(r).copy_(buf)
        lat, cpu, state = [], [], 0
        for it in range(iters + 1):  # the first request also pays the handshakes: not timed
            q.req_id = f"it{it}"
            if it == 1:
                desc0 = sum(_telemetry((p, d), "num_descriptors"))
                bytes0 = sum(_telemetry((p, d), "bytes_transferred"))
            t, c = _timed_request(p, d, q, push)
            if it:
                lat.append(t)
                cpu.append(c)
        want = S.fill(d, [q], "decode", 4)
        exact = all(bool((d.storage(r) == want[r]).all()) for r in range(d.tp))
        desc = (sum(_telemetry((p, d), "num_descriptors")) - desc0) / iters
        nbytes = (sum(_telemetry((p, d), "bytes_transferred")) - bytes0) / iters
        if mode != "strided":
            per_req = [
                getattr(c.connector_worker, "hkv_push_descriptors" if push else "hkv_descriptors", {})
                for c in (p.conns if push else d.conns)
            ]
            state = sum(v for m in per_req for k, v in m.items() if k not in ("it0", S.p_id("it0"))) / iters
        chose = sorted({ch["reads"] for c in d.conns for ch in getattr(c.connector_worker, "hkv_auto", {}).values()})
        ms, cpu_ms = np.array(lat) * 1e3, np.array(cpu) * 1e3
        return {
            "model": name + (f"+{edit}" if edit else ""),
            "pair": f"{ptp}->{dtp}",
            "connector": kind,
            "mode": mode,
            "auto_chose": "/".join(chose) if mode == "auto" else None,
            "descriptors": desc,
            "state_descriptors": state if mode != "strided" else None,
            "bytes": nbytes,
            "p50_ms": float(np.median(ms)),
            "p10_ms": float(np.percentile(ms, 10)),
            "p90_ms": float(np.percentile(ms, 90)),
            "cpu_ms": float(np.median(cpu_ms)),
            "verified": exact,
        }
    finally:
        p.shutdown()
        d.shutdown()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=list(MODELS))
    ap.add_argument("--pairs", nargs="+", default=["1:2", "2:1"])
    ap.add_argument("--iters", type=int, default=8)
    ap.add_argument("--rows", nargs="+", default=list(ROWS), help="connector:mode, e.g. pull:auto push:packed")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--out", default="bench/results/vllm_connector_cpu.txt")
    ap.add_argument("--edit", choices=sorted(EDITS), help="a config edit (heads12: TP 2, 3, 4, 6 all shard it)")
    a = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in a.models:
            for pair in a.pairs:
                ptp, dtp = map(int, pair.split(":"))
                for rnd in range(a.rounds):
                    for row in a.rows:
                        where = Path(tmp) / f"{name}{pair}{row}{rnd}"
                        r = one(name, ptp, dtp, row, a.iters, a.tokens, where, a.edit)
                        rows.append({**r, "round": rnd})
                        print(rows[-1], flush=True)
    env = environment("cpu")
    lines = [f"# {k}: {v}" for k, v in env.items()]
    lines.append(
        f"# hybrid-kv vLLM connectors, {a.tokens}-token requests, {a.iters} timed requests each (handshakes "
        "excluded); latency from the prefill's end to every decode rank's report; descriptors/bytes = NIXL "
        "telemetry per request, both engines; cpu = engine-thread CPU time per request (all ranks, polling "
        "included)"
    )
    head = (
        f"{'model':<28} {'pair':<5} {'conn':<5} {'mode':<14} {'descr/req':>10} {'state':>6} {'MB/req':>8} "
        f"{'p50 ms':>8} {'p10-p90 ms':>14} {'cpu ms':>7} ok"
    )
    lines.append(head)
    for r in rows:
        st = "-" if r["state_descriptors"] is None else f"{r['state_descriptors']:g}"
        mode = r["mode"] + (f" ({r['auto_chose']})" if r["auto_chose"] else "")
        lines.append(
            f"{r['model']:<28} {r['pair']:<5} {r['connector']:<5} {mode:<14} {r['descriptors']:>10g} {st:>6} "
            f"{r['bytes'] / 1e6:>8.1f} {r['p50_ms']:>8.1f} {r['p10_ms']:>6.1f}-{r['p90_ms']:<7.1f} "
            f"{r['cpu_ms']:>7.1f} {r['verified']}"
        )
    Path(a.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
