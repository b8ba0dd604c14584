"""hybrid-kv's page anatomy against vLLM 0.32's own code: its state-shape calculators (both conv layouts),
its MambaSpec / FullAttentionSpec page sizes, and its NIXL connector's local sub-projection split.
Every shipped preset at every TP in {1, 2, 4, 8} the model allows."""

import pytest

vllm = pytest.importorskip("vllm", reason="needs the vllm extra (CI installs it)")

from conftest import PRESETS, fits  # noqa: E402
from vllm.distributed.kv_transfer.kv_connector.v1.ssm_conv_transfer_utils import derive_mamba_conv_split  # noqa: E402
from vllm.model_executor.layers.mamba import mamba_utils  # noqa: E402
from vllm.model_executor.layers.mamba.mamba_utils import MambaStateShapeCalculator as Calc  # noqa: E402
from vllm.v1.attention.backends.registry import MambaAttentionBackendEnum  # noqa: E402
from vllm.v1.kv_cache_interface import FullAttentionSpec, MambaSpec, MLAAttentionSpec  # noqa: E402

from hybrid_kv.layout import RankLayout  # noqa: E402
from hybrid_kv.oracle.state import TORCH_DTYPES  # noqa: E402
from hybrid_kv.spec import LayerKind  # noqa: E402
from hybrid_kv.spec_hf import load_spec  # noqa: E402

MAMBA_TYPE = {
    LayerKind.MAMBA1: MambaAttentionBackendEnum.MAMBA1,
    LayerKind.MAMBA2: MambaAttentionBackendEnum.MAMBA2,
    LayerKind.GDN: MambaAttentionBackendEnum.GDN_ATTN,
    LayerKind.KDA: MambaAttentionBackendEnum.GDN_ATTN,  # KDA registers as GDN_ATTN with two states
}


def vllm_shapes(spec, tp: int):
    st = spec.state
    if st.kind is LayerKind.MAMBA2:
        hd, n = st.head_shape
        return Calc.mamba2_state_shape(tp, st.heads * hd, st.groups, st.heads, hd, n, st.conv_kernel, st.num_spec)
    if st.kind is LayerKind.GDN:
        dv, dk = st.head_shape
        return Calc.gated_delta_net_state_shape(tp, st.groups, st.heads, dk, dv, st.conv_kernel, st.num_spec)
    if st.kind is LayerKind.KDA:
        hd = st.head_shape[0]
        return Calc.kda_state_shape(tp, st.heads, hd, conv_kernel_size=st.conv_kernel, num_spec=st.num_spec)
    return Calc.mamba1_state_shape(tp, st.heads, st.head_shape[0], st.conv_kernel)


CASES = [
    pytest.param(n, tp, cl, id=f"{n}-tp{tp}-{cl}")
    for n in PRESETS
    for tp in (1, 2, 4, 8)
    if fits(load_spec(n), tp)  # TPs the model does not allow are refused by vLLM too (tested in test_layout)
    for cl in ("DS", "SD")
]


@pytest.mark.parametrize("name,tp,conv_layout", CASES)
def test_against_vllm(name, tp, conv_layout, monkeypatch):
    spec = load_spec(name)
    monkeypatch.setenv("VLLM_SSM_CONV_STATE_LAYOUT", conv_layout)
    mamba_utils.get_conv_state_layout.cache_clear()
    try:
        conv, ssm = vllm_shapes(spec, tp)
    finally:
        mamba_utils.get_conv_state_layout.cache_clear()
    lay = RankLayout(spec, tp, 0, conv_layout=conv_layout)
    mine_conv = (lay.conv_channels, lay.conv_rows) if conv_layout == "DS" else (lay.conv_rows, lay.conv_channels)
    assert tuple(conv) == mine_conv
    assert tuple(ssm) == (lay.ssm_shard.size, *spec.state.head_shape)

    st, at = spec.state, spec.attention
    dtypes = (TORCH_DTYPES[st.conv_dtype], TORCH_DTYPES[st.ssm_dtype])
    mspec = MambaSpec(block_size=lay.block_size, shapes=(conv, ssm), dtypes=dtypes, mamba_type=MAMBA_TYPE[st.kind])
    assert mspec.page_size_bytes == lay.state_bytes
    padded = MambaSpec(
        block_size=lay.block_size,
        shapes=(conv, ssm),
        dtypes=dtypes,
        mamba_type=MAMBA_TYPE[st.kind],
        page_size_padded=lay.page_bytes,
    )
    assert padded.page_size_bytes == lay.page_bytes
    fa = (MLAAttentionSpec if at.latent else FullAttentionSpec)(
        block_size=lay.block_size,
        num_kv_heads=max(1, at.num_kv_heads // tp),
        head_size=at.head_dim,
        dtype=TORCH_DTYPES[at.dtype],
    )
    assert fa.page_size_bytes == lay.page_bytes  # one hybrid page size for both kinds

    if conv_layout == "DS":  # the NIXL connector's split (DS only) of this rank's conv state
        split = derive_mamba_conv_split(mspec, tp)
        assert tuple(split.local_proj_dims) == tuple(p.channels for p in lay.conv_parts)
        assert tuple(split.ssm_sizes) == (lay.conv_bytes, lay.ssm_bytes)
        assert [tuple(x) for x in split.local_conv_offsets] == [
            (r.offset, r.nbytes) for r in (lay.conv_region(p, 0, p.channels) for p in lay.conv_parts)
        ]


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_kimi_linear_against_vllms_model_class(tp, tmp_path, monkeypatch):
    """vLLM's own KimiLinearForCausalLM (state shapes and dtypes from the config) and its ModelConfig's MLA
    cache geometry (use_mla, head size, one KV head at every TP) equal hybrid-kv's spec and layout."""
    import json

    from vllm.config import CacheConfig, ModelConfig, VllmConfig, set_current_vllm_config
    from vllm.model_executor.models import ModelRegistry

    from hybrid_kv.spec_hf import load_config

    (tmp_path / "config.json").write_text(json.dumps(load_config("kimi-linear-48b-a3b")[1]))
    monkeypatch.setenv("VLLM_SSM_CONV_STATE_LAYOUT", "DS")
    mamba_utils.get_conv_state_layout.cache_clear()
    mc = ModelConfig(model=str(tmp_path), skip_tokenizer_init=True, max_model_len=4096)
    vc = VllmConfig(model_config=mc, cache_config=CacheConfig(enable_prefix_caching=False))
    vc.parallel_config.tensor_parallel_size = tp
    cls, _ = ModelRegistry.resolve_model_cls(mc.architectures, mc)
    try:
        with set_current_vllm_config(vc):
            shapes = cls.get_mamba_state_shape_from_config(vc)
            dtypes = cls.get_mamba_state_dtype_from_config(vc)
    finally:
        mamba_utils.get_conv_state_layout.cache_clear()
    spec = load_spec("kimi-linear-48b-a3b")
    lay = RankLayout(spec, tp, 0, conv_layout="DS")
    assert [tuple(s) for s in shapes] == [(lay.conv_channels, lay.conv_rows), (lay.ssm_shard.size, 128, 128)]
    assert dtypes == (TORCH_DTYPES[spec.state.conv_dtype], TORCH_DTYPES[spec.state.ssm_dtype])
    assert mc.use_mla and mc.get_head_size() == spec.attention.head_dim
    assert mc.get_num_kv_heads(vc.parallel_config) == lay.kv_heads_local == 1
