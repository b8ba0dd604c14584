"""The state mover: what a serving engine's prefill and decode ranks run to move a request's recurrent
state (and, for TP sizes that do not divide, its attention KV) packed, independent of the engine.

- `geometry`: one rank's state and attention pages in the engine's backing allocation, a request's chunk;
- `sender`: a prefill rank's staging (all-or-none slots, the copy ordered after the step that wrote the
  pages, the lease, the `ready` it announces);
- `receiver`: a decode rank's receives (all-or-none receive slots, or one per unit as announced when they
  stream, each announcement checked against its own chunk, one scatter launch per step, a request reported
  only once its scatter completed);
- `pull_in`: a decode rank's announcements of a request (pushed unasked, or asked with `pack`), checked;
- `server` / `link`: the side channel's two ends (framing, auth, handshake, pack requests, grants);
- `grants`: push mode's receive slots as a prefill rank keeps them;
- `push_out` / `push_in`: push mode's two sides (a prefill rank's state WRITEs from the match to their end;
  a decode rank's grants in arrival order, what landed, when a request can fail);
- `choice`: the auto mode's per-engine choice between packing and the engine's stock descriptors.

No module here imports an engine: `hybrid_kv.vllm` adapts vLLM's NIXL workers to these objects. Log lines go
to the "vllm.hybrid_kv" logger, so a vLLM engine prints them with its own.
"""

import logging

log = logging.getLogger("vllm.hybrid_kv")
