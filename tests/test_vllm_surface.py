"""The version surface (`hybrid_kv.vllm.surface`) and its check against a release's sources
(`python -m hybrid_kv.vllm.compat SOURCE`), on the installed vLLM's own files, read, never imported."""

import ast
import importlib.util
import tarfile
from pathlib import Path

import pytest

pytest.importorskip("vllm", reason="needs the vllm extra (CI installs it)")

from hybrid_kv import srcindex as S
from hybrid_kv.vllm.compat import check_source, main
from hybrid_kv.vllm.surface import NIXL, SSM_CONV, SURFACE

SITE = Path(importlib.util.find_spec("vllm").submodule_search_locations[0]).parent
ADAPTER = Path(__file__).parents[1] / "hybrid_kv" / "vllm"
PULL, BASE = f"{NIXL}.pull_worker", f"{NIXL}.base_worker"
WHERE = f"{PULL}:NixlPullConnectorWorker"


@pytest.fixture(scope="module")
def installed() -> S.Source:
    return S.Source(SITE)


def test_installed_release_has_the_whole_surface(installed):
    """The release the adapter was written against: nothing missing, nothing changed."""
    assert installed.version().startswith("0.32.0")
    assert check_source(installed) == ([], [])


def edited(installed: S.Source, module: str, old: str, new: str) -> S.Source:
    return installed.edited(module, old, new)


@pytest.mark.parametrize(
    "module, old, new, want",
    [
        # a hook vLLM stops calling
        (BASE, "self._pop_done_transfers(", "self._pop_done(",
         f"{WHERE}._pop_done_transfers: overridden, but vLLM no longer calls it"),
        # a hook's parameters renamed
        (PULL, "def _read_blocks_for_req(self, req_id", "def _read_blocks_for_req(self, request_id",
         f"{WHERE}._read_blocks_for_req: parameters (self request_id meta) differ from (self req_id meta)"),
        # an attribute the adapter reads, gone
        (BASE, "self._recving_transfers =", "self._recving =", (f"{WHERE}._recving_transfers: attribute missing",
         f"{NIXL}.push_worker:NixlPushConnectorWorker._recving_transfers: attribute missing")),
        # a constructor the adapter skips, changed
        (f"{NIXL}.connector", "self.connector_worker = NixlPullConnectorWorker(",
         "self.worker_extra = 1\n            self.connector_worker = NixlPullConnectorWorker(",
         f"{NIXL}.connector:NixlPullConnector.__init__: changed, and the adapter skips it"),
        # a function swapped at run time gains a required parameter
        (SSM_CONV, "    local_tp: int,\n", "    local_tp: int,\n    x: int,\n",
         f"{BASE}.derive_mamba_conv_split: parameters (mamba_spec local_tp x) differ from (mamba_spec local_tp ...)"),
    ],
)  # fmt: skip
def test_each_kind_of_change_is_a_problem(installed, module, old, new, want):
    problems, _ = check_source(edited(installed, module, old, new))
    wants = (want,) if isinstance(want, str) else want
    assert len(problems) == len(wants) and all(p.startswith(w) for p, w in zip(problems, wants)), problems


def test_added_parameters_with_defaults_pass_where_forwarded(installed):
    """0.34's `derive_mamba_conv_split(..., *, require_dim_first=True)`: the adapter's wrapper forwards it."""
    src = edited(installed, SSM_CONV, "    local_tp: int,\n",
                 "    local_tp: int,\n    *,\n    require_dim_first: bool = True,\n")  # fmt: skip
    assert check_source(src) == ([], [])


def test_a_changed_body_is_a_note_to_review(installed):
    src = edited(installed, PULL, "def _read_blocks_for_req(self, req_id: str, meta: ReqMeta):\n",
                 "def _read_blocks_for_req(self, req_id: str, meta: ReqMeta):\n        meta = meta\n")  # fmt: skip
    assert check_source(src) == ([], [f"{WHERE}._read_blocks_for_req: body changed since 0.32.0 (review the override)"])


