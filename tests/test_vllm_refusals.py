"""HybridKVConnector's refusals and failures inside vLLM 0.32, on vLLM's own objects and real NIXL agents:
peers that differ (dtype, model, stock vs packed) are refused at handshake naming the field; settings the
packed path does not handle are refused at start-up before any agent exists; a full staging pool or a dead
prefill fails exactly its requests, and nothing is leaked."""

from __future__ import annotations

import pytest

pytest.importorskip("vllm", reason="needs the vllm extra (CI installs it)")
pytest.importorskip("nixl", reason="needs the nixl extra (CI installs it)")

import vllm_steps as S
import vllm_util as U
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole
from vllm_pair import Pair, assert_untouched

from hybrid_kv.vllm import HybridKVConnector

pytestmark = pytest.mark.usefixtures("ds_layout")


def test_mismatched_ssm_dtype_refused_at_handshake(pairs, caplog):
    """vLLM's compatibility hash omits the Mamba dtypes (reference §4); hybrid-kv's hello names the field."""
    pair = pairs("nemotron-h-8b", 2, 2, "packed", d_cache={"mamba_ssm_cache_dtype": "float16"})
    failed = pair.run_failing()
    assert all(f == {q.req_id for q in pair.reqs} for f in failed)
    assert "state.ssm_dtype: prefill 'float32' vs decode 'float16'" in caplog.text
    assert_untouched(pair)
    pair.wait_no_leaks()


def test_mismatched_model_refused_at_handshake(pairs, caplog):
    """Even with vLLM's compatibility hash switched off, different state dims are refused by name."""
    off = {"enforce_handshake_compat": False}
    pair = pairs(
        "nemotron-h-8b", 1, 1, "packed", p_extra=off, d_extra=off, d_edit=lambda c: c.update(ssm_state_size=64)
    )
    failed = pair.run_failing()
    assert all(f == {q.req_id for q in pair.reqs} for f in failed)
    assert "state.head_shape" in caplog.text
    assert_untouched(pair)


def test_stock_and_packed_peers_refuse_each_other(tmp_path, monkeypatch, caplog):
    pair = Pair(tmp_path, monkeypatch, "jamba-v0.1", 1, 1, "strided")
    try:
        monkeypatch.setenv("HYBRID_KV_TRANSFER", "packed")
        d = U.build_engine(U.model_dir(tmp_path / "d2", "jamba-v0.1"), "jamba-v0.1", 1, "decode2")
        pair.engines.append(d)
        for r, buf in enumerate(pair.background[:1]):
            d.storage(r).copy_(buf)
        pair.d = d
        failed = pair.run_failing()
        assert failed[0] == {q.req_id for q in pair.reqs}
        assert sum(d.conns[0].connector_worker.xfer_stats.data["num_failed_handshakes"]) >= 1
        assert_untouched(pair)
    finally:
        pair.close()


@pytest.mark.parametrize("side", ["prefill", "decode"])
def test_staging_too_small_fails_the_request_cleanly(pairs, caplog, side):
    """A staging pool (prefill) or receive pool (decode) that can never hold the request's unit: a clear
    error, the request fails through vLLM's failure path, the decode pages stay untouched, nothing leaks."""
    small = {"hybrid_kv_staging_bytes": 1 << 20}
    pair = pairs("nemotron-h-8b", 1, 1, "packed", **{f"{side[0]}_extra": small})
    failed = pair.run_failing()
    assert failed[0] == {q.req_id for q in pair.reqs}
    assert "can never fit the 1048576-byte staging pool" in caplog.text
    assert_untouched(pair)
    pair.wait_no_leaks()


def test_dead_prefill_fails_requests(pairs, caplog):
    """The prefill engine is gone before the decode side reads: the requests fail (bounded), pages untouched."""
    pair = pairs("jamba-v0.1", 1, 1, "packed")
    pair.p.shutdown()
    pair.engines.remove(pair.p)
    ids = {q.req_id for q in pair.reqs}
    for c in pair.d.conns:
        S.step(c, S.recv_meta(pair.reqs, pair.p))
    _, failed, _ = S.run_until([], pair.d.conns, ids, set(), timeout=60)
    assert failed[0] == ids
    assert_untouched(pair)
    pair.wait_no_leaks()


# ---- the prefill side channel ---------------------------------------------------------------------------


