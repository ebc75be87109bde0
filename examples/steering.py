"""PASTA attention steering on SmolLM2-135M: emphasize an instruction buried in a prompt.

    GRAPHWRIGHT_CACHE=/tmp/gwcache python examples/steering.py

Compiles the model with a ``steer`` pass on a few heads, then generates the same prompt without
and with emphasis on the instruction (a substring of the prompt). AutoPASTA picks the sentence
to emphasize itself. Head sets for a task come from ``graphwright steer profile`` (or
``graphwright.steer.profile.profile_heads``) and load with ``heads="path.json"`` or ``"auto"``.
"""

import graphwright as gw
from graphwright.steer.autopasta import autopasta
from graphwright.steer.headsets import headset_path
from graphwright.steer.tasks import make_task

model, tok = gw.load_model("smollm2-135m")
# the head set profiled for the pronoun-change task ships with graphwright (see README: 0.25 -> 0.81 held out)
cm = gw.compile(model, recipe=f"steer(alpha=0.01, heads='{headset_path('smollm2-135m', 'pronoun')}')", tokenizer=tok)

ex = make_task("pronoun", 1, seed=0, split="test").examples[0]
print(ex.prompt, "\n")
print("unsteered:", cm.generate_text(ex.prompt, max_new_tokens=40))
print("steered:  ", cm.generate_text(ex.prompt, emphasis=list(ex.emphasis), max_new_tokens=40))

context = ("Maria Rossi is a nurse. She grew up in a small town near the coast. "
           "The town library closes early on Sundays.")
res = autopasta(cm, context, "When does the library close?", max_new_tokens=24)
print("\nAutoPASTA emphasized:", res["sentence"], "\nanswer:", res["answer"])
