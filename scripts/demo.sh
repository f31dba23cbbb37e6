#!/usr/bin/env bash
# `make demo`: the whole router_tune workflow on the embedded frankenMoE, on a CPU, in minutes.
#   inspect -> train (routers only) -> eval --compare (before / after) -> export (verified)
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
MODEL=router_tune/assets/demo-moe
RUN=runs/demo

step() { printf '\n\033[1m== %s ==\033[0m\n' "$*"; }

step "1/4 inspect: what is this checkpoint, are its routers sane?"
router-tune inspect "$MODEL"

step "2/4 train: only the routers, LM loss + load balancing (recipes/demo.yaml)"
rm -rf "$RUN"  # the demo starts from scratch each time
router-tune train recipes/demo.yaml --eval_before_after false --output_dir "$RUN"

step "3/4 eval: held-out perplexity and routing, mergekit gates (before) vs trained (after) vs oracle"
# oracle: each domain sent to the expert fine-tuned on it (experts in mergekit_moe.yml order)
router-tune eval "$RUN" --data recipes/demo.yaml --oracle code=0,python_docs=1,book=2,chat=3

step "4/4 export: a full model in the legacy layout (transformers, mergekit, llama.cpp), verified"
router-tune export "$RUN" --out "$RUN/export" --layout legacy --force

printf '\nreport: %s/eval/report.md   plots: %s/plots/   exported model: %s/export\n' "$RUN" "$RUN" "$RUN"
