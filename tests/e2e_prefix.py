"""The `prefix` scenario of `e2e_pd.py`: every engine serves with prefix caching on, as `vllm serve` does by
default (vLLM's mamba_cache_mode 'align'), and requests share prefixes, so both the prefill and the decode
engine hit their own caches:

- a 1100-token prompt, then three that extend it (1300, 1500, 1800 tokens) — the decode engine already
  holds the shared blocks (a partial hit): it receives only the blocks after them, plus the state;
- a block-aligned prompt twice (641 tokens: 640 moved, one block): the second time the decode engine holds
  every block, a full hit, and loads nothing (the prefill side is only told to free them);
- a second 1100-token prompt, then three that extend it sent as one batch.

The reference is one plain engine with prefix caching on, given the same requests in the same order and
batches. Checked per request: tokens (of the requests sent alone: a batch's steps depend on when each
load completes, and bf16 on CPU is not batch-invariant), and the pages each receive wrote against the
prefill pages resharded by the oracle (for requests received alone: no other page of the decode rank
changed, so nothing was written into a block another request shares); which requests loaded nothing; how
many KV blocks each decode already held."""

from __future__ import annotations

import random

from pd_check import check_request, group_ids, load


def prompts(seed: int = 0) -> tuple[list[list[int]], list[list[int]]]:
    """(prompts sent one at a time, in order; prompts sent as one batch after them)."""
    rng = random.Random(seed)

    def toks(n: int) -> list[int]:
        return [rng.randrange(1, 1000) for _ in range(n)]

    base, aligned, other = toks(1100), toks(641), toks(1100)
    alone = [base] + [base + toks(n - 1100) for n in (1300, 1500, 1800)] + [aligned, aligned, other]
    return alone, [other + toks(n - 1100) for n in (1300, 1500, 1800)]


def _held_kv_blocks(p_rec: dict, d_rec: dict) -> int:
    """KV blocks of the request that the decode engine's cache already held (not received)."""
    name = next(n for n, k in d_rec["kind"].items() if k == "attn")
    g = d_rec["group"][name]
    return len(p_rec["block_ids"][g]) - len(group_ids(d_rec["local_block_ids"], g))


def step(out: str, pool, keys, run_pd, n_new: int) -> dict:
    """One mode's requests on its P/D engines (`keys`: decode, prefill): the prompts alone, then the batch."""
    alone, batch = prompts()
    decode, prefill = (pool(k) for k in keys)
    res: dict = {"requests": [], "got": []}
    for p in alone:
        toks, info = run_pd(out, prefill, decode, [p], n_new, "alone")
        res["got"] += toks
        res["requests"] += info
    res["got_batch"], info = run_pd(out, prefill, decode, batch, n_new, "concurrent")
    res["requests"] += info
    return res


def check(model: str, out: str, res: dict) -> None:
    """Per received request: whether it loaded anything, the KV blocks the decode cache held, the byte check."""
    for rec in res["requests"]:
        if "error" in rec:
            continue
        p_recs, d_recs = load(out, rec["remote_request_id"])
        # a full local hit: vLLM's scheduler keeps the request running and binds no receive to report
        rec["loaded"] = bool(d_recs) and any(d_recs[0]["local_block_ids"])
        rec["problems"] = []
        if not d_recs:
            continue
        try:
            rec["held_kv_blocks"] = _held_kv_blocks(p_recs[0], d_recs[0])
            rec["problems"] = check_request(
                model, out, rec["remote_request_id"], rec["tag"] == "alone", prefix_hits=True
            )
        except (AssertionError, IndexError) as e:
            rec["problems"] = [f"{type(e).__name__}: {e}"]


def reference(llm, n_new: int) -> dict:
    """One plain engine with prefix caching (`llm`), the same requests in the same order and batches."""
    from e2e_runs import greedy, tokens

    alone, batch = prompts()
    want = [tokens(llm.generate([{"prompt_token_ids": p}], greedy(n_new), use_tqdm=False))[0] for p in alone]
    want_batch = tokens(llm.generate([{"prompt_token_ids": p} for p in batch], greedy(n_new), use_tqdm=False))
    return {"want": want, "want_batch": want_batch}
