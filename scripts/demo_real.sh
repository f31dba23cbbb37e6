#!/usr/bin/env bash
# `make demo-real`: router_tune on a frankenMoE of a real pretrained model (SmolLM2-135M-Instruct x 4
# experts, mergekit-moe `hidden` gates, bf16), on a CPU. Builds the merge on first use (~25 min on
# 2 cores, cached in build/real), then ~20 min: inspect -> train (shipped defaults) -> eval before /
# after / oracle -> export (verified) -> greedy generations before / after -> llama.cpp GGUF conversion.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
MODEL=build/real/moe-hidden
RUN=${RUN:-runs/demo-real}
BLOCKS=${EVAL_BLOCKS:-16}  # held-out blocks of 256 tokens per domain, for each of before / after / oracle

step() { printf '\n\033[1m== %s ==\033[0m\n' "$*"; }

step "0/6 build: the real frankenMoE, once (cached in build/real)"
python -m scripts.make_real_moe

step "1/6 inspect: the merge as mergekit-moe wrote it"
router-tune inspect "$MODEL"

step "2/6 train: only the routers, shipped defaults (recipes/demo-real.yaml sets model, data, batch, steps)"
router-tune train recipes/demo-real.yaml --eval_before_after false --output_dir "$RUN" --overwrite

step "3/6 eval: held-out perplexity per domain, mergekit gates (before) vs trained (after) vs oracle"
router-tune eval "$RUN" --data recipes/demo-real.yaml --oracle code=0,python_docs=1,book=2,chat=3 \
    --max-blocks "$BLOCKS" --force

step "4/6 export: a full model in the legacy layout (transformers, mergekit, llama.cpp), verified"
router-tune export "$RUN" --out "$RUN/export" --layout legacy --force

step "5/6 generate: greedy text from the merge before and from the exported model after"
python -m scripts.compare_generations "$MODEL" "$RUN/export" --out "$RUN/generations.md"

step "6/6 GGUF: llama.cpp's converter reads the export and holds the trained routers"
python -m scripts.check_gguf "$RUN/export" --routers "$RUN/routers.safetensors"

printf '\nreport: %s/eval/report.md   generations: %s/generations.md   plots: %s/plots/   exported model: %s/export\n' \
    "$RUN" "$RUN" "$RUN" "$RUN"