def test_command_reads_an_sdist_and_exits_nonzero_on_a_problem(installed, tmp_path, capsys):
    """The sdist form (`vllm-X/vllm/...` in a .tar.gz), and a directory with one member gone."""
    sdist = tmp_path / "vllm-0.32.0.tar.gz"
    with tarfile.open(sdist, "w:gz") as t:
        for mod in installed.files:
            if mod.startswith(("vllm.distributed", "vllm.v1", "vllm.config", "vllm.model_executor.layers.mamba")) or \
                    mod in ("vllm", "vllm.envs", "vllm._version"):  # fmt: skip
                rel = mod.replace(".", "/") + ("/__init__.py" if (SITE / mod.replace(".", "/")).is_dir() else ".py")
                t.add(SITE / rel, arcname=f"vllm-0.32.0/{rel}")
    assert main([str(sdist)]) == 0
    assert capsys.readouterr().out.startswith(f"vLLM 0.32.0 ({sdist}): 0 problem(s), 0 note(s); supported\n")

    bad = tmp_path / "bad"
    with tarfile.open(sdist) as t:
        t.extractall(bad, filter="data")
    f = bad / "vllm-0.32.0" / PULL.replace(".", "/")
    f = f.with_suffix(".py")
    f.write_text(f.read_text().replace("def _read_blocks_for_req(", "def _read_blocks(", 1))
    assert main([str(bad)]) == 1
    out = capsys.readouterr().out
    assert f"  problem: {WHERE}._read_blocks_for_req: override target missing\n" in out, out


def _on_vllm(v: ast.expr) -> bool:
    """Whether an attribute's object may be one of vLLM's: `self`, a worker (`worker`, `w`, `self.w` in the
    objects the workers hold), vLLM's implementation (`self.stock`, `super()`)."""
    if isinstance(v, ast.Name):
        return v.id in ("self", "worker", "w")
    if isinstance(v, ast.Attribute):
        return v.attr in ("w", "stock")
    return isinstance(v, ast.Call) and isinstance(v.func, ast.Name) and v.func.id == "super"


def adapter_uses() -> set[str]:
    """Names the adapter's code reaches on vLLM's objects (`_on_vllm`), and the methods its classes define."""
    out: set[str] = set()
    for p in ADAPTER.glob("*.py"):
        for n in ast.walk(ast.parse(p.read_text())):
            if isinstance(n, ast.Attribute):
                if _on_vllm(n.value):
                    out.add(n.attr)
            elif isinstance(n, ast.ClassDef):
                out.update(b.name for b in n.body if isinstance(b, ast.FunctionDef))
    return out


def test_every_vllm_member_the_adapter_touches_is_listed(installed):
    """A member of the vLLM classes the adapter subclasses that its code reaches or redefines, but the
    surface does not list, fails here: the surface is the one place that names them."""
    listed: set[str] = set()
    vllm_names: set[str] = set()
    for o in SURFACE:
        listed.update(o.override, o.call, o.functions, o.read.split(), o.fields.split())
        if o.cls and o.cls.endswith(("Worker", "Scheduler", "Connector")):
            for info in S.mro(installed, o.module, o.cls):
                vllm_names.update(info.methods, info.attrs)
    # hybrid-kv's own classes (PrefillServer, AnyTPPlans, ...) also have these names, on their own objects
    own = {"__init__", "shutdown", "__getattr__"}
    missing = sorted((adapter_uses() & vllm_names) - listed - own)
    assert not missing, f"vLLM members the adapter uses, not in hybrid_kv/vllm/surface.py: {missing}"


def test_connectors_refuse_sleep_mode():
    """vLLM >= 0.33 asks (`supports_sleep_mode`, in the surface) and refuses enable_sleep_mode on False."""
    from hybrid_kv.vllm import HybridKVConnector, HybridKVPushConnector

    assert HybridKVConnector.supports_sleep_mode(None) is False
    assert HybridKVPushConnector.supports_sleep_mode(None) is False


def test_connectors_declare_how_they_reach_the_kv_cache(monkeypatch):
    """vLLM >= 0.34 asks `kv_cache_access` (in the surface); vLLM 0.32 has no `KVCacheAccess`, so its 0.34
    definition stands in (config/kv_transfer.py: IN_PROCESS = 0, then REGISTERS, EXPORTS_FD, EXPORTS_FABRIC,
    LEGACY_IPC as auto flags). The cache is registered and exported over cuda_ipc unless it lives on the CPU."""
    import enum
    import types

    import vllm.config.kv_transfer as kvt

    from hybrid_kv.vllm import HybridKVConnector, HybridKVPushConnector

    class KVCacheAccess(enum.IntFlag):
        IN_PROCESS = 0
        REGISTERS = enum.auto()
        EXPORTS_FD = enum.auto()
        EXPORTS_FABRIC = enum.auto()
        LEGACY_IPC = enum.auto()

    monkeypatch.setattr(kvt, "KVCacheAccess", KVCacheAccess, raising=False)
    for cls in (HybridKVConnector, HybridKVPushConnector):
        gpu = cls.kv_cache_access(types.SimpleNamespace(kv_buffer_device="cuda"))
        assert gpu == KVCacheAccess.REGISTERS | KVCacheAccess.EXPORTS_FABRIC
        assert cls.kv_cache_access(types.SimpleNamespace(kv_buffer_device="cpu")) == KVCacheAccess.IN_PROCESS
