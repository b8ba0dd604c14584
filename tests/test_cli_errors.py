"""Mistakes a user or a careless caller makes: each ends as a clean refusal (exit code and a message that
names the value and what is accepted), within seconds and bounded memory; never a traceback."""

import copy
import json
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from hybrid_kv import ops
from hybrid_kv.cli import main
from hybrid_kv.plan import TransferPlan
from hybrid_kv.spec_hf import load_config, load_spec

P = ["--prefill-tp", "2", "--decode-tp", "4"]


@pytest.mark.parametrize(
    "argv,msg",
    [
        (["layout", "--model", "qwen3.5-27b", "--tp", "0"], "argument --tp: 0 is not in [1, 1024]"),
        (["layout", "--model", "qwen3.5-27b", "--tp", "-1"], "argument --tp: -1 is not in [1, 1024]"),
        (["layout", "--model", "qwen3.5-27b", "--tp", "two"], "argument --tp: 'two' is not an integer"),
        (["plan", "--model", "qwen3.5-27b", *P, "--num-spec", "-5"], "argument --num-spec: -5 is not in [0, 64]"),
        (["plan", "--model", "qwen3.5-27b", *P, "--tokens", "1e12"], "--tokens: 1e12 is not in [1, 16777216]"),
        (["plan", "--model", "qwen3.5-27b", *P, "--max-unit-bytes", "16"], "--max-unit-bytes: 16 is not >= 4096"),
        (["transfer", "--model", "qwen3.5-27b", *P, "--requests", "0"], "--requests: 0 is not in [1, 100000]"),
        (["transfer", "--model", "qwen3.5-27b", *P, "--timeout", "0"], "--timeout: 0 must be > 0 seconds"),
        (["transfer", "--model", "qwen3.5-27b", *P, "--in-flight", "0"], "--in-flight: 0 is not in [1, 100000]"),
    ],
)
def test_argument_refusals(argv, msg, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    assert msg in capsys.readouterr().err


@pytest.mark.parametrize(
    "model,tp,msg",
    [
        (
            "falcon-h1-0.5b",
            "6",
            "tp=6 does not divide num_attention_heads=8; TP sizes that work for falcon-h1-0.5b: 1, 2, 4, 8",
        ),
        ("falcon-h1-0.5b", "12", "tp=12 does not divide num_attention_heads=8"),
        ("qwen3.5-27b", "3", "tp=3 does not divide GDN num_k_heads=16"),
    ],
)
def test_tp_the_model_cannot_shard_at(model, tp, msg, capsys):
    for argv in (
        ["plan", "--model", model, "--prefill-tp", "1", "--decode-tp", tp],
        ["plan", "--model", model, "--prefill-tp", tp, "--decode-tp", "1"],
    ):  # both sides
        assert main(argv) == 2
        assert msg in capsys.readouterr().err


def _edit(name, f):
    _, cfg = load_config(name)
    cfg = copy.deepcopy(cfg)
    f(cfg)
    return cfg


CONFIGS = [
    (
        _edit("qwen3.5-27b", lambda c: c["text_config"].update(num_attention_heads=0)),
        "num_attention_heads=0 is outside the accepted range [1, 1048576]",
    ),
    (
        _edit("qwen3.5-27b", lambda c: c["text_config"].update(num_attention_heads=[24])),
        "num_attention_heads=[24] must be an integer (got list)",
    ),
    ([1, 2], "must be a JSON object, got list"),
    (None, "must be a JSON object, got NoneType"),
    (
        _edit("nemotron-h-8b", lambda c: c.update(architectures="NemotronHForCausalLM")),
        "architectures must be a list of names, got the string 'NemotronHForCausalLM'",
    ),
    (_edit("nemotron-h-8b", lambda c: c.update(mamba_head_dim=0)), "mamba_head_dim=0 is outside the accepted range"),
    (_edit("nemotron-h-8b", lambda c: c.update(mamba_head_dim=-64)), "mamba_head_dim=-64 is outside the accepted"),
    (_edit("jamba-v0.1", lambda c: c.update(mamba_d_state=0)), "mamba_d_state=0 is outside the accepted range"),
    (
        _edit("jamba-v0.1", lambda c: c.update(num_hidden_layers=1e8)),
        "num_hidden_layers=100000000 is outside the accepted range [1, 4096]",
    ),
    (
        _edit("nemotron-h-8b", lambda c: c.update(hybrid_override_pattern="M-" * 5_000_000)),
        "hybrid_override_pattern has 10000000 layers; at most 4096 are accepted",
    ),
]


@pytest.mark.parametrize("cfg,msg", CONFIGS)
def test_bad_configs(cfg, msg, tmp_path, capsys):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    t0 = time.monotonic()
    assert main(["layout", "--model", str(path), "--tp", "1"]) == 2
    assert msg in capsys.readouterr().err
    assert time.monotonic() - t0 < 30  # a refusal, not a long computation


def test_oversized_plans_refused_before_allocating():
    spec = load_spec("qwen3.5-27b")
    with pytest.raises(ValueError, match=r"tokens=1000000000000: .* over the limit of 1,000,000; at most about"):
        TransferPlan.build(spec, 2, 4, 10**12)
    with pytest.raises(ValueError, match=r"max_unit_bytes=16 would cut this plan .* use at least"):
        TransferPlan.build(spec, 2, 4, 1024, max_unit_bytes=16)


def test_broken_pipe_exits_quietly():
    out = subprocess.run(
        f"{sys.executable} -m hybrid_kv.cli plan --model qwen3.5-27b --prefill-tp 2 --decode-tp 4 --json | head -c 600",
        shell=True,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert len(out.stdout) == 600 and out.stderr == "", out.stderr[-2000:]


def test_plot_without_matplotlib_names_the_extra(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # what a missing package looks like to import
    assert main(["layout", "--model", "jamba-v0.1", "--tp", "1", "--plot", str(tmp_path / "x.png")]) == 2
    assert "--plot needs matplotlib: pip install 'hybrid-kv[plot]'" in capsys.readouterr().err


def test_plot_says_where_it_wrote(capsys, tmp_path):
    f = tmp_path / "page.png"
    assert main(["layout", "--model", "jamba-v0.1", "--tp", "1", "--plot", str(f)]) == 0
    assert f.stat().st_size > 0 and f"wrote the page map of rank 0 to {f}" in capsys.readouterr().err


def test_repack_without_verify_succeeds(capsys):
    argv = [
        "repack",
        "--model",
        "falcon-h1-0.5b",
        "--prefill-tp",
        "1",
        "--decode-tp",
        "1",
        "--tokens",
        "16",
        "--requests",
        "1",
        "--repeats",
        "1",
        "--backend",
        "torch",
    ]
    assert main(argv) == 0
    assert "verification not requested" in capsys.readouterr().out


def test_copy_segments_rejects_negative_strides_and_wrapping_rows():
    src, dst = torch.zeros(64, dtype=torch.uint8), torch.zeros(64, dtype=torch.uint8)
    for table, msg in (
        ([[0, 32, 2, 16, 16, -16]], "dst_stride=-16 is negative"),
        ([[0, 0, 2**62, 1, 0, 256]], "writes up to byte"),
    ):
        with pytest.raises(ValueError, match=msg):
            ops.copy_segments(src, dst, np.array(table, dtype=np.int64))
    assert not dst.any()


def test_transfer_that_cannot_fit_in_memory_is_refused_before_any_process_starts(capsys):
    t0 = time.monotonic()
    argv = ["transfer", "--model", "qwen3.5-27b", *P, "--requests", "2000", "--tokens", "65536"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "this transfer needs about" in err and "GiB are available: use a smaller --in-flight or --tokens" in err
    assert time.monotonic() - t0 < 60


def _sleep():
    time.sleep(60)


def test_rank_killed_by_sigkill_says_out_of_memory():
    import multiprocessing as mp

    from hybrid_kv.transport.launch import _recv

    ctx = mp.get_context("spawn")
    a, b = ctx.Pipe()
    p = ctx.Process(target=_sleep, daemon=True)
    p.start()
    b.close()  # only the child holds the other end now
    p.kill()
    with pytest.raises(RuntimeError, match=r"decode rank 3 run: the process was killed \(SIGKILL: out of memory\?\)"):
        _recv(a, "decode rank 3 run", 30, proc=p)
