#!/usr/bin/env bash
# fedsb and lm-evaluation-harness on the same examples: the packaged base model, option-text
# protocol, fp32, one thread. Usage: scripts/referee_base.sh OUT_DIR [LIMIT] (LIMIT 0: all).
# Compare afterwards: python -m fedsb.referee OUT_DIR/fedsb_T.json OUT_DIR/lm_eval_T/*/samples_*.jsonl
set -euo pipefail
out=${1:?OUT_DIR}; limit=${2:-0}; tasks=${TASKS:-"arc_e piqa"}
bin=${BIN:-.venv/bin}
export OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
mkdir -p "$out"
model=$($bin/python -c 'from fedsb.models import resolve_model_path; print(resolve_model_path(None))')
lim=(); [ "$limit" -gt 0 ] && lim=(--limit "$limit")
for t in $tasks; do
  [ -s "$out/fedsb_$t.json" ] && continue   # resumable: a finished step is not redone
  s=$(date +%s)
  $bin/fedsb eval --task "$t" --protocol text --mode loglik --precision fp32 --subset first "${lim[@]}" \
    --batch-size 32 --out "$out/fedsb_$t.json" > "$out/fedsb_$t.log" 2>&1
  echo "fedsb $t $(( $(date +%s) - s )) s" >> "$out/times.txt"
done
for t in $tasks; do
  [ -d "$out/lm_eval_$t" ] && continue
  s=$(date +%s)
  $bin/lm_eval --model hf --model_args "pretrained=$model,dtype=float32" --include_path evals/lm_eval \
    --tasks "fedsb_${t}_text" --device cpu --batch_size 16 "${lim[@]}" --log_samples \
    --output_path "$out/lm_eval_$t.tmp" > "$out/lm_eval_$t.log" 2>&1
  mv "$out/lm_eval_$t.tmp" "$out/lm_eval_$t"
  echo "lm_eval $t $(( $(date +%s) - s )) s" >> "$out/times.txt"
done
