"""The tests' byte comparison reports counts and offsets, never the tensors."""

import numpy as np
import pytest
import torch
from bytecheck import assert_same_bytes, byte_diff


def test_reports_count_and_first_offsets_only():
    want = torch.zeros(1 << 20, dtype=torch.uint8)
    got = want.clone()
    got[[5, 70000, 999999]] = torch.tensor([1, 2, 3], dtype=torch.uint8)
    assert byte_diff(got, want) == "3 of 1048576 bytes differ, first at byte offsets [5, 70000, 999999] " \
        "(got [1, 2, 3], want [0, 0, 0])"  # fmt: skip
    assert byte_diff(want.clone(), want) is None
    with pytest.raises(AssertionError) as e:
        assert_same_bytes(got, want, "decode rank 1")
    assert len(str(e.value)) < 200 and str(e.value).startswith("decode rank 1: 3 of 1048576")


def test_views_other_dtypes_and_arrays_as_bytes():
    a = np.arange(4, dtype=np.int32)
    b = a.copy()
    b[1] = 1 + (1 << 8)  # the second byte of element 1 differs (little-endian)
    assert byte_diff(torch.from_numpy(b), a) == "1 of 16 bytes differ, first at byte offsets [5] (got [1], want [0])"
    assert byte_diff(np.zeros(3, np.uint8), np.zeros(4, np.uint8)) == "3 bytes, 4 expected"
    t = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    assert byte_diff(t.t(), t.t().contiguous()) is None  # a strided view compares by its elements' order
