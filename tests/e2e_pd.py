"""End to end on vLLM's CPU backend: prefill and decode engines (HybridKVConnector, NIXL/UCX on DRAM) on a
small Qwen3-Next-style GDN model with random weights saved as a real checkpoint (every engine loads the
same weights). Prints one JSON line per scenario (lines starting with `{"scenario"`).

    python tests/e2e_pd.py MODEL_DIR --scenarios tp1,1-2,2-1,lease,push-1-2 --out DIR
    (or prefix | spec-ngram | spec-mtp: scenarios whose engines serve with other settings run alone)

One run starts each engine once and keeps it for every scenario that uses it (`Pool`): the TP-1 packed
decode engine serves tp1, 2-1 (from a TP-2 prefill engine), the control and the late request; the TP-1
packed prefill engine serves tp1 and 1-2. An engine is shut down as soon as no later step needs it. The
single-engine references run last, in this process (`e2e_runs.reference`), after every P/D engine ended.

What makes it deterministic:
- every engine's OpenMP threads are pinned the same way (`VLLM_CPU_OMP_THREADS_BIND`, one core per rank
  from `$HKV_E2E_FIRST_CORE`): vLLM reserves cores for a connector, so a P/D engine and a plain engine
  would otherwise run different thread counts;
- token comparisons run each prompt alone on every engine (bf16 on CPU is not batch-invariant, and an
  engine core may start a step before all of a `generate` call's requests have arrived);
- each decode request is sent as soon as its prefill finished, as a P/D proxy does: a prefill engine frees
  blocks nobody asked for after vLLM's `kv_lease_duration` (30 s by default, 120 s here but for the late
  request), and only a decode engine that already holds the request renews that lease;
- the engines' NIXL progress threads (vLLM's default: on, polling without a pause) are niced by the probe
  module (`quiet_nixl`), so that they do not take CI's two cores from the engines;
- the block size is pinned (640 tokens): left to vLLM it is the CPU backend's kernel alignment times
  enough to hold a Mamba page, which came out 640 when these prompts were chosen and 384 on CI's machine
  of 2026-12-03, so the block boundaries the prompts sit on (640/641/642 tokens, the aligned
  prefix prompt) would move with the machine.
What it checks: tokens against one engine (`tp1`, `prefix`, `spec-*` on a GPU), and inside the engines,
for every request, the decode pages against the prefill pages resharded by the oracle (`pd_check`), byte
for byte. `spec-ngram` / `spec-mtp` serve every engine (P, D and, on a GPU, the reference) with
speculative decoding: n-gram (2 draft tokens) or Qwen3-Next MTP (1 draft token; the checkpoint has no MTP
weights, so every engine loads vLLM's seeded dummy weights instead). vLLM then allocates K-1+num_spec conv
rows, which both shells must move. On CPU two vLLM kernel failures limit this (see SPEC and
`e2e_runs.reference`). `prefix` serves every engine with prefix caching on (`e2e_prefix.py`). `push-1-2`
runs the push connector (`HybridKVPushConnector`: the prefill writes) at TP 1 -> 2.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import random
import socket
import time
from typing import NamedTuple

SHAPE = dict(  # small dims vLLM's CPU GDN kernels accept (head dims 128)
    num_hidden_layers=4,
    hidden_size=256,
    intermediate_size=512,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=64,
    linear_num_key_heads=2,
    linear_num_value_heads=4,
    linear_key_head_dim=128,
    linear_value_head_dim=128,
    num_experts=4,
    num_experts_per_tok=2,
    moe_intermediate_size=128,
    shared_expert_intermediate_size=128,
    vocab_size=1024,
    max_position_embeddings=4096,
)


def make_checkpoint(path: str, seed: int = 0) -> None:
    """Random weights (transformers' own init, seeded) for the trimmed Qwen3-Next preset."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from hybrid_kv.spec_hf import load_config

    _, cfg = load_config("qwen3-next-80b-a3b")
    cfg.update(SHAPE)
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path), dtype=torch.bfloat16)
    model.save_pretrained(path)


def _port() -> int:
    rng = random.Random()
    while True:  # below the ephemeral range; the hybrid-kv port of rank 0 is base + 1
        base = rng.randrange(20000, 31000)
        try:
            for p in (base, base + 1):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", p))
            return base
        except OSError:
            continue


SPEC = {
    "spec-ngram": {"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_max": 3, "prompt_lookup_min": 1},
    # On CPU, vLLM's P/D decode fails verifying its first drafts (stock path too: causal_conv1d_update_cpu
    # "num_accepted_tokens must be in [1, seqlen]"): on CPU the n-gram window is set so that these prompts
    # draft nothing (recorded as `drafts`), and the state with its speculative rows is what is checked.
    "spec-ngram-cpu": {"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_max": 4, "prompt_lookup_min": 2},
    "spec-mtp": {"method": "qwen3_next_mtp", "num_speculative_tokens": 1},
}
BLOCK = 640  # every engine's block size, pinned (it holds SHAPE's Mamba page; pd_check asserts the layout's)
# transferred tokens are prompt - 1 (vLLM's P side stops one token short for Mamba): 0, 36, one block - 1,
# exactly one block, one block + 1, several blocks
PROMPT_LENGTHS = (1, 37, BLOCK, BLOCK + 1, BLOCK + 2, 2 * BLOCK + 220)
# The scenarios, in the order one run takes them, with their transfer modes. The engines' settings must
# be the same for every scenario of a run (a "family"): prefix caching and speculative decoding differ.
SCENARIOS = {
    "tp1": ("packed", "strided"),
    "1-2": ("packed",),
    "2-1": ("packed",),
    "lease": ("packed",),
    "push-1-2": ("packed", "strided"),
    "prefix": ("packed", "strided"),
    "spec-ngram": ("packed", "strided"),
    "spec-mtp": ("packed", "strided"),
}
LATE_LEASE_S = 2  # the late request's prefill engine: vLLM's kv_lease_duration


