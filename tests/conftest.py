"""Test set-up. TRITON_INTERPRET must be set before any @triton.jit decorates (i.e. before the kernel
modules are imported), so it is set here, first, whenever no GPU is present."""

import gc
import logging
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
if os.environ.get("PYTEST_XDIST_WORKER") and "OMP_NUM_THREADS" not in os.environ:
    # One thread per worker (and per process it starts): with a pool per worker on the same cores, OpenMP's
    # spin-waiting threads contend and the torch-heavy tests ran 3.5x slower under `-n 2` than alone.
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)

import pytest

from hybrid_kv.layout import RankLayout
from hybrid_kv.spec_hf import list_presets, load_spec

PRESETS = list_presets()


def fits(spec, tp: int) -> bool:
    """Whether `spec` shards over `tp` (vLLM's divisibility rules, as RankLayout enforces them)."""
    try:
        RankLayout(spec, tp, 0)
        return True
    except ValueError:
        return False


def preset_cases(tp_pairs):
    """pytest params (preset, prefill TP, decode TP) for every pair both sides of which the preset fits."""
    for name in PRESETS:
        spec = load_spec(name)
        for p, d in tp_pairs:
            if fits(spec, p) and fits(spec, d):
                yield pytest.param(name, p, d, id=f"{name}-P{p}-D{d}")


@pytest.fixture(scope="session")
def specs():
    return {name: load_spec(name) for name in PRESETS}


def pytest_collection_modifyitems(config, items):
    """Tiers by file (README, Tests): `engines` for the real-engine scenarios, `vllm` for the tests on vLLM's
    objects in process; `cuda` tests are skipped without a GPU."""
    skip = None if torch.cuda.is_available() else pytest.mark.skip(reason="needs a CUDA GPU")
    # the real-engine runs first: they are the longest, so under xdist they start while the short tests
    # fill the other worker (longest first keeps the workers' ends close)
    items.sort(key=lambda item: item.path.name != "test_vllm_e2e.py")
    for item in items:
        name = item.path.name
        if name == "test_vllm_e2e.py":
            item.add_marker(pytest.mark.engines)
        elif name.startswith("test_vllm_"):
            item.add_marker(pytest.mark.vllm)
        if skip is not None and "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _connector_logs_in_caplog(caplog):
    """hybrid-kv's connector logs under vLLM's "vllm" logger, which does not propagate to the root logger
    that caplog listens on: hand caplog's handler to it directly."""
    lg = logging.getLogger("vllm.hybrid_kv")
    lg.addHandler(caplog.handler)
    yield
    lg.removeHandler(caplog.handler)


@pytest.fixture
def ds_layout(monkeypatch):
    """vLLM's DS conv-state layout for the connector tests (vLLM caches the layout choice)."""
    from vllm.model_executor.layers.mamba import mamba_utils

    monkeypatch.setenv("VLLM_SSM_CONV_STATE_LAYOUT", "DS")
    mamba_utils.get_conv_state_layout.cache_clear()
    yield
    mamba_utils.get_conv_state_layout.cache_clear()


@pytest.fixture
def pairs(tmp_path, monkeypatch):
    """Make prefill/decode engine pairs (`vllm_pair.Pair`); every one made is shut down afterwards."""
    from vllm_pair import Pair

    made = []

    def make(*a, **kw):
        made.append(Pair(tmp_path / str(len(made)), monkeypatch, *a, **kw))
        return made[-1]

    yield make
    for p in made:
        p.close()
    made.clear()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """After each test on vLLM's objects, once pytest has let go of the test too: collect its engines.

    vLLM's workers sit in reference cycles (executors, callbacks), and until pytest's teardown ends its
    log records of the test's call phase can still reach them (record arguments, exception tracebacks), so
    a collection inside a fixture's teardown is too early. Left to the cyclic collector, a closed engine's
    NIXL agents stay alive for minutes, and their UCX progress threads poll without sleeping (vLLM's
    default): on CI's 2 cores, the later tests of a run would share the machine with them."""
    yield
    module = getattr(item, "module", None)  # items that are not Python functions have none
    if module is not None and module.__name__.startswith("test_vllm_"):
        gc.collect()
