"""Does running graphwright in a process slow HF ``generate()`` in that same process?

Usage: python bench/hf_in_process.py identity "h2o(heavy=32, recent=32)"

HF decode tokens/s (256-token prompt, 64 new tokens, two runs each) before anything is compiled, after
each recipe is compiled, and after that recipe's own generate. Run it on a quiet machine; it checks the
question behind ``bench_decode.py`` comparing ratios only inside one process (session 8: no slowdown).
"""

import sys
import time

import torch

import graphwright as gw


def main(recipes):
    torch.set_num_threads(2)
    model, tok = gw.load_model("smollm2-135m")
    model.eval()
    ids = torch.randint(100, 1000, (1, 256), generator=torch.Generator().manual_seed(0))

    def hf():
        with torch.inference_mode():
            t = time.perf_counter()
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=64, min_new_tokens=64,
                           do_sample=False, pad_token_id=0)
            return 64 / (time.perf_counter() - t)

    print("threads", torch.get_num_threads(), "hf", [round(hf(), 1) for _ in range(2)], flush=True)
    for recipe in recipes:
        cm = gw.compile(model, recipe=None if recipe == "identity" else recipe, tokenizer=tok)
        print(recipe, "compiled: hf", [round(hf(), 1) for _ in range(2)], flush=True)
        cm.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, eos_token_id=[])
        gw_speed = round(cm.last_stats["decode_tokens_per_s"], 1)
        print(recipe, "after generate: hf", [round(hf(), 1) for _ in range(2)], "gw", gw_speed, flush=True)


if __name__ == "__main__":
    main(sys.argv[1:] or ["identity"])
