"""The kvpress side of ``bench/kvpress_side_by_side.py``: runs in ``bench/.venv-kvpress``, never imports graphwright.

Usage (the side-by-side script calls it): ``bench/.venv-kvpress/bin/python bench/kvpress_worker.py CASES.json OUT.json``

Reads the token ids the graphwright side generated (``graphwright.eval.niah.needle_suite``, so both sides see
the very same tokens), loads the same weights from the safetensors folder the main script wrote, and answers
every case greedily under each press of NVIDIA kvpress (0.5.5), mirroring its ``KVPressTextGenerationPipeline``:
the compressed part is one forward pass under ``with press(model)`` into a ``DynamicCache``; then the
uncompressed tokens at their original positions, then greedy decoding that stops at EOS.

Modes: ``agnostic`` compresses the context only (kvpress's ``pipeline(context, question=...)``: the question,
the end of the chat turn and the answer primer are fed after compression, uncompressed); ``aware`` compresses
the whole prompt (the question inside the context, as kvpress's README does for question-aware compression;
the first answer token comes from that forward pass, whose logits are dense).

Resumable: with ``spec["journal"]`` (a JSONL path) every finished case is appended at once as
``{"key": {...}, "row": {...}}``, keyed by model folder, press, budget, mode, case id, a sha256 of the case's token ids and
split, max_new_tokens and ``WORKER_VERSION`` + the kvpress version; a rerun skips the keys already there (a torn last
line from a killed run is cut off and that case runs again) and the keys the other ``kvpress_answers*.jsonl`` journals in
the same folder hold (``sibling_answers``, read only), so a new spec never answers a case another worker has.

Bytes: after the compression forward pass, the sum of ``untyped_storage().nbytes()`` over the distinct
storages of every tensor reachable from the cache object (so presses that mask instead of evicting, such as
AdaKV and DuoAttention, report the dense tensors they keep resident).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from pathlib import Path

import torch

WORKER_VERSION = "kvpress-worker-1"  # bump when answering or byte counting changes
SNAPKV_WINDOW = 32  # graphwright's snapkv default window (min(32, budget // 2)); kvpress's default is 64


def _presses(spec=None):
    """Press name -> constructor(compression_ratio); kvpress's compression_ratio is the fraction REMOVED (None: a fixed press)."""
    spec = spec or {}
    import kvpress as kp

    def duo(ratio):
        # DuoAttention's head patterns come from a download (kvpress loads them from the Hub); offline this raises
        return kp.DuoAttentionPress(head_compression_ratio=ratio)

    def duo_headset(_ratio):
        # graphwright's shipped DuoAttention head set (spec["duo_headset"]), sinks 4 and window 256 as duo(sinks=4,
        # window=256): the same streaming heads, masked by kvpress's press instead of evicted; the budget is not used
        import numpy as np

        hs = json.loads(open(spec["duo_headset"]).read())
        scores = np.zeros((hs["num_layers"], hs["num_kv_heads"]))
        for layer, head in hs["retrieval"]:
            scores[layer, head] = 1.0
        press = kp.DuoAttentionPress(head_compression_ratio=float((scores == 0).mean()))
        press.load_attention_pattern = lambda model: (4, 256, scores)  # kvpress's (sink_size, recent_size, head_scores)
        return press

    def qfilter_ours(ratio):
        # kvpress's QFilterPress downloads its filters from the Hub; here it gets graphwright's calibrated filters
        # (spec["qfilters"], a safetensors file with "q_filters" [layers, KV heads, head dim], kvpress's own layout),
        # so both sides run the same algorithm with the same filters
        from safetensors.torch import load_file

        press = kp.QFilterPress(compression_ratio=ratio)
        filters = load_file(spec["qfilters"])["q_filters"]
        press.post_init_from_model = lambda model: setattr(press, "q_filters", filters.to(model.dtype))
        return press

    return {
        "DuoAttention(graphwright heads)": duo_headset,
        "LagKV": lambda r: kp.LagKVPress(compression_ratio=r, n_sink=4, lag_size=128),
        "QFilter(graphwright filters)": qfilter_ours,
        "SnapKV": lambda r: kp.SnapKVPress(compression_ratio=r, window_size=SNAPKV_WINDOW, kernel_size=5),
        "ObservedAttention": lambda r: kp.ObservedAttentionPress(compression_ratio=r),
        "ExpectedAttention": lambda r: kp.ExpectedAttentionPress(compression_ratio=r),
        "TOVA": lambda r: kp.TOVAPress(compression_ratio=r),
        "Knorm": lambda r: kp.KnormPress(compression_ratio=r),
        # scored once on the whole prompt (kvpress's KeyDiffPress alone; the paper's block-wise prefill is BlockPress)
        "KeyDiff": lambda r: kp.KeyDiffPress(compression_ratio=r),
        "StreamingLLM": lambda r: kp.StreamingLLMPress(compression_ratio=r, n_sink=4),
        # kept keys re-rotated to their cache index and later tokens placed after the kept ones (as graphwright's streaming)
        "KeyRerotation(StreamingLLM)": lambda r: kp.KeyRerotationPress(kp.StreamingLLMPress(compression_ratio=r, n_sink=4)),
        "AdaKV(SnapKV)": lambda r: kp.AdaKVPress(kp.SnapKVPress(compression_ratio=r, window_size=SNAPKV_WINDOW, kernel_size=5)),
        # chunks of 20 of SnapKV's scores (the observation window scored max, so its chunks win), shared by all heads
        "ChunkKV(SnapKV)": lambda r: kp.ChunkKVPress(kp.SnapKVPress(compression_ratio=r, window_size=SNAPKV_WINDOW, kernel_size=5),
                                                     chunk_length=20),
        # beta 20 (the paper's); kvpress falls back to SnapKV unless S >= k_max >= k_min >= window (ALGORITHMS-2 section 4)
        "PyramidKV": lambda r: kp.PyramidKVPress(compression_ratio=r, window_size=SNAPKV_WINDOW, kernel_size=5, beta=20),
        "CriticalKV(SnapKV)": lambda r: kp.CriticalKVPress(kp.SnapKVPress(compression_ratio=r, window_size=SNAPKV_WINDOW, kernel_size=5)),
        # CriticalKV's two stages with AdaKV's head budgets (kvpress's split, alpha_safeguard 0.2, first stage 0.5)
        "CriticalAdaKV(SnapKV)": lambda r: kp.CriticalAdaKVPress(kp.SnapKVPress(compression_ratio=r, window_size=SNAPKV_WINDOW,
                                                                              kernel_size=5)),
        "DuoAttention": duo,
        # Finch: the window is the question (the tokens after the case's split), marked by a delimiter token (FINCH);
        # rerotate_keys=False keeps kept keys at their positions, as graphwright; kvpress's default re-rotates them
        "Finch": lambda r: kp.FinchPress(compression_ratio=r, rerotate_keys=False),
        "Finch(rerotate)": lambda r: kp.FinchPress(compression_ratio=r),
        "Finch(chunk=256)": lambda r: kp.FinchPress(compression_ratio=r, chunk_length=256, rerotate_keys=False),
        # KVzip (arXiv 2505.23416): context-replay scores, 4 sinks, chunks of 2,048, one budget over layers and heads
        # (kvpress masks the pruned pairs; its replay prompt follows the tokenizer's chat template, saved with the weights)
        "KVzip": lambda r: kp.KVzipPress(compression_ratio=r),
    }