def test_unsupported_parallelism_refused_before_any_agent(tmp_path, monkeypatch):
    monkeypatch.setenv("HYBRID_KV_TRANSFER", "packed")
    eng = U.build_engine(U.model_dir(tmp_path, "jamba-v0.1"), "jamba-v0.1", 1, "e")
    eng.shutdown()
    eng.vc.parallel_config.pipeline_parallel_size = 2
    created = []
    monkeypatch.setattr(
        "vllm.distributed.kv_transfer.kv_connector.v1.nixl.base_worker.NixlWrapper",
        lambda *a, **k: created.append(a),
    )
    with U.tp_rank(0, 1), pytest.raises(ValueError, match="does not support pipeline_parallel_size=2"):
        HybridKVConnector(eng.vc, KVConnectorRole.WORKER, eng.kcc)
    assert created == []


@pytest.mark.parametrize("mode", ["packed", "strided", "auto"])
def test_unsafe_serving_settings_refused_at_startup(tmp_path, monkeypatch, mode):
    """What is not served yet would give wrong tokens silently: async scheduling (vLLM's CPU platform cannot
    run it, so no engine here has shown it right), and prefix caching together with speculative decoding
    (untested). Each role refuses them, naming the setting and the flag, before any NIXL agent exists.
    Prefix caching alone ('align', what vLLM turns on by default for a hybrid model) is served
    (test_vllm_prefix, test_vllm_e2e), and an attention-only model is never refused."""
    from vllm.config import ModelConfig, SpeculativeConfig, VllmConfig

    from hybrid_kv.vllm.config import refuse_unsafe_serving

    monkeypatch.setenv("HYBRID_KV_TRANSFER", mode)
    path = U.model_dir(tmp_path, "falcon-h1-0.5b")
    eng = U.build_engine(path, "falcon-h1-0.5b", 1, "e")
    eng.shutdown()
    created = []
    monkeypatch.setattr(
        "vllm.distributed.kv_transfer.kv_connector.v1.nixl.base_worker.NixlWrapper",
        lambda *a, **k: created.append(a),
    )
    kt = eng.vc.kv_transfer_config

    def default():
        return VllmConfig(model_config=ModelConfig(model=str(path), skip_tokenizer_init=True), kv_transfer_config=kt)

    served = default()
    assert served.cache_config.enable_prefix_caching and served.cache_config.mamba_cache_mode == "align"
    refuse_unsafe_serving(served)
    with_spec = default()
    with_spec.speculative_config = SpeculativeConfig(
        method="ngram",
        num_speculative_tokens=2,
        prompt_lookup_max=3,
        prompt_lookup_min=1,
        target_model_config=with_spec.model_config,
        target_parallel_config=with_spec.parallel_config,
    )
    cases = [
        (
            with_spec,
            r"prefix caching \(mamba_cache_mode='align'\) together with speculative decoding "
            r"\(method='ngram'\): pass --no-enable-prefix-caching",
        ),
    ]
    eng.vc.scheduler_config.async_scheduling = True
    cases.append((eng.vc, r"async scheduling \(async_scheduling=True\): pass --no-async-scheduling"))
    for vc, msg in cases:
        for role in (KVConnectorRole.SCHEDULER, KVConnectorRole.WORKER):
            with U.tp_rank(0, 1), pytest.raises(ValueError, match=msg):
                HybridKVConnector(vc, role, eng.kcc)
    assert created == []

    attn = tmp_path / "llama"
    attn.mkdir()
    (attn / "config.json").write_text(
        '{"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 256, "num_attention_heads": 4, '
        '"num_key_value_heads": 2, "num_hidden_layers": 2, "intermediate_size": 512, "vocab_size": 1000, '
        '"torch_dtype": "bfloat16"}'
    )
    llama = VllmConfig(model_config=ModelConfig(model=str(attn), skip_tokenizer_init=True), kv_transfer_config=kt)
    llama.scheduler_config.async_scheduling = True
    refuse_unsafe_serving(llama)  # vLLM's own NIXL path handles attention-only models


@pytest.mark.parametrize("setting", ["use_replayssm", "use_kda_recoverssm"])
def test_extra_recurrent_states_refused_at_startup(tmp_path, monkeypatch, setting):
    """ReplaySSM rings and Kimi's RecoverSSM records are state tensors past conv + SSM that no shell moves
    (stock NIXL describes shapes[0:2] only: the decode would run on stale records). Refused by each role
    before any NIXL agent, naming the setting; without it the same Kimi config builds (test_packed_and_strided)."""
    monkeypatch.setenv("HYBRID_KV_TRANSFER", "packed")
    vc = U.vllm_config(U.model_dir(tmp_path, "kimi-linear-48b-a3b"), 1, "e")
    setattr(vc.cache_config, setting, True)
    for role in (KVConnectorRole.SCHEDULER, KVConnectorRole.WORKER):
        with U.tp_rank(0, 1), pytest.raises(ValueError, match=rf"extra recurrent states \({setting}=True; "):
            HybridKVConnector(vc, role, None)
