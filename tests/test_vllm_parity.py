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
from vllm.v1.kv_cache_interface import FullAttentionSpec, MambaSpec  # noqa: E402

from hybrid_kv.layout import RankLayout  # noqa: E402
from hybrid_kv.spec import LayerKind  # noqa: E402
from hybrid_kv.spec_hf import load_spec  # noqa: E402
from hybrid_kv.testing.oracle import TORCH_DTYPES  # noqa: E402

MAMBA_TYPE = {
    LayerKind.MAMBA1: MambaAttentionBackendEnum.MAMBA1,
    LayerKind.MAMBA2: MambaAttentionBackendEnum.MAMBA2,
    LayerKind.GDN: MambaAttentionBackendEnum.GDN_ATTN,
}


def vllm_shapes(spec, tp: int):
    st = spec.state
    if st.kind is LayerKind.MAMBA2:
        hd, n = st.head_shape
        return Calc.mamba2_state_shape(tp, st.heads * hd, st.groups, st.heads, hd, n, st.conv_kernel, st.num_spec)
    if st.kind is LayerKind.GDN:
        dv, dk = st.head_shape
        return Calc.gated_delta_net_state_shape(tp, st.groups, st.heads, dk, dv, st.conv_kernel, st.num_spec)
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
    fa = FullAttentionSpec(
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
