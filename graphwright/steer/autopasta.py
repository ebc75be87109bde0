"""AutoPASTA (arXiv 2409.10790): let the model find the sentence to emphasize, then steer on it.

Open-book QA with distractors fails when the model attends to the wrong sentence. AutoPASTA:

1. asks the model (unsteered) which context sentence answers the question;
2. maps its reply to the most similar *original* context sentence -- so a paraphrased or
   hallucinated reply never gets emphasized, only real context does;
3. answers the question with PASTA emphasizing that sentence.

Similarity here is TF-IDF cosine over lower-cased word tokens, with IDF computed over the
context's own sentences (the paper's reproduction uses all-MiniLM-L6-v2; graphwright downloads
nothing and a word-overlap measure is what the sentence-copy reply calls for). The model must be
compiled with a ``steer`` pass (``heads=...`` from ``profile_heads``, ideally coarse-to-fine as
AutoPASTA does).
"""

from __future__ import annotations

import math
import re
from collections import Counter

LOCATE_PROMPT = ("{context}\n\nQuestion: {question}\nWhich sentence of the text above answers the question? "
                 "Copy that one sentence exactly.")
ANSWER_PROMPT = "{context}\n\nQuestion: {question}\nAnswer briefly."


def split_sentences(text: str) -> list:
    """Sentences ending in . ! or ? (kept verbatim, so each is a substring of ``text``)."""
    return [s for s in (m.group(0).strip() for m in re.finditer(r"[^.!?\n]+(?:[.!?]+|$)", text)) if s]


def _words(text: str) -> list:
    return re.findall(r"[a-z0-9]+", text.lower())


def most_similar(reply: str, sentences: list) -> tuple:
    """(index, cosine) of the sentence closest to ``reply`` by TF-IDF cosine (IDF over ``sentences``)."""
    docs = [Counter(_words(s)) for s in sentences]
    n = len(docs)
    df = Counter(w for d in docs for w in d)
    idf = {w: math.log((1 + n) / (1 + c)) + 1 for w, c in df.items()}

    def vec(counts):
        return {w: c * idf.get(w, math.log(1 + n) + 1) for w, c in counts.items()}

    def cos(a, b):
        dot = sum(v * b.get(w, 0.0) for w, v in a.items())
        na, nb = math.sqrt(sum(v * v for v in a.values())), math.sqrt(sum(v * v for v in b.values()))
        return dot / (na * nb) if na and nb else 0.0

    r = vec(Counter(_words(reply)))
    sims = [cos(r, vec(d)) for d in docs]
    best = max(range(n), key=lambda i: sims[i])
    return best, sims[best]


def autopasta(cm, context: str, question: str, max_new_tokens: int = 48, chat: bool = True) -> dict:
    """``{"sentence", "answer", "chosen_index", "similarity", "located"}`` for one question.

    ``located`` is the model's own reply in step 1; ``sentence`` is the original context sentence
    it was mapped to and then emphasized while answering.
    """
    if not any(x.kind == "steer" for x in cm.step_graph.extra_inputs):
        raise ValueError("autopasta needs a steered model: compile with recipe=\"steer(heads=...)\"")
    sentences = split_sentences(context)
    if not sentences:
        raise ValueError("the context has no sentences to choose from")
    located = cm.generate_text(LOCATE_PROMPT.format(context=context, question=question), max_new_tokens=max_new_tokens, chat=chat)
    idx, sim = most_similar(located, sentences)
    prompt = ANSWER_PROMPT.format(context=context, question=question)
    answer = cm.generate_text(prompt, emphasis=[sentences[idx]], max_new_tokens=max_new_tokens, chat=chat)
    return {"sentence": sentences[idx], "answer": answer, "chosen_index": idx, "similarity": sim, "located": located}
