"""The prefill/decode engine pair the connector tests run on (vLLM's own objects, real NIXL agents);
its fixtures (`pairs`, `ds_layout`) are in conftest.py."""

from __future__ import annotations

import random
import time

import vllm_steps as S
import vllm_util as U
from bytecheck import assert_same_bytes


class Pair:
    """A prefill and a decode engine with `n` requests filled on P (and their expected D bytes)."""

    def __init__(
        self,
        tmp,
        monkeypatch,
        name,
        ptp,
        dtp,
        mode,
        *,
        n=2,
        p_extra=None,
        d_extra=None,
        d_edit=None,
        d_cache=None,
        p_cache=None,
        spec=None,
        push=False,
        edit=None,
    ):
        monkeypatch.setenv("HYBRID_KV_TRANSFER", mode)
        self.engines = []
        self.push = push  # HybridKVPushConnector on both engines (the prefill WRITEs)
        path = U.model_dir(tmp, name, edit)  # `edit`: config changes for both engines (`d_edit`: decode only)
        self.spec = spec  # a speculative_config for both engines
        self.p = self._engine(path, name, ptp, "prefill", p_extra, p_cache)
        d_path = U.model_dir(tmp / "decode", name, (lambda c: (edit and edit(c), d_edit(c)))) if d_edit else path
        self.d = self._engine(d_path, name, dtp, "decode", d_extra, d_cache)
        p_free, d_free = list(range(self.p.kcc.num_blocks)), list(range(self.d.kcc.num_blocks))
        random.Random(1).shuffle(p_free)
        random.Random(2).shuffle(d_free)
        # interleaved block ids, different lengths
        self.reqs = [S.make_request(f"req{i}", self.p, self.d, 90 + 700 * i, p_free, d_free, i) for i in range(n)]
        for r, buf in enumerate(S.fill(self.p, self.reqs, "prefill", 11)):
            self.p.storage(r).copy_(buf)
        self.background = S.fill(self.d, [], "decode", 12)
        for r, buf in enumerate(self.background):
            self.d.storage(r).copy_(buf)

    def _engine(self, path, name, tp, eid, extra, cache):
        eng = U.build_engine(path, name, tp, eid, extra=extra, cache=cache, spec=self.spec, push=self.push)
        self.engines.append(eng)
        return eng

    def expected(self):
        return S.fill(self.d, self.reqs, "decode", 12)

    def run(self, timeout=60.0):
        ids = {q.req_id for q in self.reqs}
        S.submit(self.p, self.d, self.reqs, self.push)
        return S.run_until(self.p.conns, self.d.conns, ids, {S.p_id(i) for i in ids}, timeout)

    def run_failing(self, timeout=30.0):
        """Requests expected to fail on every decode rank: returns each rank's failed set."""
        ids = {q.req_id for q in self.reqs}
        S.submit(self.p, self.d, self.reqs, self.push)
        _, failed, _ = S.run_until(self.p.conns, self.d.conns, ids, set(), timeout)
        return failed

    def telemetry_descriptors(self) -> list[int]:
        return [sum(c.connector_worker.xfer_stats.data["num_descriptors"]) for c in self.d.conns]

    def wait_no_leaks(self, timeout=10.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            leaks = [c.connector_worker.hkv.leaks() for c in (*self.p.conns, *self.d.conns)]
            if all(v == 0 for lk in leaks for v in lk.values()):
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"staging leaks after the transfers: {leaks}")
            time.sleep(0.01)

    def close(self):
        while self.engines:
            self.engines.pop().shutdown()


def assert_exact(pair: Pair) -> None:
    for r, want in enumerate(pair.expected()):
        assert_same_bytes(pair.d.storage(r), want, f"decode rank {r} against the oracle")


def _server(pair: Pair):
    w = pair.p.conns[0].connector_worker
    return w, w.hkv.server


def _hello(pair: Pair) -> dict:
    fp = pair.d.conns[0].connector_worker.hkv.geom.fingerprint()
    return {"type": "hello", "fingerprint": fp, "tp_size": 1, "tp_rank": 0}


def assert_untouched(pair: Pair) -> None:
    for r in range(pair.d.tp):
        assert_same_bytes(pair.d.storage(r), pair.background[r], f"decode rank {r} pages were written")