FIXED = {"DuoAttention(graphwright heads)"}  # presses with one setting whatever the budget: run once, budget None
EAGER = {"ObservedAttention"}  # needs the attention weights (kvpress asks for attn_implementation="eager")
# FinchPress finds its window by a delimiter token between context and question: added to a model copy of its own
# by FinchPress.update_model_and_tokenizer (embeddings resized by one row; its hook drops the token's embedding)
FINCH = {"Finch", "Finch(rerotate)", "Finch(chunk=256)"}


def cache_storage_bytes(cache) -> int:
    """Bytes of the distinct storages of every tensor reachable from ``cache`` (lists, dicts, transformers/kvpress objects)."""
    seen_obj, storages = set(), {}

    def walk(obj):
        if isinstance(obj, torch.Tensor):
            st = obj.untyped_storage()
            storages[st.data_ptr()] = st.nbytes()
            return
        if id(obj) in seen_obj:
            return
        seen_obj.add(id(obj))
        if isinstance(obj, (list, tuple)):
            for x in obj:
                walk(x)
        elif isinstance(obj, dict):
            for x in obj.values():
                walk(x)
        elif hasattr(obj, "__dict__") and type(obj).__module__.split(".")[0] in ("transformers", "kvpress"):
            for x in vars(obj).values():
                walk(x)

    walk(cache)
    return int(sum(storages.values()))


