"""The auto mode's choice, per prefill engine, on each decode rank: pack the recurrent state, or let the
engine's stock Mamba descriptors move it (3 conv + 1 SSM per layer per block per source rank; Mamba1 1 + 1),
with the cost model both shells share (`hybrid_kv.staging.cost`).

- Packed whenever the stock descriptors would move wrong bytes or cannot run: an SD conv layout, or
  replicated Mamba2 B/C groups at different TP sizes (reference §4). Correctness is never traded for speed.
- Otherwise packed only if the descriptors saved cost more than the two copies of the state bytes at the
  source's load (every decode rank of this engine reading from it, `concurrency` requests each). No round
  trip is charged: after warm-up the source pushes what it staged.
- The per-descriptor cost, unless configured, is measured once per prefill engine (`nixl_desc_cost_us`):
  256 x 4 KiB READs against one 1 MiB READ from that rank's registered staging into a calibration area
  outside the receive pool.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from hybrid_kv.layout import RankLayout
from hybrid_kv.mover.geometry import StateGeometry
from hybrid_kv.mover.plans import AnyTPPlans
from hybrid_kv.spec import ModelSpec
from hybrid_kv.staging.chunk import state_chunk
from hybrid_kv.staging.cost import CAL_BYTES, desc_cost_us, packing_pays

CAL_TIMEOUT_S = 10.0


def stock_problem(spec: ModelSpec, conv_layout: str, prefill_tp: int, decode_tp: int) -> str | None:
    """Why the stock Mamba descriptors would not move this pair's state byte-exact (None: they would)."""
    if conv_layout != "DS":
        return f"the conv state layout is {conv_layout}, which vLLM's 3-read refuses"
    if prefill_tp != decode_tp:
        for tp in (prefill_tp, decode_tp):
            rep = [p.sub.name for p in RankLayout(spec, tp, 0, conv_layout).conv_parts if p.shard.replicated]
            if rep:
                return (
                    f"conv sub-projections {'|'.join(rep)} are replicated at TP {tp} and the TP sizes differ "
                    f"({prefill_tp} -> {decode_tp}): the stock 3-read misreads them"
                )
    return None


def stock_descriptors_per_layer(spec: ModelSpec) -> int:
    return 2 if spec.state.kind.value == "mamba1" else 4


def nixl_desc_cost_us(nx, mem: str, cal: tuple[int, int], peer_staging: tuple[int, int, int], agent: str) -> float:
    """Per-descriptor cost of READs from a prefill rank's registered staging (`agent`'s) into this rank's
    calibration area `cal` (address, device), on NIXL agent `nx`."""
    base, dev = cal
    p_addr, p_size, p_dev = (int(x) for x in peer_staging)
    if p_size < CAL_BYTES:
        raise ValueError(f"prefill staging of {p_size} B is below the {CAL_BYTES}-byte calibration READ")

    def timed(n: int, size: int) -> float:
        local = nx.get_xfer_descs([(base + i * size, size, dev) for i in range(n)], mem)
        remote = nx.get_xfer_descs([(p_addr + i * size, size, p_dev) for i in range(n)], mem)
        t = time.perf_counter()
        handle = nx.initialize_xfer("READ", local, remote, agent)
        try:
            nx.transfer(handle)
            while (state := nx.check_xfer_state(handle)) == "PROC":
                if time.perf_counter() - t > CAL_TIMEOUT_S:
                    raise TimeoutError(f"calibration READ did not complete within {CAL_TIMEOUT_S:g} s")
            if state != "DONE":
                raise RuntimeError(f"calibration READ ended {state}")
            return time.perf_counter() - t
        finally:
            nx.release_xfer_handle(handle)

    return desc_cost_us(timed)


def choose(geom: StateGeometry, plans: AnyTPPlans, remote_tp: int, desc_us: float | Callable[[], float],
           copy_gbps: float, concurrency: int) -> dict:  # fmt: skip
    """This decode rank's choice for a prefill engine at `remote_tp`: {"reads": "packed" | "stock", "why",
    inputs}. `desc_us`: the per-descriptor cost, or how to measure it (only called where the cost decides)."""
    spec, world, rank = geom.layout.spec, geom.layout.tp_size, geom.layout.tp_rank
    problem = stock_problem(spec, geom.layout.conv_layout, remote_tp, world)
    if problem is not None:
        return {"reads": "packed", "why": problem}
    cost = {"desc_cost_us": float(desc_us() if callable(desc_us) else desc_us), "copy_gbps": float(copy_gbps)}
    blocks = {g: [0] for g in geom.groups}  # a request's state: one block per Mamba group
    saved = nbytes = 0
    for p in plans.sources(remote_tp, world)[rank]:
        chunk = state_chunk(plans.pair(remote_tp, world, p, rank), geom, blocks, "decode", plans.shapes)
        saved += len(geom.layers) * stock_descriptors_per_layer(spec) - len(chunk.unit_bytes)
        nbytes += sum(chunk.unit_bytes)
    load = max(1, world // remote_tp) * concurrency
    pays = packing_pays(saved, nbytes, cost, load)
    why = (
        f"{saved} descriptors x {cost['desc_cost_us']:.3g} us saved vs 2 copies of {nbytes} B at "
        f"{cost['copy_gbps']:.3g} GB/s x load {load}"
    )
    return {"reads": "packed" if pays else "stock", "why": why, **cost, "descs_saved": saved, "nbytes": nbytes}
