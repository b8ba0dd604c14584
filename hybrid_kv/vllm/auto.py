"""`HYBRID_KV_TRANSFER=auto` in the connector: per prefill engine, each decode rank chooses at handshake
between packing the recurrent state and vLLM's stock Mamba descriptors (`hybrid_kv.mover.choice`), and tells
each source rank it reads the stock way to stop staging for it. Inputs: `hybrid_kv_copy_gbps` (else measured
on this rank's staging at start-up) and `hybrid_kv_desc_cost_us` (else measured once per prefill engine on
this rank's NIXL agent, into a calibration area appended to its staging, outside the receive pool).
"""

from __future__ import annotations

from hybrid_kv.mover import log
from hybrid_kv.mover.choice import choose, nixl_desc_cost_us
from hybrid_kv.staging import messages as M


def decide(path, key: tuple[str, int], remote_tp: int, agent_name: str) -> None:
    """auto: decide once per prefill engine (`path`: the `PullPath`, on the handshake thread)."""
    link, cfg, w = path.links[key], path.cfg, path.w
    if key[0] not in path.auto and path.foreign(remote_tp):
        path.auto[key[0]] = {"reads": "packed", "why": "TP sizes do not divide: vLLM has no descriptors"}
    if key[0] not in path.auto:
        if cfg.desc_cost_us is not None:
            desc_us = cfg.desc_cost_us
        else:
            cal = (path.cal_addr, path.desc[2])
            desc_us = lambda: nixl_desc_cost_us(
                w.nixl_wrapper, w.nixl_memory_type, cal, link.peer["staging"], agent_name
            )
        try:
            choice = choose(path.geom, path.plans, remote_tp, desc_us, path.copy_gbps, cfg.auto_concurrency)
        except Exception as e:  # packing is exact for every pair: the safe choice when unsure
            choice = {"reads": "packed", "why": f"cost model failed ({type(e).__name__}: {e})"}
        path.auto[key[0]] = choice
        log.info("hybrid-kv auto: state from engine %s read %s: %s", key[0], choice["reads"], choice["why"])
    if path.auto[key[0]]["reads"] == "stock":
        try:
            link.call({"type": M.MODE, "part": None}, M.MODE_OK)
        except Exception as e:  # the source's staged copies expire with their lease
            log.warning("hybrid-kv: could not tell prefill rank %d to stop staging: %s", key[1], e)
