"""`RowUpload`: the slot rows reach the device exactly, host buffers are rewritten only after the copy out of
them completed, and a launch never waits when every buffer is still being read. CUDA events cannot run on
this machine: `Ev` stands in for them (recorded = pending until `done()`); the `cuda` test runs the real ones."""

import numpy as np
import pytest
import torch

from hybrid_kv.staging.upload import RowUpload


class Ev:
    def __init__(self) -> None:
        self.pending = False

    def record(self, stream) -> None:
        self.pending = True

    def query(self) -> bool:
        return not self.pending

    def done(self) -> None:
        self.pending = False


def _rows(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 1 << 40, size=(n, 5), dtype=np.int64)


def test_rows_arrive_exactly_and_buffers_are_reused_in_turn():
    up = RowUpload(torch.device("cpu"), None, buffers=2, rows=8, pin=False, event=Ev)
    host_ids = [id(h[0]) for h in up._host]
    for k, n in enumerate([3, 8, 1, 5]):
        rows = _rows(n, k)
        dev = up(rows)
        assert np.array_equal(dev.numpy(), rows)
        up._events[k % 2].done()  # the copy out of buffer k % 2 completed
    assert up.fallbacks == 0 and [id(h[0]) for h in up._host] == host_ids  # no allocation per launch


def test_a_buffer_still_being_read_is_not_rewritten_and_nothing_waits():
    up = RowUpload(torch.device("cpu"), None, buffers=2, rows=8, pin=False, event=Ev)
    first, second = _rows(4, 1), _rows(4, 2)
    up(first)
    up(second)  # both buffers now pending
    before = [h[1].copy() for h in up._host]
    third = _rows(6, 3)
    dev = up(third)
    assert np.array_equal(dev.numpy(), third) and up.fallbacks == 1
    assert all(np.array_equal(h[1], b) for h, b in zip(up._host, before))  # pending buffers untouched
    assert np.array_equal(up._host[0][1][:4], first)
    up._events[0].done()
    up(_rows(2, 4))
    assert up.fallbacks == 1  # buffer 0 free again: used, no one-off copy


def test_more_rows_than_the_buffers_hold():
    up = RowUpload(torch.device("cpu"), None, buffers=2, rows=4, pin=False, event=Ev)
    rows = _rows(37, 5)
    assert np.array_equal(up(rows).numpy(), rows)
    assert len(up._dev) >= 37 and len(up._host[0][0]) >= 37


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_rows_arrive_on_the_gpu_stream_in_order():
    stream = torch.cuda.Stream()
    up = RowUpload(torch.device("cuda"), stream, buffers=2, rows=8)
    got = []
    with torch.cuda.stream(stream):
        for k, n in enumerate([3, 8, 20, 1, 5, 5, 5]):
            rows = _rows(n, k)
            got.append((rows, up(rows).clone()))  # the clone is queued on the stream behind the copy
    stream.synchronize()
    for rows, dev in got:
        assert np.array_equal(dev.cpu().numpy(), rows)
