"""The three run-time patches of vLLM, all in `hybrid_kv.vllm.surface`: what each does, and the vLLM behaviour
each relies on, read from the installed release's sources (a release that changes it fails here, before any
engine runs wrong)."""

import ast
import dataclasses
import importlib.util
import threading
from pathlib import Path

import pytest

pytest.importorskip("vllm", reason="needs the vllm extra (CI installs it)")

from hybrid_kv import srcindex as S
from hybrid_kv.vllm import surface
from hybrid_kv.vllm.surface import NIXL, SSM_CONV

SITE = Path(importlib.util.find_spec("vllm").submodule_search_locations[0]).parent


@pytest.fixture(scope="module")
def src() -> S.Source:
    return S.Source(SITE)


def _calls(fn: ast.AST) -> set[str]:
    """Dotted names `fn` calls (`self.nixl_wrapper.send_notif`, `derive_mamba_conv_split`)."""
    out = set()
    for n in ast.walk(fn):
        if isinstance(n, ast.Call):
            parts, f = [], n.func
            while isinstance(f, ast.Attribute):
                parts.append(f.attr)
                f = f.value
            if isinstance(f, ast.Name):
                out.add(".".join([f.id, *reversed(parts)]))
    return out


def _lazy_imports(fn: ast.AST) -> set[tuple[str, str]]:
    return {(n.module, a.name) for n in ast.walk(fn) if isinstance(n, ast.ImportFrom) for a in n.names}


# ---- dim_first_view -------------------------------------------------------------------------------------


def test_dim_first_view_shows_ds_within_and_restores(monkeypatch):
    from vllm.distributed.kv_transfer.kv_connector.v1 import ssm_conv_transfer_utils
    from vllm.distributed.kv_transfer.kv_connector.v1.nixl import base_worker
    from vllm.model_executor.layers.mamba import mamba_utils

    seen = []
    monkeypatch.setattr(mamba_utils, "is_conv_state_dim_first", lambda: False)  # an SD deployment
    monkeypatch.setattr(ssm_conv_transfer_utils, "is_conv_state_dim_first", lambda: False)
    monkeypatch.setattr(base_worker, "derive_mamba_conv_split", lambda spec, tp, *a, **k: seen.append((spec, tp, k)))
    split = base_worker.derive_mamba_conv_split

    @dataclasses.dataclass
    class Mamba:
        shapes: tuple

    with surface.dim_first_view():
        assert mamba_utils.is_conv_state_dim_first() and ssm_conv_transfer_utils.is_conv_state_dim_first()
        base_worker.derive_mamba_conv_split(Mamba(((3, 96), (8, 16))), 2, require_dim_first=True)
    assert seen == [(Mamba(((96, 3), (8, 16))), 2, {"require_dim_first": True})]  # the DS view, later keywords on
    assert not mamba_utils.is_conv_state_dim_first() and base_worker.derive_mamba_conv_split is split


def test_vllm_looks_the_conv_layout_up_at_call_time(src):
    """The worker's constructor imports `is_conv_state_dim_first` inside itself (so the swap on `mamba_utils`
    reaches it) and calls `derive_mamba_conv_split` by its module-level name in `base_worker` (swapped there);
    the 3-read's own assert reads the name `ssm_conv_transfer_utils` holds."""
    base = f"{NIXL}.base_worker"
    inits = [n for n in ast.walk(src.tree(base)) if isinstance(n, ast.FunctionDef) and n.name == "__init__"
             and "derive_mamba_conv_split" in _calls(n)]  # fmt: skip
    assert len(inits) == 1, "no constructor of base_worker calls derive_mamba_conv_split"
    assert ("vllm.model_executor.layers.mamba.mamba_utils", "is_conv_state_dim_first") in _lazy_imports(inits[0])
    assert "is_conv_state_dim_first" in _calls(inits[0])
    top = {a.asname or a.name for n in src.tree(base).body if isinstance(n, ast.ImportFrom) for a in n.names}
    assert "derive_mamba_conv_split" in top and "is_conv_state_dim_first" not in top
    split = S.find_function(src, SSM_CONV, "derive_mamba_conv_split")
    assert split is not None and "is_conv_state_dim_first" in _calls(split)


