"""End to end on vLLM's CPU backend: a prefill engine and a decode engine (HybridKVConnector, NIXL/UCX on
DRAM) against a single engine, greedy, on a small Qwen3-Next-style GDN model with random weights saved as a
real checkpoint (so every engine loads the same weights). Prints one JSON line.

    python tests/e2e_pd.py MODEL_DIR [--mode packed|strided]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import sys
import time

SHAPE = dict(  # small dims vLLM's CPU GDN kernels accept (head dims 128)
    num_hidden_layers=4,
    hidden_size=256,
    intermediate_size=512,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=64,
    linear_num_key_heads=2,
    linear_num_value_heads=4,
    linear_key_head_dim=128,
    linear_value_head_dim=128,
    num_experts=4,
    num_experts_per_tok=2,
    moe_intermediate_size=128,
    shared_expert_intermediate_size=128,
    vocab_size=1024,
    max_position_embeddings=4096,
)


def make_checkpoint(path: str, seed: int = 0) -> None:
    """Random weights (transformers' own init, seeded) for the trimmed Qwen3-Next preset."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from hybrid_kv.spec_hf import load_config

    _, cfg = load_config("qwen3-next-80b-a3b")
    cfg.update(SHAPE)
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path), dtype=torch.bfloat16)
    model.save_pretrained(path)


def _port() -> int:
    rng = random.Random()
    while True:  # below the ephemeral range; the hybrid-kv port of rank 0 is base + 1
        base = rng.randrange(20000, 31000)
        try:
            for p in (base, base + 1):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", p))
            return base
        except OSError:
            continue


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--mode", default="packed")
    a = ap.parse_args()
    os.environ["VLLM_SSM_CONV_STATE_LAYOUT"] = "DS"
    os.environ["HYBRID_KV_TRANSFER"] = a.mode
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    other = a.model.rstrip("/") + "-other-weights"
    for path, seed in ((a.model, 0), (other, 1)):
        if not os.path.exists(os.path.join(path, "model.safetensors")):
            make_checkpoint(path, seed)

    from vllm import LLM, SamplingParams
    from vllm.config import KVTransferConfig

    common = dict(
        model=a.model,
        skip_tokenizer_init=True,
        max_model_len=2048,
        enforce_eager=True,
        enable_prefix_caching=False,
        async_scheduling=False,
        seed=0,
        max_num_seqs=4,
    )
    rng = random.Random(0)
    prompts = [[rng.randrange(1, 1000) for _ in range(n)] for n in (37, 300, 1100)]
    greedy = SamplingParams(max_tokens=16, temperature=0, detokenize=False, ignore_eos=True)
    t0 = time.time()

    def tokens(outs):
        return [list(o.outputs[0].token_ids) for o in outs]

    ref = LLM(**common)
    want = tokens(ref.generate([{"prompt_token_ids": p} for p in prompts], greedy, use_tqdm=False))
    ref.llm_engine.engine_core.shutdown()
    del ref

    def engine(role: str, model: str = a.model):
        os.environ["VLLM_NIXL_SIDE_CHANNEL_PORT"] = str(_port())
        kt = KVTransferConfig(
            kv_connector="HybridKVConnector",
            kv_connector_module_path="hybrid_kv.vllm",
            kv_role=role,
            kv_buffer_device="cpu",
            kv_connector_extra_config={
                "hybrid_kv_staging_bytes": 64 << 20,
                "hybrid_kv_port_offset": 1,
                # the control below pairs two checkpoints: vLLM's hash covers the model path, hybrid-kv's
                # own handshake still checks every dimension and dtype
                "enforce_handshake_compat": False,
            },
            kv_load_failure_policy="fail",  # a failed load must fail the request, not silently recompute
        )
        return LLM(**{**common, "model": model}, kv_transfer_config=kt)

    first = SamplingParams(
        max_tokens=1, temperature=0, detokenize=False, extra_args={"kv_transfer_params": {"do_remote_decode": True}}
    )

    def disaggregated(prefill, decode):
        p_outs = prefill.generate([{"prompt_token_ids": p} for p in prompts], first, use_tqdm=False)
        params = [o.kv_transfer_params for o in p_outs]
        got = []
        for p, kv in zip(prompts, params):
            sp = SamplingParams(
                max_tokens=16, temperature=0, detokenize=False, ignore_eos=True, extra_args={"kv_transfer_params": kv}
            )
            got += tokens(decode.generate([{"prompt_token_ids": p}], sp, use_tqdm=False))
        return got, params

    engines = [engine("kv_consumer"), engine("kv_producer")]
    decode = engines[0]
    try:
        got, params = disaggregated(engines[1], decode)
        # Control: a prefill engine with other weights. Its state is wrong for the decode engine's weights, so
        # the outputs must change, which shows the decode engine continued from transferred state.
        engines.append(engine("kv_producer", other))
        control, _ = disaggregated(engines[2], decode)
    finally:
        for llm in engines:  # engine-core and worker processes must not outlive this script
            llm.llm_engine.engine_core.shutdown()
    print(
        json.dumps(
            {
                "mode": a.mode,
                "match": got == want,
                "want": want,
                "got": got,
                "control_differs": control != want,
                "control": control,
                "prompt_tokens": [len(p) for p in prompts],
                "remote_tp": [kv["tp_size"] for kv in params],
                "seconds": round(time.time() - t0, 1),
            }
        ),
        flush=True,
    )
    sys.stdout.flush()


if __name__ == "__main__":
    main()
