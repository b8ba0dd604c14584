"""`hybrid-kv` command line: rich tables for people, `--json` for programs."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence

from hybrid_kv.layout import CONV_LAYOUTS, DEFAULT_BLOCK_SIZE, KV_LAYOUTS, RankLayout
from hybrid_kv.plan import DEFAULT_MAX_UNIT_BYTES, TransferPlan
from hybrid_kv.report import layout_report, plan_report
from hybrid_kv.spec_hf import list_presets, load_spec

DEFAULT_TOKENS = 1024
MAX_TOKENS = 1 << 24  # 16M tokens: far past any released context length
MAX_TP = 1024


def _int_arg(lo: int, hi: int | None = None) -> Callable[[str], int]:
    """An argparse type: an integer in [lo, hi], with a message naming the accepted range."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            try:
                f = float(text)
            except ValueError:
                raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
            if not f.is_integer():
                raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
            value = int(f)
        if value < lo or (hi is not None and value > hi):
            bound = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
            raise argparse.ArgumentTypeError(f"{text} is not {bound}")
        return value

    parse.__name__ = "integer"
    return parse


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text} must be > 0 seconds")
    return value


TP = _int_arg(1, MAX_TP)


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help=f"preset ({', '.join(list_presets())}) or config.json path")
    p.add_argument("--conv-layout", choices=CONV_LAYOUTS, default="DS", help="conv state layout (default DS)")
    p.add_argument("--kv-layout", choices=KV_LAYOUTS, default="HND", help="attention block layout (default HND)")
    p.add_argument("--conv-dtype", help="override the conv state dtype (default: model dtype)")
    p.add_argument("--ssm-dtype", help="override the SSM state dtype (default: vLLM's per-family rule)")
    p.add_argument(
        "--num-spec", type=_int_arg(0, 64), default=0, help="speculative tokens: extra conv rows (default 0)"
    )
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


def _add_plan_args(p: argparse.ArgumentParser) -> None:
    _add_model_args(p)
    p.add_argument("--prefill-tp", type=TP, required=True, help="tensor-parallel size of the prefill engine")
    p.add_argument("--decode-tp", type=TP, required=True, help="tensor-parallel size of the decode engine")
    p.add_argument(
        "--tokens",
        type=_int_arg(1, MAX_TOKENS),
        default=DEFAULT_TOKENS,
        help=f"prompt tokens per request (default {DEFAULT_TOKENS})",
    )
    block = _int_arg(1, 1 << 20)
    p.add_argument(
        "--prefill-block-size", type=block, default=DEFAULT_BLOCK_SIZE, help="prefill --block-size (default 16)"
    )
    p.add_argument(
        "--decode-block-size", type=block, default=DEFAULT_BLOCK_SIZE, help="decode --block-size (default 16)"
    )
    p.add_argument(
        "--max-unit-bytes",
        type=_int_arg(4096),
        default=DEFAULT_MAX_UNIT_BYTES,
        help=f"largest transfer unit, one descriptor (packed mode; default {DEFAULT_MAX_UNIT_BYTES >> 20} MiB)",
    )


def _viz():
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise RuntimeError("--plot needs matplotlib: pip install 'hybrid-kv[plot]'") from None
    from hybrid_kv import viz

    return viz


def cmd_layout(args: argparse.Namespace) -> int:
    spec = _spec(args)
    layouts = [RankLayout(spec, args.tp, r, args.conv_layout, args.kv_layout, args.block_size) for r in range(args.tp)]
    report = layout_report(layouts)
    if args.plot:
        _viz().plot_page_map(layouts[0], args.plot)
    _emit(report, args.json, "layout")
    if args.plot:
        print(f"wrote the page map of rank 0 to {args.plot}", file=sys.stderr)
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    plan = _plan_from_args(args)
    report = plan_report(plan, model=args.model)
    if args.plot:
        _viz().plot_plan(plan, args.plot)
    _emit(report, args.json, "plan")
    if args.plot:
        print(f"wrote the plan diagram to {args.plot}", file=sys.stderr)
    return 0


def cmd_repack(args: argparse.Namespace) -> int:
    from hybrid_kv.repack import run_repack

    report = run_repack(_plan_from_args(args), args)
    _emit(report, args.json, "repack")
    return 1 if report["checked"] and not report["verified"] else 0