def family(scenario: str) -> str:
    return scenario if scenario == "prefix" or scenario in SPEC else "plain"


class Key(NamedTuple):
    """One engine of a run: its role (None: a plain engine), TP size and connector settings."""

    role: str | None
    tp: int
    mode: str = "packed"
    push: bool = False
    other: bool = False  # the control checkpoint (other weights)
    lease_s: int | None = None  # vLLM's kv_lease_duration, when not the runs' 120 s


def _bind(tp: int) -> str:
    first = int(os.environ.get("HKV_E2E_FIRST_CORE", "0"))
    return "|".join(str((first + i) % os.cpu_count()) for i in range(tp))


def _log_lines(out: str, *ids: str) -> list[str]:
    lines = []
    for path in sorted(glob.glob(os.path.join(out, "log-*.txt"))):
        with open(path) as f:
            lines += [ln.strip() for ln in f if any(i and i in ln for i in ids)]
    return lines[-12:]


def engine(
    model: str,
    role: str | None,
    tp: int,
    *,
    push: bool,
    common: dict,
    extra: dict | None = None,
    mode: str | None = None,
):
    """One vLLM engine: plain (`role` None), or a P/D engine with HybridKVConnector (HybridKVPushConnector
    with `push`) plus the page recorder of `pd_probe`, on NIXL/UCX in CPU memory. `mode` sets
    `HYBRID_KV_TRANSFER` for it (the engine's processes read it at start-up)."""
    from vllm import LLM
    from vllm.config import KVTransferConfig

    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = _bind(tp)
    if mode is not None:
        os.environ["HYBRID_KV_TRANSFER"] = mode
    if role is None:
        return LLM(model=model, tensor_parallel_size=tp, **common)
    os.environ["VLLM_NIXL_SIDE_CHANNEL_PORT"] = str(_port())
    kt = KVTransferConfig(
        kv_connector="ProbePushConnector" if push else "ProbeConnector",
        kv_connector_module_path="pd_probe",
        kv_role=role,
        kv_buffer_device="cpu",
        kv_connector_extra_config={
            "hybrid_kv_staging_bytes": 64 << 20,
            "hybrid_kv_port_offset": 1,
            # the control pairs two checkpoints: vLLM's hash covers the model path, hybrid-kv's
            # own handshake still checks every dimension and dtype
            "enforce_handshake_compat": False,
            # vLLM's lease (30 s) counts from the prefill's end, and the decode engine renews it only after
            # its first handshake with the prefill engine; on CI's loaded 2-core machine that handshake
            # once took 65 s. These scenarios check bytes and tokens; the late request checks expiry.
            "kv_lease_duration": 120,
            **(extra or {}),
        },
        kv_load_failure_policy="fail",  # a failed load must fail the request, not silently recompute
    )
    return LLM(
        model=model,
        tensor_parallel_size=tp,
        kv_transfer_config=kt,
        worker_extension_cls="pd_probe.ProbeWorker",
        **common,
    )


def shutdown(llm) -> None:
    """Engine-core and worker processes must not outlive the run."""
    llm.llm_engine.engine_core.shutdown()


class Pool:
    """The engines of one run: each started on first use, shut down once no later step names it."""

    def __init__(self, model: str, common: dict) -> None:
        self.model, self.common = model, common
        self.live: dict[Key, object] = {}
        self.starts: list[tuple[str, float]] = []  # (engine, seconds to start), for the run's report

    def __call__(self, key: Key):
        if key not in self.live:
            t = time.perf_counter()
            model = self.model.rstrip("/") + "-other-weights" if key.other else self.model
            extra = {"kv_lease_duration": key.lease_s} if key.lease_s is not None else None
            self.live[key] = engine(
                model, key.role, key.tp, push=key.push, common=self.common, extra=extra, mode=key.mode
            )
            self.starts.append((_name(key), round(time.perf_counter() - t, 1)))
        return self.live[key]

    def keep(self, keys) -> None:
        keys = set(keys)
        for key in [k for k in self.live if k not in keys]:
            shutdown(self.live.pop(key))


def _name(key: Key) -> str:
    side = {"kv_consumer": "D", "kv_producer": "P", None: "plain"}[key.role]
    bits = [f"{side}{key.tp}", key.mode] + ["push"] * key.push + ["other-weights"] * key.other
    return " ".join(bits + ([f"lease {key.lease_s}s"] if key.lease_s is not None else []))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--scenarios", default="tp1", help=f"comma-separated, of one family: {', '.join(SCENARIOS)}")
    ap.add_argument("--out", required=True, help="probe records and logs")
    a = ap.parse_args()
    scenarios = a.scenarios.split(",")
    unknown = [s for s in scenarios if s not in SCENARIOS]
    if unknown or len({family(s) for s in scenarios}) != 1:
        ap.error(f"--scenarios {a.scenarios!r}: one family of {list(SCENARIOS)} (prefix and spec-* alone)")
    os.makedirs(a.out, exist_ok=True)
    here = os.path.dirname(os.path.abspath(__file__))
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (here, os.environ.get("PYTHONPATH")) if p)
    os.environ["VLLM_SSM_CONV_STATE_LAYOUT"] = "DS"
    os.environ["HKV_PROBE_DIR"] = a.out
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    for path, seed in ((a.model, 0), (a.model.rstrip("/") + "-other-weights", 1)):
        if not os.path.exists(os.path.join(path, "model.safetensors")):
            make_checkpoint(path, seed)

    import e2e_runs

    e2e_runs.main(a.model, a.out, scenarios)


if __name__ == "__main__":
    main()
