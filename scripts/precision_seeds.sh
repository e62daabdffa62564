#!/usr/bin/env bash
# Issue 19's accuracy check: Fed-SB r=64 on arithmetic-small (400 training examples, 100 held-out
# sums), bf16, seeds 0-2, with today's code: the same command as docs/results.md's "bf16 against
# fp32" table, so the two can be compared. Resumable: a finished seed is not rerun.
# Usage: scripts/precision_seeds.sh OUT_DIR [extra --set arguments...]
set -euo pipefail
out=${1:?OUT_DIR}; shift
bin=${BIN:-.venv/bin}
export OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
for s in 0 1 2; do
  [ -s "$out/bf16-s$s/summary.json" ] && continue
  $bin/fedsb run configs/arithmetic-small.toml --out "$out/bf16-s$s" --set seed=$s \
    --set 'train.precision="bf16"' --set 'task.eval_tasks=["arith"]' --set task.train_limit=400 \
    --set task.eval_limit=100 "$@" > "$out/bf16-s$s.log" 2>&1
done