# ---- route_handshakes -----------------------------------------------------------------------------------


def test_route_handshakes_only_for_pairs_that_do_not_divide():
    from vllm.distributed.kv_transfer.kv_connector.utils import TransferTopology

    topo = TransferTopology(tp_rank=1, tp_size=3, block_size=16, engine_id="d", is_mla=False, is_mamba=True,
                            total_num_kv_heads=6, attn_backends=[])  # fmt: skip
    surface.route_handshakes(topo, lambda tp: [9, tp])
    assert topo.handshake_target_ranks(2) == [9, 2]  # 2 -> 3: hybrid-kv's sources
    assert topo.handshake_target_ranks(6) == [2, 3]  # 6 -> 3 divides: vLLM's own mapping
    assert topo.handshake_target_ranks(1) == [0]
    again = type(topo)
    surface.route_handshakes(topo, lambda tp: [0])  # routed once: a second call changes nothing
    assert type(topo) is again and topo.handshake_target_ranks(2) == [9, 2]


def test_vllm_asks_the_topology_object_for_handshake_targets(src):
    hits = [n for n in ast.walk(src.tree(f"{NIXL}.base_worker")) if isinstance(n, ast.FunctionDef)
            and "self.transfer_topo.handshake_target_ranks" in _calls(n)]  # fmt: skip
    assert hits, "vLLM no longer asks self.transfer_topo.handshake_target_ranks: route_handshakes would not apply"


# ---- holding ---------------------------------------------------------------------------------------------


class _Wrapper:
    def __init__(self) -> None:
        self.posted, self.sent = [], []

    def make_prepped_xfer(self, op, local, local_ids, remote, remote_ids, notif_msg=b"", **kw):
        self.posted.append((remote, notif_msg))
        return "handle"

    def send_notif(self, agent, notif_msg):
        self.sent.append((agent, notif_msg))


def test_holding_keeps_the_engine_threads_notifications_until_sent():
    worker = type("W", (), {})()
    worker.nixl_wrapper = nx = _Wrapper()
    worker._remote_agents = {"p": {(0, 0): "agent-0", (0, 1): "agent-1"}}
    worker.dst_xfer_side_handles = {"p": {0: "h0", 1: "h1"}}
    worker.xfer_stats = None
    held: list = []
    with surface.holding(worker, "p", held):
        assert worker.nixl_wrapper.make_prepped_xfer("READ", 1, [0], "h1", [0], notif_msg=b"r:1") == "handle"
        worker.nixl_wrapper.send_notif("agent-0", notif_msg=b"r:1")
        other = threading.Thread(target=worker.nixl_wrapper.send_notif, args=("agent-0",), kwargs={"notif_msg": b"hb"})
        other.start()
        other.join()
    assert nx.posted == [("h1", b"")] and nx.sent == [("agent-0", b"hb")]  # another thread's goes through
    assert held == [("agent-1", b"r:1"), ("agent-0", b"r:1")] and worker.nixl_wrapper is nx
    surface.send_held(worker, "r", held)
    assert nx.sent[1:] == [("agent-1", b"r:1"), ("agent-0", b"r:1")] and held == []


def test_vllm_reads_post_through_the_wrappers_prepped_xfer_and_send_notif(src):
    """`holding` swaps `worker.nixl_wrapper`: vLLM's pull read path must post its READs and notifications
    through that attribute, the notification of a READ as its `notif_msg` (the mixed DRAM/device path keeps
    it until every handle of the request, hybrid-kv's READs included, has completed)."""
    pull = src.tree(f"{NIXL}.pull_worker")
    calls = set().union(*(_calls(n) for n in ast.walk(pull) if isinstance(n, ast.FunctionDef)))
    assert {"self.nixl_wrapper.make_prepped_xfer", "self.nixl_wrapper.send_notif"} <= calls
    posts = [n for n in ast.walk(pull) if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)
             and n.func.attr == "make_prepped_xfer"]  # fmt: skip
    assert any(k.arg == "notif_msg" for p in posts for k in p.keywords)
