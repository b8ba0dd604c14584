"""The hello comparison refuses every difference that changes a byte, naming the field: one case per
field (hand-edited fingerprints, so the expected outcome does not come from the code under test), plus
real spec pairs that differ only in a dtype or a layout."""

import copy

import pytest

from hybrid_kv.layout import RankLayout
from hybrid_kv.spec_hf import load_spec
from hybrid_kv.staging.handshake import check_fingerprints, peer_layout

BASE = RankLayout(load_spec("nemotron-h-8b"), 2, 0, "DS", "HND").fingerprint()


def _set(path: str, value):
    fp = copy.deepcopy(BASE)
    *head, last = path.split(".")
    d = fp
    for k in head:
        d = d[k]
    d[last] = value
    return fp


FIELDS = [
    ("architecture", "NemotronHForCausalLMX"),
    ("layer_kinds", BASE["layer_kinds"][::-1]),
    ("conv_layout", "SD"),
    ("kv_layout", "NHD"),
    ("state.conv_dtype", "float16"),
    ("state.ssm_dtype", "float16"),
    ("state.num_spec", 1),
    ("state.conv_kernel", 3),
    ("state.heads", BASE["state"]["heads"] * 2),
    ("state.groups", BASE["state"]["groups"] * 2),
    ("state.head_shape", [1, 1]),
    ("state.kind", "mamba1"),
    ("attention.dtype", "float16"),
    ("attention.num_kv_heads", 1),
    ("attention.head_dim", 64),
    ("state.extra_field", 1),  # a key only one side sends is a difference
    ("new_top_level", 1),
    ("state.num_spec", 0.0),  # same value, other JSON type
]


@pytest.mark.parametrize(("path", "value"), FIELDS, ids=[f"{p}={v!r}"[:40] for p, v in FIELDS])
def test_each_field_is_compared(path, value):
    other = _set(path, value)
    for prefill, decode in ((BASE, other), (other, BASE)):  # an extra key on either side
        with pytest.raises(ValueError, match=rf"configurations differ \({path}: prefill"):
            check_fingerprints(prefill, decode)


def test_names_and_tp_dependent_sizes_may_differ():
    other = _set("model", "elsewhere/nemotron")
    other.update(tp_size=4, block_size=1, page_bytes=1)
    check_fingerprints(BASE, other)  # checked against the TP by peer_layout instead


def test_connector_layer_names_compared():
    a = dict(BASE, state_layers=[[1, "model.layers.0.mixer"]])
    b = dict(BASE, state_layers=[[1, "model.layers.2.mixer"]])
    with pytest.raises(ValueError, match="state_layers"):
        check_fingerprints(a, b)  # a field only the vLLM shell sends: compared too


@pytest.mark.parametrize(
    ("edit", "field"),
    [
        (lambda s: s.with_dtypes(kv_dtype="float16"), "attention.dtype"),  # same page size as bfloat16
        (lambda s: s.with_dtypes(conv_dtype="float16"), "state.conv_dtype"),
        (lambda s: s.with_num_spec(2), "state.num_spec"),
    ],
)
def test_real_spec_pairs_that_differ_in_one_field(edit, field):
    spec = load_spec("nemotron-h-8b")
    pre = RankLayout(spec, 2, 0, "DS", "HND")
    dec = RankLayout(edit(spec), 2, 0, "DS", "HND")
    with pytest.raises(ValueError, match=rf"\({field}: prefill"):
        check_fingerprints(pre.fingerprint(), dec.fingerprint())


def test_kv_layout_differs_on_real_layouts():
    spec = load_spec("qwen3.5-27b")
    pre, dec = RankLayout(spec, 2, 0, "DS", "HND"), RankLayout(spec, 4, 0, "DS", "NHD")
    with pytest.raises(ValueError, match=r"kv_layout: prefill 'HND' vs decode 'NHD'"):
        check_fingerprints(pre.fingerprint(), dec.fingerprint())


def test_peer_layout_checks_tp_dependent_sizes():
    spec = load_spec("nemotron-h-8b")
    local = RankLayout(spec, 2, 0, "DS", "HND")
    peer_lay = RankLayout(spec, 4, 1, "DS", "HND")
    hello = {
        "fingerprint": peer_lay.fingerprint(),
        "tp_size": 4,
        "tp_rank": 1,
        "cache_block_size": 16,
        "block_size": peer_lay.block_size,
        "page_bytes": peer_lay.page_bytes + 16,
        "num_blocks": 8,
    }
    with pytest.raises(ValueError, match=r"decode page_bytes=\d+ but the model at TP 4 gives"):
        peer_layout(local, hello, "prefill", "decode")
