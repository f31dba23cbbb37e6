# Every target installs what it needs on a fresh clone: `make demo`, `make test`, `make bench`.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.router-tune-installed
# Exact versions tested together (pip constraints), written by `make lock`; pyproject.toml keeps ranges.
LOCK := requirements-lock.txt
LATEST := .venv-latest
TORCH := torch==2.13.0

.PHONY: setup test test-slow test-latest lock latest-venv lint demo demo-real bench bench-real bench-quality bench-balance bench-quant bench-scale clean

setup: $(STAMP)

# torch first, and only if missing: a bare `torch` requirement would pull a multi-GB CUDA build.
# Then the package with the versions of the lock, so a release upstream cannot break `make demo` / `make test`.
$(STAMP): pyproject.toml $(LOCK)
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install $(TORCH)
	$(PY) -m pip install -c $(LOCK) -e ".[dev]"
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

# the tests marked slow: multi-process FSDP2 / ZeRO-3 runs, a smoke run of every benchmark, the GPU check dry run,
# tests/test_first_hour.py (the README's inspect -> train -> Ctrl-C -> resume -> eval -> export as commands, ~2 min)
test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

# The drift watch: a fresh venv with the newest releases pyproject.toml allows, the suite run there, the
# versions and result prepended to docs/compatibility.md. Run before every merge to main (~15 min on 2 cores).
test-latest: latest-venv
	$(LATEST)/bin/python -m scripts.test_latest --venv $(LATEST)

# test-latest, then the lock from its venv when the suite passed there
lock: latest-venv
	$(LATEST)/bin/python -m scripts.test_latest --venv $(LATEST) --lock $(LOCK)

latest-venv:
	rm -rf $(LATEST) && python3 -m venv $(LATEST)
	$(LATEST)/bin/python -m pip install $(TORCH)
	$(LATEST)/bin/python -m pip install --upgrade -e ".[dev,real]"

# ruff: lint rules and formatting as configured in pyproject.toml ([tool.ruff])
lint: $(STAMP)
	$(VENV)/bin/ruff check router_tune tests scripts
	$(VENV)/bin/ruff format --check router_tune tests scripts

demo: $(STAMP)
	PATH=$(abspath $(VENV))/bin:$$PATH bash scripts/demo.sh

# A real pretrained model: four SmolLM2-135M-Instruct experts merged by mergekit-moe (built once into
# build/real, ~25 min on 2 cores; needs the `real` extra: the gguf reader), then train / eval / export /
# generations / GGUF (~20 min on 2 cores). See docs/real-weights.md.
REAL_STAMP := $(VENV)/.router-tune-real-installed
$(REAL_STAMP): $(STAMP)
	$(PY) -m pip install -c $(LOCK) -e ".[dev,real]"
	touch $(REAL_STAMP)

demo-real: $(REAL_STAMP)
	PATH=$(abspath $(VENV))/bin:$$PATH bash scripts/demo_real.sh

# The real merge measured (bench/real.md, .json): held-out perplexity per domain of each expert alone, the
# merges with `hidden` and `random` gates, trained routers at the demo-real budget and 4x it, oracle routing;
# router_tune vs the plain transformers Trainer (tokens/s, peak memory). CPU hours on 2 cores.
bench-real: $(REAL_STAMP)
	PATH=$(abspath $(VENV))/bin:$$PATH $(PY) -m scripts.bench_real --out bench

bench: $(STAMP)
	$(PY) -m scripts.bench --out bench

# Gap to oracle routing closed per model x gate kind x router gradient mode, and sparse with the overload
# loss at 1.0 and with the Switch loss at 0.3 (bench/quality.md, .json, .png); builds the second frankenMoE
# (scripts.make_second_moe) on first use. CPU hours on 2 cores.
bench-quality: $(STAMP)
	$(PY) -m scripts.bench_quality --steps 500 --overload 1.0 --switch 0.3 --out bench

# The balance / quality frontier (issue 24): gap closed against worst-layer max-load / mean, within and across
# twin experts, of the exported model, for Switch 0.01-0.3, the overload loss and loss-free balancing with and
# without its fade, on the demo and second merges (bench/balance.md, .json, .png). Resumable. CPU hours on 2 cores.
bench-balance: $(STAMP)
	$(PY) -m scripts.bench_balance --out bench

# quantize none / nf4 / int8: demo routing quality, memory and speed on the Raiden-shaped scale model
# (builds build/scale-model first, ~6 GB); writes bench/quant.json and bench/quant.md
bench-quant: $(STAMP)
	$(PY) -m scripts.bench_quant --out bench

# Seed-model scale on the Raiden-shaped scale model (builds it first if SCALE_MODEL is missing, ~6 GB):
# per-rank peak RSS of 1 process, 2-rank FSDP2 and 2-rank ZeRO-3, start-up phases, router-only checkpoint bytes,
# verified export time and RSS, tokens/s vs transformers.Trainer, and the 26-layer projection. One configuration at
# a time (~10 min on 2 cores, up to ~12 GB per rank); writes bench/scale.json and bench/scale.md. Then the same
# 1 process, FSDP2 and ZeRO-3 on a 1-layer copy (3.1 GB), whose two ranks fit a 24 GB machine under both backends
# (~6 min): bench/scale-1layer/
SCALE_MODEL ?= build/scale-model
bench-scale: $(STAMP)
	$(PY) -m scripts.bench_scale --out bench --model $(SCALE_MODEL)
	$(PY) -m scripts.bench_scale --out bench/scale-1layer --model $(SCALE_MODEL)-1layer --layers 1 \
		--work runs/bench-scale-1layer --configs single fsdp2 zero3

clean:
	rm -rf runs build *.egg-info .pytest_cache $(LATEST)
