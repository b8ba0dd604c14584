"""The packed-transfer core shared by both shells (the CLI rank processes and the vLLM connector).

* `pagemap`  - where each (layer, block) page of one rank sits in its backing buffer;
* `template` - static per (model, TP pair, block sizes, source, destination): the pieces of one slot,
  packed end to end, and the bounded memo that builds them once;
* `chunk`    - one request's slots for one pair: page offsets, staging offsets, transfer units;
* `copier`   - executes the chunks that are ready in one step in one launch per side (Triton, or the
  torch reference), on its own CUDA stream, validated before any byte is written;
* `pool`     - the leased, all-or-none staging slot pool;
* `mode`     - the one `HYBRID_KV_TRANSFER` / `--mode` parser;
* `handshake`- the page-fingerprint comparison both shells run before any descriptor exists;
* `messages` - the one side-channel vocabulary and the checks of every value a peer sends;
* `wire`     - the side channel's framing: bounded, deadline-checked reads and writes of one message;
* `auth`     - the side channel's shared-secret handshake;
* `cost`     - the `auto` mode's cost model and its calibration helpers.

Beyond `wire`'s framing of one message on a socket it is handed, nothing here does I/O: the shells own
their sockets and threads and post the NIXL transfers.
"""
