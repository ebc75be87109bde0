#!/usr/bin/env bash
# The headline runs of issue 18 item 1 / issue 20 item 4, resumable: rerun this script to continue where it stopped.
# 1) graphwright's long suite, needles at 1,024 then 2,048 tokens (bench/long_headline.py, journal bench/results/suite/cases.jsonl)
# 2) kvpress's presses on the same cases, 50% kept, question-aware then question-agnostic
#    (bench/kvpress_side_by_side.py --skip-graphwright, journal bench/results/kvpress/kvpress_answers.jsonl)
# Usage: bash bench/long_headline.sh [suite|kvpress|all]   (from the repository root; default all)
set -euo pipefail
cd "$(dirname "$0")/.."
py="${PYTHON:-python}"
part="${1:-all}"
export PYTHONPATH="${PYTHONPATH:-.}"
if [[ "$part" == suite || "$part" == all ]]; then
  "$py" bench/long_headline.py --lengths 1024 2048 --cases 50
fi
if [[ "$part" == kvpress || "$part" == all ]]; then
  for mode in aware agnostic; do
    "$py" bench/kvpress_side_by_side.py --lengths 1024 2048 --cases 50 --skip-graphwright --budgets 0.5 --modes "$mode" \
      --presses SnapKV StreamingLLM TOVA Knorm ExpectedAttention ObservedAttention "AdaKV(SnapKV)" --out bench/results/kvpress
  done
fi
