"""The one side-channel vocabulary (`hybrid_kv.staging.messages`): every peer value checked, on
hand-built messages; both shells' tests cover the same checks on the wire."""

import pytest

from hybrid_kv.staging import messages as M

SIZES = [100, 100, 40]  # the receiver's own plan: three units
STAGING = 1000


def test_ready_round_trips_through_its_check():
    msg = M.ready("r1", [(2, 960, 40), (0, 0, 100)], 12.5, {3: [7, 8]})
    assert msg == {
        "type": "ready",
        "req": "r1",
        "units": [[2, 960, 40], [0, 0, 100]],
        "until": 12.5,
        "blocks": [[3, [7, 8]]],
    }
    assert M.ready_units(msg, SIZES, STAGING, "p0") == [(2, 960, 40), (0, 0, 100)]
    assert M.blocks_of(msg["blocks"]) == {3: [7, 8]}


@pytest.mark.parametrize(
    "units",
    [
        [[0, 0, 101]],  # not the planned size
        [[3, 0, 40]],  # no such unit
        [[-1, 0, 40]],
        [[2, 961, 40]],  # ends past the staging
        [[2, -1, 40]],
        [[0, 0, 100], [0, 100, 100]],  # announced twice
        [[0, 0, 100], [1, 100, 100], [2, 200, 40], [2, 300, 40]],  # more entries than units
        [[0, "0", 100]],
        [[0, 0, True]],
        [[0, 0]],
        [],
        None,
        "units",
    ],
)
def test_ready_units_refuses_what_the_plan_does_not_hold(units):
    with pytest.raises(ValueError, match=r"p0 announced units=.*which its plan for this rank does not hold"):
        M.ready_units({"type": "ready", "req": "r", "units": units}, SIZES, STAGING, "p0")


def test_part_request_id_blocks():
    assert M.part(None) is None
    assert M.part(["all", 0]) == ("all", 0)
    assert M.part(["small", 4096]) == ("small", 4096)
    for bad in ("all", ["all", 5], ["small", -1], ["small", 1 << 41], ["big", 0], ["small", 1.5], ["small", True]):
        with pytest.raises(ValueError, match="mode part="):
            M.part(bad)
    assert M.request_id("x" * 512) == "x" * 512
    for bad in ("", "x" * 513, 7, None, ["r"]):
        with pytest.raises(ValueError, match="request id"):
            M.request_id(bad)
    for bad in ([[0, [1.0]]], [[0, 1]], [["0", [1]]], {"0": [1]}, [[0, [True]]]):
        with pytest.raises(ValueError, match="blocks="):
            M.blocks_of(bad)


def test_lease_clock_maps_deadlines_never_late():
    """The peer read its clock (100.0) somewhere between our send (5.0) and receipt (5.2): its 130.0 is
    at the earliest our 35.0 (offset 95.0, the largest the exchange allows)."""
    clock = M.LeaseClock(100.0, 5.0, 5.2)
    assert clock.local(130.0) == 35.0
    for bad in (None, "1", True, float("nan"), float("inf"), float("-inf")):  # json.loads admits NaN
        with pytest.raises(ValueError, match="peer clock reading"):
            M.LeaseClock(bad, 5.0, 5.2)
        with pytest.raises(ValueError, match="lease deadline"):
            clock.local(bad)


def test_one_lease_fence_for_both_shells():
    """A READ of bytes leased until the peer's 130.0 (our 35.0) counts only if it completes by a quarter of
    the lease before that: 30 s of a 120 s lease, 0.05 s of a 0.2 s one."""
    clock = M.LeaseClock(100.0, 5.0, 5.2)
    assert clock.read_by(130.0, 120.0) == 5.0
    assert clock.read_by(130.0, 0.2) == pytest.approx(34.95)
    assert M.lease_seconds(86400, "w") == 86400.0 and M.lease_seconds(1e-3, "w") == 1e-3  # the limits kept
    for bad in (0, -1, 86400.001, True, "30", None, float("nan")):
        with pytest.raises(ValueError, match=r"w: lease_s=.* \(accepted: seconds in \(0, 86400\]\)"):
            M.lease_seconds(bad, "w")


def test_wait_readable_past_descriptor_1024():
    """A serving process holds thousands of descriptors (every NIXL agent's UCX endpoints); select() refuses
    any numbered 1024 or more ("filedescriptor out of range"), which failed a 4 -> 6 handshake once. The
    side channels wait with poll: a socket numbered above 1024 still reports data, and a quiet one times out."""
    import os
    import resource
    import socket

    from hybrid_kv.staging.wire import wait_readable

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 1100:
        pytest.fail(f"this machine allows {hard} open files; the test needs 1100")
    if soft < 1100:
        resource.setrlimit(resource.RLIMIT_NOFILE, (1100 if hard == resource.RLIM_INFINITY else min(hard, 4096), hard))
    filler = [os.dup(0)]
    while filler[-1] < 1030:  # every lower number taken (dup takes the lowest free one)
        filler.append(os.dup(0))
    a, b = socket.socketpair()
    try:
        assert a.fileno() >= 1024
        assert not wait_readable(a, 0.05)
        b.sendall(b"x")
        assert wait_readable(a, 5.0)
    finally:
        a.close()
        b.close()
        for fd in filler:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
