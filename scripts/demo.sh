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
router-tune train recipes/demo.yaml --eval_before_after false --output_dir "$RUN" --overwrite_output_dir true

step "3/4 eval: held-out perplexity and routing, mergekit gates (before) vs trained (after)"
router-tune eval "$RUN" --data recipes/demo.yaml
python - "$MODEL/figures.json" <<'PY'
import json, sys
f = json.load(open(sys.argv[1]))
print("reference figures measured when the demo model was built (scripts/make_demo_model.py):")
for key in ("dense_base", "untrained_hidden_gates", "oracle_routing"):
    if key in f.get("perplexity", {}):
        print(f"  {key:<24} mixed held-out perplexity {f['perplexity'][key]['mixed']:.1f}")
PY

step "4/4 export: a full model in the legacy layout (transformers, mergekit, llama.cpp), verified"
router-tune export "$RUN" --out "$RUN/export" --layout legacy --force

printf '\nreport: %s/eval/report.md   plots: %s/plots/   exported model: %s/export\n' "$RUN" "$RUN" "$RUN"
