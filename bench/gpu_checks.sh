#!/usr/bin/env bash
# Every GPU check and benchmark of graphwright in one call, for a lent CUDA machine (the project's CI has none).
#
#   OUT=dir bash bench/gpu_checks.sh        # default OUT: bench/results/gpu/latest
#
# Stages, each in its own process with its own time limit (a stage that fails or runs out of time
# does not stop the next; what it printed stays in $OUT/log.txt):
#   env       GPU, driver, torch/triton/transformers versions; copy bandwidth and bf16 matmul ceilings
#   kernels   tests/triton on the GPU (GW_TRITON_DEVICE=cuda: the kernel tests' CPU references and
#             tolerances, kernels compiled for the GPU)              -> $OUT/pytest.txt
#   tiny      whole tiny models on the GPU: triton == torch backend == CPU tokens   -> gpu_checks.jsonl
#   decode    SmolLM2-135M-shaped model (bf16): HF vs graphwright torch/triton, eviction at 25% KV
#   attention Triton attention kernels vs SDPA flash and FlexAttention   -> $OUT/attention.json
#   moe       Triton MoE kernels vs HF eager/grouped_mm and the torch path -> $OUT/moe.json
#   compiled  backend="compiled" (torch.compile, CUDA graphs) vs HF and the torch backend
#
# graphwright needs transformers >= 5.20. Where the GPU machine's image has an older one and no
# package index, bring wheels (pure Python, ~21 MB) and install them first:
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux_2_17_x86_64 -d .whl \
#       transformers==5.25.0 huggingface_hub==2.4.0 httpx2==2.16.2 httpcore2==2.16.2 truststore==0.10.5 \
#       click==8.5.1 hf-xet==1.8.0
#   (there) pip install --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
set -u
OUT=${OUT:-bench/results/gpu/latest}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
LOG=$OUT/log.txt

BUDGET=${BUDGET:-560}  # seconds for all stages together: a stage gets at most what is left of it

stage() {  # stage NAME LIMIT_S CMD...: run CMD with a time limit, output appended to the log
    local name=$1 limit=$2 t0=$SECONDS
    shift 2
    local left=$((BUDGET - SECONDS))
    if ((left < 15)); then echo "=== $name not run: the budget is spent" | tee -a "$LOG"; return; fi
    ((limit > left)) && limit=$left
    echo "=== $name (limit ${limit} s) $(date +%T)" >>"$LOG"
    timeout -k 5 "$limit" "$@" >>"$LOG" 2>&1
    local rc=$?
    echo "=== $name rc=$rc in $((SECONDS - t0)) s" | tee -a "$LOG"
}


stage env 30 nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv
stage ceilings 40 "$PY" bench/gpu_ceilings.py
stage kernels 100 env GW_TRITON_DEVICE=cuda "$PY" -m pytest -q -p no:cacheprovider tests/triton -o addopts="" \
    --junitxml="$OUT/pytest.xml"
stage tiny 60 "$PY" bench/gpu_checks.py tiny --out "$OUT"
stage decode 150 "$PY" bench/gpu_checks.py decode --out "$OUT" --prompts 2048 8064 --repeats 2 --warmup 1
stage attention 100 "$PY" bench/bench_triton_attention.py --lengths 8192 32768 --json "$OUT/attention.json"
stage moe 45 "$PY" bench/bench_triton_moe.py --model synthetic --tokens 512 8 1 --peak-gbps 4800 --json "$OUT/moe.json"
stage compiled 300 "$PY" bench/gpu_checks.py compiled --out "$OUT" --prompts 2048 --repeats 2 --warmup 1
echo "--- summary"
grep -E "passed|failed|error" "$LOG" | grep -E "^[0-9]+ (passed|failed)|^=+ .*(passed|failed)" | tail -3
grep -h '"ok": false' "$OUT/gpu_checks.jsonl" 2>/dev/null | cut -c1-300
grep -h '"section": "decode"\|"section": "compiled"' "$OUT/gpu_checks.jsonl" 2>/dev/null | cut -c1-260
grep -E "^(prefill|decode) |x[0-9.]+ |N=" "$LOG" | cut -c1-160 | tail -40
