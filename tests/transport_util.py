"""Small real-model configs (fewer layers, real dims) written to disk for rank processes to load."""

import json
import queue
import threading
from pathlib import Path

from hybrid_kv.spec_hf import load_config

# A Granite-4.0-H-style model whose dims shard over 2, 3 and 6 (n_groups = 1: B/C replicated).
GRANITE_236 = {
    "architectures": ["GraniteMoeHybridForCausalLM"],
    "torch_dtype": "bfloat16",
    "hidden_size": 768,
    "num_attention_heads": 12,
    "num_key_value_heads": 6,
    "layer_types": ["mamba", "attention", "mamba"],
    "mamba_n_heads": 12,
    "mamba_d_head": 32,
    "mamba_n_groups": 1,
    "mamba_d_state": 64,
    "mamba_d_conv": 4,
    "mamba_expand": 2,
}


def trim_kimi(cfg: dict, n: int) -> None:
    """Kimi-Linear's first `n` layers, its 3:1 pattern kept (1-based layer lists, as published)."""
    cfg["num_hidden_layers"] = n
    lac = cfg["linear_attn_config"]
    lac["kda_layers"] = [i for i in lac["kda_layers"] if i <= n]
    lac["full_attn_layers"] = [i for i in lac["full_attn_layers"] if i <= n]


def small_config(tmp_path: Path, name: str) -> str:
    if name == "granite-236":
        cfg = dict(GRANITE_236)
    else:
        _, cfg = load_config(name)
        cfg = json.loads(json.dumps(cfg))
        if name.startswith("qwen3.5"):
            cfg["text_config"]["layer_types"] = ["linear_attention"] * 3 + ["full_attention"]
            cfg["text_config"]["num_hidden_layers"] = 4
        elif name.startswith("nemotron"):
            cfg["hybrid_override_pattern"] = "M-M*"
        elif name.startswith("falcon"):
            cfg["num_hidden_layers"] = 2
        elif name.startswith("jamba"):
            cfg["num_hidden_layers"] = 6  # attention at layer 4
        elif name.startswith("kimi"):
            trim_kimi(cfg, 4)  # 3 KDA then MLA
    path = tmp_path / name
    path.mkdir(exist_ok=True)
    (path / "config.json").write_text(json.dumps(cfg))
    return str(path)


def sides(tmp_path: Path, ptp: int, dtp: int, requests: int, tokens: int, seed: int, model: str = "falcon-h1-0.5b"):
    """Prefill and decode SideConfigs of a small real model, each sized for `requests` random requests of
    `tokens` tokens (the Cluster's own plan), and those requests."""
    from dataclasses import replace

    from hybrid_kv.transport.common import SideConfig
    from hybrid_kv.transport.launch import TransferJob, plan_requests

    path = small_config(tmp_path, model)
    job = TransferJob(SideConfig(path, ptp, 1), SideConfig(path, dtp, 1), requests=requests, tokens=tokens, seed=seed)
    _, reqs, nbp, nbd = plan_requests(job)
    return replace(job.prefill, num_blocks=nbp), replace(job.decode, num_blocks=nbd), reqs


def assert_no_leaks(counts: dict) -> None:
    """Every rank's counts after shutdown: nothing registered, no remote agent, handle or slot held."""
    for who, c in counts.items():
        held = {k: c[k] for k in ("registrations", "remote_agents", "xfer_handles", "staging_slots") if c.get(k)}
        assert not held, f"{who} still holds {held}"


class LoopSource:
    """A prefill endpoint whose event loop runs on a thread; commands run on that thread too."""

    def __init__(self, cfg, rank: int = 0, **opts) -> None:
        from hybrid_kv.transport.prefill import PrefillEndpoint, PrefillOptions

        self.ep = PrefillEndpoint(cfg, rank, PrefillOptions(**{"pool_bytes": 64 << 20, **opts}))
        self.cmds: queue.Queue = queue.Queue()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        while not self.stop.is_set():
            while not self.cmds.empty():
                fn, done = self.cmds.get()
                fn()
                done.set()
            self.ep.step(0.002)

    def call(self, fn) -> None:
        done = threading.Event()
        self.cmds.put((fn, done))
        assert done.wait(30)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(10)
        self.ep.close()
