"""Upcycle a dense Llama-architecture model into a Mixtral-style MoE with the same function.

Every expert is a copy of the layer's MLP and the router is seeded random, so for any routing
the top-2 renormalised weights sum to 1 and the MoE computes (w1 + w2) * MLP(x) = MLP(x): its
logits equal the dense model's up to float rounding, which makes it an exact reference for
fused-MoE rewrites *with real activations*.
"""

from __future__ import annotations

import torch


def upcycle_to_mixtral(dense, num_experts: int = 4, top_k: int = 2, seed: int = 0):
    from transformers import MixtralConfig, MixtralForCausalLM

    c = dense.config
    if c.model_type != "llama":
        raise ValueError(f"upcycling needs a Llama-architecture model; got model_type={c.model_type!r}")
    cfg = MixtralConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads, head_dim=getattr(c, "head_dim", None),
        max_position_embeddings=c.max_position_embeddings, rms_norm_eps=c.rms_norm_eps,
        rope_parameters=getattr(c, "rope_parameters", None), tie_word_embeddings=c.tie_word_embeddings,
        bos_token_id=c.bos_token_id, eos_token_id=c.eos_token_id, pad_token_id=c.pad_token_id,
        num_local_experts=num_experts, num_experts_per_tok=top_k, sliding_window=None, hidden_act=c.hidden_act,
    )
    dtype = next(dense.parameters()).dtype
    with torch.device("meta"):
        moe = MixtralForCausalLM(cfg)
    moe = moe.to_empty(device="cpu").to(dtype)
    sd = {}
    gen = torch.Generator().manual_seed(seed)
    for name, t in dense.state_dict().items():
        if ".mlp." not in name:
            sd[name] = t
    for i, layer in enumerate(dense.model.layers):
        mlp = layer.mlp
        gate_up = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight], dim=0)
        p = f"model.layers.{i}.mlp."
        sd[p + "experts.gate_up_proj"] = gate_up[None].expand(num_experts, *gate_up.shape).clone()
        sd[p + "experts.down_proj"] = mlp.down_proj.weight[None].expand(num_experts, *mlp.down_proj.weight.shape).clone()
        sd[p + "gate.weight"] = (torch.randn(num_experts, c.hidden_size, generator=gen) * 0.02).to(dtype)
    missing, unexpected = moe.load_state_dict(sd, strict=False)
    missing = [m for m in missing if not (cfg.tie_word_embeddings and m == "lm_head.weight")]
    if missing or unexpected:
        raise RuntimeError(f"upcycling mismatch: missing={missing} unexpected={unexpected}")
    if cfg.tie_word_embeddings:
        moe.tie_weights()
    # rotary inv_freq is a non-persistent buffer: recompute it on the real device
    moe.model.rotary_emb.__init__(cfg)
    return moe.eval()