@torch.inference_mode()
def answer(model, press, ids, split, max_new_tokens, eos, delim=None):
    """Greedy new token ids for one case, the cache bytes after compression and the tokens kept (layer 0);
    ``delim`` (token id, index): a Finch delimiter inserted before ``ids[index]`` (its embedding is dropped again)."""
    from transformers import DynamicCache

    cache = DynamicCache()
    ctx = torch.tensor([ids[:split] if delim is None else ids[:delim[1]] + [delim[0]] + ids[delim[1]:split]])
    with press(model) if press is not None else _null():
        out = model(input_ids=ctx, past_key_values=cache, logits_to_keep=1)
    nbytes, kept = cache_storage_bytes(cache), int(cache.get_seq_length())
    # kvpress's pipeline: later tokens go at their original positions, or after the kept ones under key re-rotation
    rerotated = type(press).__name__ == "KeyRerotationPress" or bool(getattr(press, "rerotate_keys", False))
    pos = kept if rerotated else split
    if split < len(ids):
        q = torch.tensor([ids[split:]])
        out = model(input_ids=q, past_key_values=cache, position_ids=torch.arange(pos, pos + q.shape[1])[None], logits_to_keep=1)
        pos += q.shape[1]
    new = [int(out.logits[0, -1].argmax())]
    while len(new) < max_new_tokens and new[-1] not in eos:
        out = model(input_ids=torch.tensor([[new[-1]]]), past_key_values=cache, position_ids=torch.tensor([[pos]]))
        pos += 1
        new.append(int(out.logits[0, -1].argmax()))
    return new, nbytes, kept


def _finch_delimiter(press, model, folder) -> int:
    """FinchPress.update_model_and_tokenizer on ``model`` (the tokenizer is kept on the model, so the token is added
    and the embeddings resized once); returns the delimiter's token id."""
    if not hasattr(model, "_finch_tokenizer"):
        from transformers import AutoTokenizer

        model._finch_tokenizer = AutoTokenizer.from_pretrained(folder)
    press.update_model_and_tokenizer(model, model._finch_tokenizer)
    return int(press.delimiter_token_id)


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def _load(folder, attn):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation=attn).eval()


def ids_hash(ids, split: int) -> str:
    """A short sha256 of a case's token ids and split: the ``case_hash`` of a worker journal key."""
    return hashlib.sha256((",".join(str(int(i)) for i in ids) + f"|{split}").encode()).hexdigest()[:20]


def case_key(spec: dict, case: dict, name: str, budget, mode: str, kvpress_version: str) -> str:
    """The journal key of one answer (a canonical JSON string)."""
    return json.dumps({"model": spec.get("model", spec["model_dir"]), "method": name, "budget": budget, "mode": mode,
                       "case": case["id"], "case_hash": ids_hash(case["ids"], case["split"]), "max_new_tokens": spec["max_new_tokens"],
                       "version": f"{WORKER_VERSION}/kvpress-{kvpress_version}"}, sort_keys=True)


def load_journal(path) -> dict:
    """``{key: row}`` of a worker journal (empty when the file does not exist); a torn last line is cut off."""
    if path is None or not os.path.isfile(path):
        return {}
    data = open(path, "rb").read()
    if data and not data.endswith(b"\n"):
        keep = data.rfind(b"\n") + 1
        print(f"{path}: dropping a torn last line ({len(data) - keep} bytes); its case runs again", file=sys.stderr, flush=True)
        with open(path, "r+b") as f:
            f.truncate(keep)
        data = data[:keep]
    out = {}
    for i, ln in enumerate(data.decode().split("\n")):
        if ln.strip():
            try:
                rec = json.loads(ln)
                out[json.dumps(rec["key"], sort_keys=True)] = rec["row"]
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise SystemExit(f"{path} line {i + 1} is not a journal record {{'key', 'row'}} ({exc}); fix or remove it") from None
    return out


def sibling_answers(path) -> dict:
    """``{key: row}`` of the other workers' journals beside ``path`` (``kvpress_answers*.jsonl`` in its folder), read only:
    a torn last line (a worker still writing) is skipped, never cut off. A worker skips these keys too, so a new spec
    over presses and cases other journals already hold answers only what none of them has."""
    if path is None:
        return {}
    out = {}
    for f in sorted(Path(path).parent.glob("kvpress_answers*.jsonl")):
        if f.resolve() == Path(path).resolve():
            continue
        for ln in f.read_text().split("\n"):
            try:
                rec = json.loads(ln)
                out.setdefault(json.dumps(rec["key"], sort_keys=True), rec["row"])
            except (json.JSONDecodeError, KeyError, TypeError):
                continue  # an empty or torn line
    return out


