"""`hybrid-kv repack`: random prefill state -> pack -> move -> unpack, timed, optionally verified."""

from __future__ import annotations

import argparse
import os
import statistics

from hybrid_kv.plan import TransferPlan


def _stats(samples: list[float], nbytes: int) -> dict:
    med = statistics.median(samples)
    return {
        "median_ms": med * 1e3,
        "min_ms": min(samples) * 1e3,
        "max_ms": max(samples) * 1e3,
        "gbps": nbytes / med / 1e9 if med > 0 else 0.0,
    }


INTERPRETER_MAX_BYTES = 256 << 20  # what the Triton interpreter copies in minutes and a few GB


def run_repack(plan: TransferPlan, args: argparse.Namespace) -> dict:
    import torch

    from hybrid_kv.harness import Harness  # repack is a verification tool: the oracle fills it
    from hybrid_kv.ops import resolve_backend

    if args.requests < 0 or args.repeats < 1:
        raise ValueError(f"--requests={args.requests} must be >= 0 and --repeats={args.repeats} >= 1")
    if args.device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise RuntimeError(f"--device {args.device} but no CUDA device is available")
    backend = resolve_backend(args.backend, torch.device(args.device))
    per_request = plan.bytes_moved()
    total = per_request * args.requests
    if backend == "triton" and os.environ.get("TRITON_INTERPRET") == "1" and total > INTERPRETER_MAX_BYTES:
        raise ValueError(
            f"--backend triton runs under the Triton interpreter here (TRITON_INTERPRET=1, no GPU): "
            f"{args.requests} x {per_request / 2**20:.0f} MiB = {total / 2**20:.0f} MiB would take tens of "
            f"minutes and many GB (limit {INTERPRETER_MAX_BYTES >> 20} MiB); use --backend torch on CPU, or "
            f"fewer --requests / --tokens"
        )
    h = Harness(plan, [plan.tokens] * args.requests, seed=args.seed, device=args.device)
    # the shipped path: the staging copier both shells launch (one slot-copy launch per rank and side)
    first = h.run_staged(backend)  # warm-up (compiles the kernel) and the run that is verified
    mismatches = h.mismatches() if args.verify else []
    runs = [h.run_staged(backend) for _ in range(args.repeats)]
    moved = sum(p.bytes_moved() for p in h.batch.plans)
    st = h.staged(backend)

    def side(copiers: list, jobs: list[list], seconds: list[float]) -> dict:
        triton = any(c.backend == "triton" for c in copiers)
        return {
            "bytes": 2 * moved,
            "slots": sum(len(chunk.tpl) for js in jobs for chunk, _ in js),
            "tiles": sum(c.slot_rows(js)[1] for c, js in zip(copiers, jobs) if js) if triton else None,
            "launches": sum(bool(js) for js in jobs),
            **_stats(seconds, 2 * moved),
        }

    return {
        "model": plan.spec.name,
        "prefill_tp": plan.prefill_tp,
        "decode_tp": plan.decode_tp,
        "tokens": plan.tokens,
        "requests": args.requests,
        "backend": st["pack"][0].backend if st["pack"] else backend,
        "kernel": "slot_copy (hybrid_kv.staging.copier)",
        "device": args.device,
        "bytes_moved": moved,
        "transfer_units": len(st["moves"]),
        "pack": side(st["pack"], st["jobs_p"], [r.pack_s for r in runs]),
        "unpack": side(st["unpack"], st["jobs_d"], [r.unpack_s for r in runs]),
        "first_run_ms": (first.pack_s + first.unpack_s) * 1e3,
        "checked": bool(args.verify),
        "verified": bool(args.verify) and not mismatches,
        "mismatches": mismatches,
    }
