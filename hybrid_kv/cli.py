"""`hybrid-kv` command line: rich tables for people, `--json` for programs."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence

from hybrid_kv.layout import CONV_LAYOUTS, DEFAULT_BLOCK_SIZE, KV_LAYOUTS, RankLayout
from hybrid_kv.plan import DEFAULT_MAX_UNIT_BYTES, TransferPlan
from hybrid_kv.report import layout_report, plan_report
from hybrid_kv.spec_hf import list_presets, load_spec


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help=f"preset ({', '.join(list_presets())}) or config.json path")
    p.add_argument("--conv-layout", choices=CONV_LAYOUTS, default="DS", help="conv state layout (default DS)")
    p.add_argument("--kv-layout", choices=KV_LAYOUTS, default="HND", help="attention block layout (default HND)")
    p.add_argument("--conv-dtype", help="override the conv state dtype (default: model dtype)")
    p.add_argument("--ssm-dtype", help="override the SSM state dtype (default: vLLM's per-family rule)")
    p.add_argument("--num-spec", type=int, default=0, help="speculative tokens (extra conv rows)")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def _spec(args: argparse.Namespace):
    return load_spec(args.model, conv_dtype=args.conv_dtype, ssm_dtype=args.ssm_dtype, num_spec=args.num_spec)


def _plan_from_args(args: argparse.Namespace) -> TransferPlan:
    return TransferPlan.build(
        _spec(args),
        args.prefill_tp,
        args.decode_tp,
        args.tokens,
        conv_layout=args.conv_layout,
        kv_layout=args.kv_layout,
        prefill_block_size=args.prefill_block_size,
        decode_block_size=args.decode_block_size,
        max_unit_bytes=args.max_unit_bytes,
    )


def _add_plan_args(p: argparse.ArgumentParser, tokens: int) -> None:
    _add_model_args(p)
    p.add_argument("--prefill-tp", type=int, required=True)
    p.add_argument("--decode-tp", type=int, required=True)
    p.add_argument("--tokens", type=int, default=tokens, help=f"prompt tokens per request (default {tokens})")
    p.add_argument("--prefill-block-size", type=int, default=DEFAULT_BLOCK_SIZE, help="prefill --block-size")
    p.add_argument("--decode-block-size", type=int, default=DEFAULT_BLOCK_SIZE, help="decode --block-size")
    p.add_argument(
        "--max-unit-bytes", type=int, default=DEFAULT_MAX_UNIT_BYTES, help="largest transfer unit (packed mode)"
    )


def cmd_layout(args: argparse.Namespace) -> int:
    spec = _spec(args)
    layouts = [RankLayout(spec, args.tp, r, args.conv_layout, args.kv_layout, args.block_size) for r in range(args.tp)]
    report = layout_report(layouts)
    if args.plot:
        from hybrid_kv.viz import plot_page_map

        plot_page_map(layouts[0], args.plot)
    _emit(report, args.json, "layout")
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    plan = _plan_from_args(args)
    report = plan_report(plan, model=args.model)
    if args.plot:
        from hybrid_kv.viz import plot_plan

        plot_plan(plan, args.plot)
    _emit(report, args.json, "plan")
    return 0


def cmd_repack(args: argparse.Namespace) -> int:
    from hybrid_kv.repack import run_repack

    report = run_repack(_plan_from_args(args), args)
    _emit(report, args.json, "repack")
    return 0 if report.get("verified") in (True, None) else 1


def cmd_transfer(args: argparse.Namespace) -> int:
    from hybrid_kv.transport import MODES, resolve_mode
    from hybrid_kv.transport.common import SideConfig
    from hybrid_kv.transport.decode import DecodeOptions
    from hybrid_kv.transport.launch import TransferJob, run_job
    from hybrid_kv.transport.prefill import PrefillOptions

    if args.mode == "both":
        modes = ["packed", "strided"]
    elif args.mode == "all" or (args.mode is None and not os.environ.get("HYBRID_KV_TRANSFER")):
        modes = list(MODES)
    else:
        modes = [resolve_mode(args.mode)]
    side = dict(
        model=args.model,
        conv_layout=args.conv_layout,
        kv_layout=args.kv_layout,
        conv_dtype=args.conv_dtype,
        ssm_dtype=args.ssm_dtype,
        num_spec=args.num_spec,
        device=args.device,
        num_blocks=1,
    )
    job = TransferJob(
        prefill=SideConfig(tp_size=args.prefill_tp, block_size=args.prefill_block_size, **side),
        decode=SideConfig(tp_size=args.decode_tp, block_size=args.decode_block_size, **side),
        requests=args.requests,
        tokens=args.tokens,
        concurrency=args.concurrency,
        seed=args.seed,
        verify=args.verify,
        prefill_opts=PrefillOptions(host=args.host, pool_bytes=args.pool_bytes, max_unit_bytes=args.max_unit_bytes),
        decode_opts=DecodeOptions(pool_bytes=args.pool_bytes, request_timeout_s=args.timeout),
    )
    if args.requests < 1 or args.concurrency < 1:
        raise ValueError(f"--requests={args.requests} and --concurrency={args.concurrency} must be >= 1")
    _spec(args)  # a bad model or dtype fails here, before any process starts
    if args.json:
        out = run_job(job, modes)
    else:
        from rich.progress import Progress

        with Progress(transient=True) as bar:
            task = bar.add_task("transfer", total=2 + len(modes))
            out = run_job(job, modes, lambda i, n, text: bar.update(task, completed=i, description=text))
    from hybrid_kv.report import transfer_report

    report = transfer_report(out, args)
    _emit(report, args.json, "transfer")
    return 0 if (report["verified"] or not args.verify) and not report["failed_requests"] else 1


def _emit(report: dict, as_json: bool, kind: str) -> None:
    if as_json:
        json.dump(report, sys.stdout, indent=None if kind == "plan" else 2)
        sys.stdout.write("\n")
        return
    from hybrid_kv import report as rep

    getattr(rep, f"print_{kind}")(report)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="hybrid-kv", description=__doc__)
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("layout", help="page anatomy of each layer kind on each rank")
    _add_model_args(p)
    p.add_argument("--tp", type=int, required=True)
    p.add_argument("--block-size", type=int, default=DEFAULT_BLOCK_SIZE, help="vLLM --block-size (default 16)")
    p.add_argument("--plot", metavar="FILE.png", help="also draw the page map of rank 0")
    p.set_defaults(func=cmd_layout)

    p = sub.add_parser("plan", help="who reads what, for a prefill/decode TP pair")
    _add_plan_args(p, tokens=1024)
    p.add_argument("--plot", metavar="FILE.png", help="also draw the plan diagram")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("repack", help="pack -> unpack random state through the kernels and verify")
    _add_plan_args(p, tokens=1024)
    p.add_argument("--requests", type=int, default=4)
    p.add_argument("--backend", choices=("triton", "torch"), default=None)
    p.add_argument("--device", default="cpu", help="cpu | cuda")
    p.add_argument("--verify", action="store_true", help="check every decode byte against the oracle")
    p.add_argument("--repeats", type=int, default=3, help="timed repetitions (median reported)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_repack)
    p = sub.add_parser("transfer", help="P and D rank processes over NIXL: transfer, verify, time")
    _add_plan_args(p, tokens=512)
    p.add_argument("--requests", type=int, default=8)
    p.add_argument("--concurrency", type=int, default=4, help="requests in flight per decode rank")
    p.add_argument(
        "--mode",
        choices=("packed", "strided", "auto", "both", "all"),
        default=None,
        help="packed | strided | auto (cost model) | both (packed+strided) | all; "
        "default: $HYBRID_KV_TRANSFER if set, else all",
    )
    p.add_argument("--device", default="cpu", help="cpu (DRAM) | cuda (VRAM)")
    p.add_argument("--verify", action="store_true", help="check every decode byte against the oracle")
    p.add_argument("--pool-bytes", type=int, default=256 << 20, help="staging pool per rank")
    p.add_argument("--timeout", type=float, default=120.0, help="per-request deadline, seconds")
    p.add_argument("--host", default="127.0.0.1", help="side-channel address of the prefill ranks")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_transfer)
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, RuntimeError) as e:
        print(f"hybrid-kv: error: {e}", file=sys.stderr)
        return 2


__all__ = ["build_parser", "main"]

if __name__ == "__main__":
    raise SystemExit(main())