def append_journal(path, key: str, row: dict) -> None:
    """One line ``{"key", "row"}``, flushed and fsynced before the next case starts."""
    with open(path, "a") as f:
        f.write(json.dumps({"key": json.loads(key), "row": row}, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())


def run(spec: dict, out_path=None) -> dict:
    import kvpress
    import transformers

    torch.manual_seed(0)
    models = {}
    factories = _presses(spec)
    eos = set(spec["eos"])
    kv_version = _kvpress_version()
    journal_path = spec.get("journal")
    done = sibling_answers(journal_path) | load_journal(journal_path)
    rows, errors = [], {}
    # spec["dense"] False leaves the dense run out (a worker started beside another that runs it)
    jobs = [("dense", None, "aware")] * bool(spec.get("dense", True)) + [
        (p, b, m) for p in spec["presses"] for b in ([None] if p in FIXED else spec["budgets"]) for m in spec["modes"]]
    for name, _, mode in jobs:
        if name != "dense" and name not in factories:
            raise SystemExit(f"unknown press {name!r}; known: {', '.join(factories)}")
        if name in FINCH and mode != "aware":
            raise SystemExit(f"{name} compresses context + question together (its window is the question): mode "
                             f"'aware' only; got {mode!r}")
    # spec["round"] R: the cases are answered R at a time for every job in turn (every cell grows together, so a
    # run stopped early leaves cells of equal size); default: all cases of a job, then the next job
    step = int(spec.get("round") or len(spec["cases"]) or 1)
    got: dict = {job: [] for job in jobs}
    for start in range(0, len(spec["cases"]), step):
        chunk = spec["cases"][start:start + step]
        for job in jobs:
            name, budget, mode = job
            key = f"{name}@{budget}/{mode}"
            if key in errors:
                continue
            attn = "eager" if name in EAGER else "sdpa"
            t0, ran = time.perf_counter(), 0
            try:  # a press that cannot run here fails on its first case (DuoAttention: its head patterns are a download)
                press = None if name == "dense" else factories[name](None if budget is None else 1.0 - budget)
                for case in chunk:
                    ck = case_key(spec, case, name, budget, mode, kv_version)
                    if ck in done:
                        got[job].append(done[ck])
                        continue
                    mkey = (attn, name in FINCH)
                    if mkey not in models:
                        models[mkey] = _load(spec["model_dir"], attn)
                    delim = (_finch_delimiter(press, models[mkey], spec["model_dir"]), case["split"]) if name in FINCH else None
                    split = case["split"] if mode == "agnostic" else len(case["ids"])
                    new, nbytes, kept = answer(models[mkey], press, case["ids"], split, spec["max_new_tokens"], eos, delim)
                    row = {"method": name, "budget": budget, "mode": mode, "id": case["id"], "new_ids": new,
                           "cache_bytes": nbytes, "kept_tokens": kept, "compressed_tokens": split}
                    if journal_path is not None:
                        append_journal(journal_path, ck, row)
                    done[ck] = row
                    got[job].append(row)
                    ran += 1
            except Exception as exc:  # noqa: BLE001
                if got[job]:  # a failure after the first case is a bug, not a press that does not apply
                    raise
                errors[key] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                print(f"kvpress {key}: skipped ({errors[key]})", file=sys.stderr, flush=True)
                continue
            if out_path is not None:  # after every press, so a long run that is stopped keeps what it finished
                _write(out_path, _result(kvpress, transformers, [r for rs in got.values() for r in rs], errors))
            print(f"kvpress {name} budget={budget} {mode}: {ran} of {len(chunk)} cases run ({len(chunk) - ran} from the "
                  f"journal; {len(got[job])} of {len(spec['cases'])} so far) in {time.perf_counter() - t0:.0f} s",
                  file=sys.stderr, flush=True)
    rows = [r for rs in got.values() for r in rs]
    return _result(kvpress, transformers, rows, errors)


def _kvpress_version() -> str:
    from importlib.metadata import version

    return version("kvpress")


def _result(kvpress, transformers, rows, errors) -> dict:
    return {"versions": {"kvpress": _kvpress_version(), "transformers": transformers.__version__,
                         "torch": torch.__version__}, "rows": rows, "errors": errors}


def _write(path, result) -> None:
    with open(path, "w") as f:
        json.dump(result, f)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        raise SystemExit("usage: kvpress_worker.py CASES.json OUT.json (called by bench/kvpress_side_by_side.py)")
    spec = json.loads(open(argv[0]).read())
    _write(argv[1], run(spec, argv[1]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
