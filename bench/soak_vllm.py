"""Soak of hybrid-kv's vLLM connectors: real vLLM engines on the CPU backend (the end-to-end tests' small
Qwen3-Next-style checkpoint, `tests/e2e_pd.py`), many requests of mixed lengths, pull and push, packed.

For each (flow, prefill TP -> decode TP) it starts a decode and a prefill engine and sends `--requests`
requests in batches of `--concurrency` as a P/D proxy does (prefill the batch, then decode it: the decode
engine receives the whole batch at once). Prompt lengths are drawn from 1 token to several blocks (block
boundaries included). It reports completed and failed requests, throughput, the in-engine byte check of
every `--sample`-th request (`tests/pd_check.py`: the decode pages against the prefill pages resharded by
the oracle), what is still held once every request ended (hybrid-kv's slots, receives, grants; vLLM's
transfers and held requests; per rank), each engine's resident memory (all its processes) after the first
batch and at the end, and whether any engine process outlived its shutdown. A benchmark, not a test.

    python bench/soak_vllm.py [--requests 200] [--concurrency 8] [--flows pull push] [--pairs 1:2 2:1]
                              [--sample 10] [--json bench/results/soak_vllm_cpu.json]
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import psutil

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(HERE.parent / "tests"), os.environ.get("PYTHONPATH")) if p)
os.environ["VLLM_SSM_CONV_STATE_LAYOUT"] = "DS"
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ["HKV_PROBE_WHOLE"] = "0"  # concurrent receives: the check covers each request's write set

import e2e_pd as E  # noqa: E402  (after the path and the environment the engines inherit)

N_NEW = 4  # decode tokens per request
SETTLE_S = 60.0  # bound on the wait for the last notifications and leases once every request ended


def lengths(n: int, seed: int) -> list[int]:
    """Prompt lengths: a quarter on or beside block boundaries (1 token, 640 +- 1 and 1280 + 1), the rest
    uniform up to nearly three blocks (the model's 2048 tokens less the decode tokens)."""
    rng, b = random.Random(seed), E.BLOCK
    edges = [1, 2, b - 1, b, b + 1, b + 2, 2 * b + 1]
    return [rng.choice(edges) if rng.random() < 0.25 else rng.randrange(1, 2048 - N_NEW) for _ in range(n)]


def rss(procs: list[psutil.Process]) -> int:
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


def new_processes(before: set[int]) -> list[psutil.Process]:
    return [p for p in psutil.Process().children(recursive=True) if p.pid not in before]


def run_config(model: str, out: str, flow: str, ptp: int, dtp: int, n: int, conc: int, sample: int,
               mode: str = "packed") -> dict:  # fmt: skip
    from pd_check import check_request
    from vllm import SamplingParams

    push = flow == "push"
    os.environ["HYBRID_KV_TRANSFER"] = mode  # strided: vLLM's stock worker, the baseline
    common = dict(
        skip_tokenizer_init=True,
        max_model_len=2048,
        block_size=E.BLOCK,
        enforce_eager=True,
        async_scheduling=False,
        seed=0,
        max_num_seqs=max(8, conc),
        num_gpu_blocks_override=8 * max(8, conc),
    )
    procs: dict[str, list[psutil.Process]] = {}
    engines = {}
    for role, side, tp in (("kv_consumer", "decode", dtp), ("kv_producer", "prefill", ptp)):
        before = {p.pid for p in psutil.Process().children(recursive=True)}
        engines[side] = E.engine(model, role, tp, push=push, common=common)
        procs[side] = new_processes(before)
    prefill, decode = engines["prefill"], engines["decode"]

    def greedy(k: int, **extra) -> SamplingParams:
        return SamplingParams(max_tokens=k, temperature=0, detokenize=False, ignore_eos=True, extra_args=extra)

    rng = random.Random(ptp * 10 + dtp)
    lens = lengths(n, seed=ptp * 10 + dtp + (100 if push else 0))
    done, failures, checked, problems = 0, [], 0, {}
    mem: dict[str, dict[str, int]] = {}
    trajectory: list[dict] = []  # resident MiB per engine every 5 batches
    t0 = time.monotonic()
    for start in range(0, n, conc):
        batch = [[rng.randrange(1, 1000) for _ in range(k)] for k in lens[start : start + conc]]
        p_outs = prefill.generate(
            [{"prompt_token_ids": p} for p in batch],
            greedy(1, kv_transfer_params={"do_remote_decode": True}),
            use_tqdm=False,
        )
        params = [o.kv_transfer_params for o in p_outs]
        sampled = []
        for i, kv in enumerate(params):
            if sample and (start + i) % sample == 0 and kv and kv.get("remote_block_ids"):
                prefill.collective_rpc("hkv_dump", args=(out, kv["remote_request_id"], kv["remote_block_ids"]))
                sampled.append(kv["remote_request_id"])
        d_outs = decode.generate(
            [{"prompt_token_ids": p} for p in batch],
            [greedy(N_NEW, kv_transfer_params=kv) for kv in params],
            use_tqdm=False,
        )
        for p, kv, o in zip(batch, params, d_outs):
            if len(o.outputs[0].token_ids) == N_NEW:
                done += 1
            else:
                rid = (kv or {}).get("remote_request_id")
                failures.append({"prompt_tokens": len(p), "log": E._log_lines(out, rid)})
        for rid in sampled:
            try:
                bad = check_request(model, out, rid, whole_rank=False)
            except AssertionError as e:
                bad = [str(e)]
            checked += 1
            if bad:
                problems[rid] = bad[:4]
        for f in glob.glob(os.path.join(out, "*.pt")):  # the records of this batch are checked: free the disk
            os.remove(f)
        if start == 0:
            mem["first_batch"] = {side: rss(ps) for side, ps in procs.items()}
        if (start // conc) % 5 == 4:  # the trajectory tells growth that levels off from a leak
            trajectory.append({"requests": start + len(batch), **{s: rss(ps) >> 20 for s, ps in procs.items()}})
    wall = time.monotonic() - t0
    mem["end"] = {side: rss(ps) for side, ps in procs.items()}
    deadline = time.monotonic() + SETTLE_S  # the last notifications (pull) and WRITE ends (push) settle
    while True:
        state = {side: eng.collective_rpc("hkv_state") for side, eng in engines.items()}
        held = {side: [{k: v for k, v in r.items() if v and k not in ("tp_rank", "remote_agents")} for r in ranks]
                for side, ranks in state.items()}  # fmt: skip
        if not any(d for ranks in held.values() for d in ranks) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    for eng in engines.values():
        eng.llm_engine.engine_core.shutdown()
    time.sleep(2.0)
    survivors = []
    for p in (p for ps in procs.values() for p in ps):
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                survivors.append(" ".join(p.cmdline())[:120])
        except psutil.NoSuchProcess:
            pass
    return {
        "flow": flow,
        "mode": mode,
        "prefill_tp": ptp,
        "decode_tp": dtp,
        "requests": n,
        "concurrency": conc,
        "prompt_tokens": {"min": min(lens), "max": max(lens), "mean": round(sum(lens) / n, 1)},
        "completed": done,
        "failed": len(failures),
        "failures": failures[:5],
        "wall_s": round(wall, 1),
        "requests_per_s": round(done / wall, 2),
        "byte_checked": checked,
        "byte_problems": problems,
        "held_after": held,
        "agents": {side: [r["remote_agents"] for r in ranks] for side, ranks in state.items()},
        "rss_mib": {k: {s: round(v / 2**20) for s, v in m.items()} for k, m in mem.items()},
        "rss_trajectory_mib": trajectory,
        "processes_left": [c for c in survivors if "resource_tracker" not in c],
        "helpers_left": [c for c in survivors if "resource_tracker" in c],  # Python's, shared by the engines
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--flows", nargs="+", default=["pull", "push"], choices=["pull", "push"])
    ap.add_argument("--pairs", nargs="+", default=["1:2", "2:1"])
    ap.add_argument("--sample", type=int, default=10, help="byte-check every N-th request (0: none, no probe files)")
    ap.add_argument("--model-dir", default=None, help="where the checkpoint is (made if missing)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--title", default="", help="a label stored with the report")
    ap.add_argument("--mode", default="packed", choices=["packed", "strided"], help="HYBRID_KV_TRANSFER")
    a = ap.parse_args()
    work = tempfile.mkdtemp(prefix="hkv-soak-")
    model = a.model_dir or os.path.join(work, "tiny-qwen3-next")
    if not os.path.exists(os.path.join(model, "model.safetensors")):
        E.make_checkpoint(model, 0)
    out = os.path.join(work, "probe")
    if a.sample:  # the probe records only where a check will read it
        os.environ["HKV_PROBE_DIR"] = out
    os.makedirs(out, exist_ok=True)
    import torch
    import vllm

    import hybrid_kv

    rows = []
    for flow in a.flows:
        for pair in a.pairs:
            ptp, dtp = (int(x) for x in pair.split(":"))
            for f in glob.glob(os.path.join(out, "*")):
                os.remove(f)
            row = run_config(model, out, flow, ptp, dtp, a.requests, a.concurrency, a.sample, a.mode)
            rows.append(row)
            print(json.dumps(row), flush=True)
    report = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{os.cpu_count()} cores, {round(psutil.virtual_memory().total / 2**30)} GiB, no GPU",
        "versions": {"vllm": vllm.__version__, "torch": torch.__version__, "hybrid_kv": hybrid_kv.__version__},
        "title": a.title,
        "sample": a.sample,
        "rows": rows,
    }
    if a.json:
        Path(a.json).write_text(json.dumps(report, indent=1) + "\n")
    print(f"{'flow':5} {'P->D':5} {'done':>9} {'failed':>6} {'req/s':>6} {'checked':>7} {'held after':>10} "
          f"{'P MiB (1st->end)':>17} {'D MiB (1st->end)':>17} left")  # fmt: skip
    for r in rows:
        held = sum(v for ranks in r["held_after"].values() for d in ranks for v in d.values())
        m = r["rss_mib"]
        print(
            f"{r['flow']:5} {r['prefill_tp']}->{r['decode_tp']:<2} {r['completed']:>4}/{r['requests']:<4} "
            f"{r['failed']:>6} {r['requests_per_s']:>6} {r['byte_checked']:>3} ({len(r['byte_problems'])} bad) "
            f"{held:>4} {m['first_batch']['prefill']:>7}->{m['end']['prefill']:<7} "
            f"{m['first_batch']['decode']:>7}->{m['end']['decode']:<7} {len(r['processes_left'])}"
        )


if __name__ == "__main__":
    main()
