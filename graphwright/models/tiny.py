"""Seeded random-initialised tiny models, one per architecture family, for fast exact tests.

Each is 2 layers (MoE: 2 layers, 4 experts, top-2), hidden 64, grouped-query attention where
the architecture has it, a 256-token vocabulary. Weights come from ``torch.manual_seed`` so
every machine builds the same model; ``initializer_range`` is raised so logits are peaked and
greedy decoding is not decided by float noise.
"""

from __future__ import annotations

import torch

_COMMON = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
               initializer_range=0.2, bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)


def _configs():
    import transformers as tf

    moe = dict(num_local_experts=4, num_experts_per_tok=2)
    return {
        "tiny-llama": (tf.LlamaConfig, _COMMON),
        "tiny-mistral": (tf.MistralConfig, {**_COMMON, "sliding_window": 16}),
        "tiny-qwen2": (tf.Qwen2Config, {**_COMMON, "use_sliding_window": False}),
        "tiny-phi3": (tf.Phi3Config, {**_COMMON, "num_key_value_heads": 4, "sliding_window": None}),
        "tiny-gpt2": (tf.GPT2Config, dict(vocab_size=256, n_embd=64, n_layer=2, n_head=4, n_positions=1024,
                                          initializer_range=0.2, bos_token_id=1, eos_token_id=2, pad_token_id=0)),
        "tiny-mixtral": (tf.MixtralConfig, {**_COMMON, **moe, "sliding_window": None}),
        "tiny-phimoe": (tf.PhimoeConfig, {**_COMMON, **moe, "sliding_window": None}),
        "tiny-qwen2moe": (tf.Qwen2MoeConfig, {**_COMMON, "num_experts": 4, "num_experts_per_tok": 2,
                                              "moe_intermediate_size": 64, "shared_expert_intermediate_size": 96,
                                              "decoder_sparse_step": 1, "use_sliding_window": False}),
        # Gemma-3: a sliding (local, RoPE base 1e4, window 8) and a global layer (RoPE base 1e6): two
        # rotary tables; per-head q/k RMSNorm (weight + 1); embeddings scaled by sqrt(hidden)
        "tiny-gemma3": (tf.Gemma3TextConfig, {**_COMMON, "head_dim": 16, "sliding_window": 8,
                                              "layer_types": ["sliding_attention", "full_attention"],
                                              "query_pre_attn_scalar": 16,
                                              "rope_parameters": {
                                                  "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                                                  "full_attention": {"rope_type": "default", "rope_theta": 1000000.0}}}),
        # Qwen3: per-head q/k RMSNorm before RoPE (weight * x), head_dim set apart from hidden / heads
        "tiny-qwen3": (tf.Qwen3Config, {**_COMMON, "head_dim": 16, "use_sliding_window": False}),
    }


TINY_MODELS = ("tiny-llama", "tiny-mistral", "tiny-qwen2", "tiny-phi3", "tiny-gpt2", "tiny-mixtral", "tiny-phimoe", "tiny-qwen2moe",
               "tiny-gemma3", "tiny-qwen3")


def tiny_model(name: str, dtype: torch.dtype | None = None, seed: int = 0):
    """Build the named tiny model (eval mode); the same seed gives the same weights everywhere."""
    from transformers import AutoModelForCausalLM

    config_cls, kwargs = _configs()[name]
    config = config_cls(**kwargs)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        if name in ("tiny-gemma3", "tiny-qwen3"):  # norms start at the identity (Gemma: 1 + 0): make them matter
            centre = 0.0 if name == "tiny-gemma3" else 1.0
            with torch.no_grad():
                for pname, p in model.named_parameters():
                    if pname.endswith("norm.weight"):
                        p.normal_(centre, 0.2)
    if dtype is not None:
        model = model.to(dtype)
    return model.eval()
