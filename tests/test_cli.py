"""The CLI, and the `plan --json` contract checked by *applying* its reads against the oracle."""

import json
import subprocess
import sys
from importlib import resources

import pytest
from conftest import PRESETS

from hybrid_kv.cli import main
from hybrid_kv.harness import Harness
from hybrid_kv.plan import TransferPlan
from hybrid_kv.spec_hf import load_spec


def run_json(capsys, *argv) -> dict:
    assert main([*argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def preset_path(name: str) -> str:
    return str(resources.files("hybrid_kv") / "presets" / f"{name}.json")


@pytest.mark.parametrize("name", PRESETS)
def test_plan_json_reads_rebuild_decode_pages(name, capsys):
    """`plan --json` on the model's config.json, P TP 2 -> D TP 4: copying exactly the listed byte
    ranges reproduces the oracle's decode pages (all layers, one request within one decode block)."""
    tokens = 16
    rep = run_json(
        capsys, "plan", "--model", preset_path(name), "--prefill-tp", "2", "--decode-tp", "4", "--tokens", str(tokens)
    )
    assert set(rep) >= {"model", "prefill_tp", "decode_tp", "conv_layout", "layers", "reads", "descriptors_per_request"}
    assert (rep["prefill_tp"], rep["decode_tp"], rep["conv_layout"]) == (2, 4, "DS")
    spec = load_spec(name)
    assert [(x["index"], x["kind"]) for x in rep["layers"]] == [(x.index, x.kind.value) for x in spec.layers]
    comps = {r["component"] for r in rep["reads"]}
    assert comps <= {"conv.x", "conv.B", "conv.C", "conv.q", "conv.k", "conv.v", "conv", "ssm", "kv"}

    plan = TransferPlan.build(spec, 2, 4, tokens)
    h = Harness(plan, [tokens], seed=11, spare_blocks=0)
    gp, gd = h.batch.prefill_geom, h.batch.decode_geom
    pb, db = h.batch.prefill_blocks[0], h.batch.decode_blocks[0]
    kinds = {x.index: x.kind.value for x in spec.layers}
    for r in rep["reads"]:
        kv = kinds[r["layer"]] == "attention"
        sblk = pb.kv[r["src_block"]] if kv else pb.state
        dblk = db.kv[r["dst_block"]] if kv else db.state
        s = gp.block_offset(r["layer"], sblk) + r["src_offset"]
        d = gd.block_offset(r["layer"], dblk) + r["dst_offset"]
        h.decode_caches[r["decode_rank"]][d : d + r["nbytes"]] = h.prefill_caches[r["prefill_rank"]][
            s : s + r["nbytes"]
        ]
    assert h.mismatches() == []
    # counted from the reads just applied, not asked of the plan: strided posts each read (one decode
    # block per request); packed one descriptor per (source, destination) pair and 64 MiB unit
    per_pair: dict = {}
    for r in rep["reads"]:
        key = (r["prefill_rank"], r["decode_rank"])
        per_pair[key] = per_pair.get(key, 0) + r["nbytes"]
    packed = sum(-(-n // (64 << 20)) for n in per_pair.values())
    assert rep["descriptors_per_request"] == {"strided": len(rep["reads"]), "packed": packed}


def test_layout_json(capsys):
    rep = run_json(capsys, "layout", "--model", "nemotron-h-8b", "--tp", "4")
    assert (rep["block_size"], rep["page_bytes"]) == (1040, 1_064_960)
    assert [(p["component"], p["offset"], p["nbytes"]) for p in rep["state"]["conv_parts"]] == [
        ("conv.x", 0, 12288),
        ("conv.B", 12288, 1536),
        ("conv.C", 13824, 1536),
    ]
    assert (rep["state"]["ssm_offset"], rep["state"]["ssm_bytes"], rep["state"]["padding_bytes"]) == (
        15360,
        1_048_576,
        1024,
    )
    assert [r["ssm_heads"] for r in rep["ranks"]] == [[0, 32], [32, 64], [64, 96], [96, 128]]
    sd = run_json(capsys, "layout", "--model", "nemotron-h-8b", "--tp", "4", "--conv-layout", "SD")
    assert sd["state"]["conv_parts"][1] == {
        "component": "conv.B",
        "channels": 256,
        "replicated": False,
        "offset": 4096,
        "rows": 3,
        "row_bytes": 512,
        "stride": 5120,
        "nbytes": 1536,
    }


def test_human_output(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")  # rich wraps at 80 columns when not on a terminal
    assert main(["layout", "--model", "falcon-h1-0.5b", "--tp", "2"]) == 0
    out = capsys.readouterr().out
    assert "conv.B" in out and "(replicated)" in out and "block 800 tokens" in out
    assert main(["plan", "--model", "qwen3.5-27b", "--prefill-tp", "1", "--decode-tp", "8"]) == 0
    out = capsys.readouterr().out
    assert "descriptors per request" in out and "conv.v" in out


@pytest.mark.parametrize(
    "argv,msg",
    [
        (
            ["plan", "--model", "qwen3.5-27b", "--prefill-tp", "3", "--decode-tp", "4"],
            "tp=3 does not divide GDN num_k_heads=16",
        ),
        (["layout", "--model", "nope", "--tp", "1"], "neither a config.json path nor a preset"),
        (["layout", "--model", "jamba-v0.1", "--tp", "1", "--ssm-dtype", "int3"], "unsupported dtype 'int3'"),
    ],
)
def test_errors(argv, msg, capsys):
    assert main(argv) == 2
    assert msg in capsys.readouterr().err


def test_console_script():
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "hybrid_kv.cli",
            "plan",
            "--model",
            "jamba-v0.1",
            "--prefill-tp",
            "2",
            "--decode-tp",
            "1",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    rep = json.loads(out.stdout)
    assert rep["descriptors_per_request"]["packed"] == 2


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_repack_json(backend, capsys):
    rep = run_json(
        capsys,
        "repack",
        "--model",
        "falcon-h1-0.5b",
        "--prefill-tp",
        "2",
        "--decode-tp",
        "1",
        "--tokens",
        "20",
        "--requests",
        "2",
        "--backend",
        backend,
        "--verify",
        "--repeats",
        "1",
    )
    assert rep["verified"] is True and rep["checked"] is True and rep["backend"] == backend
    assert rep["pack"]["launches"] == 2 and rep["unpack"]["launches"] == 1
    # by hand from config.json: 36 layers, each a Mamba2 state at TP 1 (conv (1536 + 2 * 128) ch x 3 rows
    # x 2 B = 10752, SSM 24 x 64 x 128 x 2 B = 393216) and attention, whose 20 tokens move as the one
    # 800-token decode block they open (2 KV heads x 64 x 2 (K, V) x 2 B = 512 B a token)
    per_request = 36 * (10752 + 393216 + 800 * 512)
    assert rep["bytes_moved"] == 2 * per_request
    assert rep["pack"]["bytes"] == 2 * rep["bytes_moved"]  # read + written
    # slots: per request, prefill rank and layer, the state and the one attention block (decode TP 1)
    assert rep["pack"]["slots"] == rep["unpack"]["slots"] == 2 * 2 * 36 * 2
    assert (rep["pack"]["tiles"] is None) == (backend == "torch")
    assert rep["transfer_units"] == 2 * 2  # one per (request, prefill rank -> decode rank)
    assert rep["kernel"].startswith("slot_copy")


def test_repack_bad_device():
    assert main(
        [
            "repack",
            "--model",
            "jamba-v0.1",
            "--prefill-tp",
            "1",
            "--decode-tp",
            "1",
            "--device",
            "cuda:7",
            "--requests",
            "1",
        ]
    ) == (2 if not __import__("torch").cuda.is_available() else 0)
