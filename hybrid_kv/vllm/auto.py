"""`HYBRID_KV_TRANSFER=auto` in the connector: per prefill engine, each decode rank chooses at handshake
between packing the recurrent state and vLLM's stock Mamba descriptors (3 conv + 1 SSM per layer per
block per source rank; Mamba1 1 + 1), with the cost model both shells share (`hybrid_kv.staging.cost`).

- Packed whenever the stock path would move wrong bytes or cannot run: an SD conv layout, or replicated
  Mamba2 B/C groups at different TP sizes (reference §4). Correctness is never traded for speed.
- Otherwise packed only if the descriptors saved cost more than the two copies of the state bytes at
  the source's load (every decode rank of this engine reading from it, `hybrid_kv_auto_concurrency`
  requests each). No round trip is charged: after warm-up the source pushes what it staged.
- Inputs: `hybrid_kv_copy_gbps` (else measured on this rank's staging at start-up) and
  `hybrid_kv_desc_cost_us` (else measured once per prefill engine: 256 x 4 KiB READs against one 1 MiB
  READ from that rank's registered staging into a calibration area outside the receive pool).
"""

from __future__ import annotations

import time

from hybrid_kv.layout import RankLayout
from hybrid_kv.mover import log
from hybrid_kv.spec import ModelSpec
from hybrid_kv.staging import messages as M
from hybrid_kv.staging.chunk import state_chunk
from hybrid_kv.staging.cost import CAL_DESCS, CAL_SIZE, desc_cost_us, packing_pays

CAL_BYTES = CAL_DESCS * CAL_SIZE  # the calibration area appended to the decode rank's staging
CAL_TIMEOUT_S = 10.0


def stock_problem(spec: ModelSpec, conv_layout: str, prefill_tp: int, decode_tp: int) -> str | None:
    """Why vLLM's stock Mamba descriptors would not move this pair's state byte-exact (None: they would)."""
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


def measure_desc_cost_us(path, agent_name: str, peer_staging: tuple[int, int, int]) -> float:
    """Per-descriptor cost of READs from the prefill rank's staging (`agent_name`) into the calibration area."""
    nx, mem = path.w.nixl_wrapper, path.w.nixl_memory_type
    base, dev = path.cal_addr, path.desc[2]
    p_addr, p_size, p_dev = (int(x) for x in peer_staging)
    if p_size < CAL_BYTES:
        raise ValueError(f"prefill staging of {p_size} B is below the {CAL_BYTES}-byte calibration READ")

    def timed(n: int, size: int) -> float:
        local = nx.get_xfer_descs([(base + i * size, size, dev) for i in range(n)], mem)
        remote = nx.get_xfer_descs([(p_addr + i * size, size, p_dev) for i in range(n)], mem)
        t = time.perf_counter()
        handle = nx.initialize_xfer("READ", local, remote, agent_name)
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


def choose(path, remote_tp: int, agent_name: str, peer_staging: tuple[int, int, int]) -> dict:
    """The decode rank's choice for one prefill engine (`path`: its `PullPath`): {"reads": "packed" |
    "stock", "why", inputs}."""
    geom, plans, cfg = path.geom, path.plans, path.cfg
    spec, world, rank = geom.layout.spec, geom.layout.tp_size, geom.layout.tp_rank
    problem = stock_problem(spec, geom.layout.conv_layout, remote_tp, world)
    if problem is not None:
        return {"reads": "packed", "why": problem}
    desc_us = cfg.desc_cost_us
    if desc_us is None:
        desc_us = measure_desc_cost_us(path, agent_name, peer_staging)
    cost = {"desc_cost_us": float(desc_us), "copy_gbps": float(path.copy_gbps)}
    blocks = {g: [0] for g in geom.groups}  # a request's state: one block per Mamba group
    saved = nbytes = 0
    for p in plans.sources(remote_tp, world)[rank]:
        chunk = state_chunk(plans.pair(remote_tp, world, p, rank), geom, blocks, "decode", plans.shapes)
        saved += len(geom.layers) * stock_descriptors_per_layer(spec) - len(chunk.unit_bytes)
        nbytes += sum(chunk.unit_bytes)
    load = max(1, world // remote_tp) * cfg.auto_concurrency
    pays = packing_pays(saved, nbytes, cost, load)
    why = (
        f"{saved} descriptors x {cost['desc_cost_us']:.3g} us saved vs 2 copies of {nbytes} B at "
        f"{cost['copy_gbps']:.3g} GB/s x load {load}"
    )
    return {"reads": "packed" if pays else "stock", "why": why, **cost, "descs_saved": saved, "nbytes": nbytes}


def decide(path, key: tuple[str, int], remote_tp: int, agent_name: str) -> None:
    """auto: decide once per prefill engine (on the handshake thread); tell each of its ranks that
    reads the stock way to stop staging for this rank."""
    link = path.links[key]
    if key[0] not in path.auto and path.foreign(remote_tp):
        path.auto[key[0]] = {"reads": "packed", "why": "TP sizes do not divide: vLLM has no descriptors"}
    if key[0] not in path.auto:
        try:
            choice = choose(path, remote_tp, agent_name, link.peer["staging"])
        except Exception as e:  # packing is exact for every pair: the safe choice when unsure
            choice = {"reads": "packed", "why": f"cost model failed ({type(e).__name__}: {e})"}
        path.auto[key[0]] = choice
        log.info("hybrid-kv auto: state from engine %s read %s: %s", key[0], choice["reads"], choice["why"])
    if path.auto[key[0]]["reads"] == "stock":
        try:
            link.call({"type": M.MODE, "part": None}, M.MODE_OK)
        except Exception as e:  # the source's staged copies expire with their lease
            log.warning("hybrid-kv: could not tell prefill rank %d to stop staging: %s", key[1], e)