def cmd_transfer(args: argparse.Namespace) -> int:
    from hybrid_kv.transport import MODES, resolve_mode
    from hybrid_kv.transport.common import SideConfig
    from hybrid_kv.transport.decode import DecodeOptions
    from hybrid_kv.transport.launch import TransferJob, available_memory, lanes_of, memory_estimate, run_job
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
        in_flight=args.in_flight or args.concurrency,
        seed=args.seed,
        verify=args.verify,
        prefill_opts=PrefillOptions(host=args.host, pool_bytes=args.pool_bytes, max_unit_bytes=args.max_unit_bytes),
        decode_opts=DecodeOptions(pool_bytes=args.pool_bytes, request_timeout_s=args.timeout),
    )
    _spec(args)  # a bad model or dtype fails here, before any process starts
    est, avail = memory_estimate(job), available_memory()
    what = (
        f"about {est['total'] / 2**30:.1f} GiB in {est['processes']} rank processes "
        f"({est['prefill_rank'] / 2**30:.2f} GiB per prefill rank, "
        f"{est['decode_rank'] / 2**30:.2f} GiB per decode rank)"
    )
    if avail is not None and est["total"] > 0.9 * avail:
        raise ValueError(
            f"this transfer needs {what}, but {avail / 2**30:.1f} GiB are available: use a smaller --in-flight "
            "or --tokens, or a smaller --pool-bytes"
        )
    if not args.json:
        print(f"memory: {what}" + ("" if avail is None else f"; {avail / 2**30:.1f} GiB available"), file=sys.stderr)
    if args.json:
        out = run_job(job, modes)
    else:
        from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

        cols = (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn())
        with Progress(*cols, transient=True) as bar:
            task = bar.add_task("transfer", total=2 + len(modes))
            out = run_job(job, modes, lambda i, n, text: bar.update(task, completed=i, description=text))
    out["memory_estimate"], out["in_flight"] = est, lanes_of(job)
    from hybrid_kv.report_transfer import transfer_report

    report = transfer_report(out, args)
    _emit(report, args.json, "transfer")
    return 0 if (report["verified"] or not args.verify) and not report["failed_requests"] else 1


def _emit(report: dict, as_json: bool, kind: str) -> None:
    if as_json:
        json.dump(report, sys.stdout, indent=None if kind == "plan" else 2)
        sys.stdout.write("\n")
        return
    from hybrid_kv import report as rep
    from hybrid_kv import report_transfer

    getattr(report_transfer if kind == "transfer" else rep, f"print_{kind}")(report)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="hybrid-kv", description=__doc__)
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("layout", help="page anatomy of each layer kind on each rank")
    _add_model_args(p)
    p.add_argument("--tp", type=TP, required=True, help="tensor-parallel size")
    p.add_argument(
        "--block-size", type=_int_arg(1, 1 << 20), default=DEFAULT_BLOCK_SIZE, help="vLLM --block-size (default 16)"
    )
    p.add_argument("--plot", metavar="FILE.png", help="also draw the page map of rank 0")
    p.set_defaults(func=cmd_layout)

    p = sub.add_parser("plan", help="who reads what, for a prefill/decode TP pair")
    _add_plan_args(p)
    p.add_argument("--plot", metavar="FILE.png", help="also draw the plan diagram")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("repack", help="pack -> unpack random state through the kernels and verify")
    _add_plan_args(p)
    p.add_argument("--requests", type=_int_arg(0, 4096), default=4, help="requests in the batch (default 4)")
    p.add_argument(
        "--backend",
        choices=("triton", "torch"),
        default=None,
        help="copy kernel (default: triton on GPU, torch on CPU; $HYBRID_KV_BACKEND)",
    )
    p.add_argument("--device", default="cpu", help="cpu | cuda")
    p.add_argument("--verify", action="store_true", help="check every decode byte against the oracle")
    p.add_argument("--repeats", type=_int_arg(1, 1000), default=3, help="timed repetitions (median reported)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random state (default 0)")
    p.set_defaults(func=cmd_repack)
    p = sub.add_parser("transfer", help="P and D rank processes over NIXL: transfer, verify, time")
    _add_plan_args(p)
    p.add_argument("--requests", type=_int_arg(1, 100_000), default=8, help="requests to move (default 8)")
    p.add_argument(
        "--concurrency", type=_int_arg(1, 4096), default=4, help="requests in flight per decode rank (default 4)"
    )
    p.add_argument(
        "--in-flight",
        type=_int_arg(1, 100_000),
        default=None,
        help="requests whose blocks each rank's cache holds at once (default: --concurrency); the run goes in "
        "waves of that many requests reusing the same blocks, so memory does not grow with --requests",
    )
    p.add_argument(
        "--mode",
        choices=("packed", "strided", "auto", "both", "all"),
        default=None,
        help="packed | strided | auto (cost model) | both (packed+strided) | all; "
        "default: $HYBRID_KV_TRANSFER if set, else all",
    )
    p.add_argument("--device", default="cpu", help="cpu (DRAM) | cuda (VRAM)")
    p.add_argument("--verify", action="store_true", help="check every decode byte against the oracle")
    p.add_argument(
        "--pool-bytes", type=_int_arg(4096), default=256 << 20, help="staging pool per rank (default 256 MiB)"
    )
    p.add_argument("--timeout", type=_seconds, default=120.0, help="per-request deadline, seconds (default 120)")
    p.add_argument("--host", default="127.0.0.1", help="side-channel address of the prefill ranks")
    p.add_argument("--seed", type=int, default=0, help="seed of the random state (default 0)")
    p.set_defaults(func=cmd_transfer)
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, RuntimeError) as e:
        print(f"hybrid-kv: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # The reader went away (`| head`): stop quietly, as Unix tools do, and keep Python's exit-time
        # flush of stdout from raising again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141  # 128 + SIGPIPE


__all__ = ["build_parser", "main"]

if __name__ == "__main__":
    raise SystemExit(main())
