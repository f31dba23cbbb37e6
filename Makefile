# Every target installs what it needs on a fresh clone: `make demo`, `make test`, `make bench`.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.router-tune-installed
# Exact versions tested together (pip constraints), written by `make lock`; pyproject.toml keeps ranges.
LOCK := requirements-lock.txt
LATEST := .venv-latest
TORCH := torch==2.13.0

.PHONY: setup test test-slow test-latest lock latest-venv lint demo bench bench-quality bench-quant bench-scale clean

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

# Tests marked slow: launched multi-rank runs, real-weights checks, and tests/test_first_hour.py (the README's
# inspect -> train -> Ctrl-C -> resume -> eval -> export on the demo as commands, 2 min 15 s on 2 busy cores).
test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

# The drift watch: a fresh venv with the newest releases pyproject.toml allows, the suite run there, the
# versions and result prepended to docs/compatibility.md. Run before every merge to main (~15 min on 2 cores).
test-latest: latest-venv
	$(LATEST)/bin/python scripts/test_latest.py --venv $(LATEST)

# test-latest, then the lock from its venv when the suite passed there
lock: latest-venv
	$(LATEST)/bin/python scripts/test_latest.py --venv $(LATEST) --lock $(LOCK)

latest-venv:
	rm -rf $(LATEST) && python3 -m venv $(LATEST)
	$(LATEST)/bin/python -m pip install $(TORCH)
	$(LATEST)/bin/python -m pip install --upgrade -e ".[dev]"

# ruff: lint rules and formatting as configured in pyproject.toml ([tool.ruff])
lint: $(STAMP)
	$(VENV)/bin/ruff check router_tune tests scripts
	$(VENV)/bin/ruff format --check router_tune tests scripts

demo: $(STAMP)
	PATH=$(VENV)/bin:$$PATH bash scripts/demo.sh

bench: $(STAMP)
	$(PY) scripts/bench.py --out bench

# Gap to oracle routing closed per model x gate kind x router gradient mode, and sparse with the overload
# loss at 1.0 and with the Switch loss at 0.3 (bench/quality.md, .json, .png); builds the second frankenMoE
# (scripts/make_second_moe.py) on first use. CPU hours on 2 cores.
bench-quality: $(STAMP)
	$(PY) scripts/bench_quality.py --steps 500 --overload 1.0 --switch 0.3 --out bench

# quantize none / nf4 / int8: demo routing quality, memory and speed on the Raiden-shaped scale model
# (builds build/scale-model first, ~6 GB); writes bench/quant.json and bench/quant.md
bench-quant: $(STAMP)
	$(PY) scripts/bench_quant.py --out bench

# Seed-model scale (issue 12) on the Raiden-shaped scale model (builds it first if SCALE_MODEL is missing, ~6 GB):
# per-rank peak RSS of 1 process, 2-rank FSDP2 and 2-rank ZeRO-3, start-up phases, router-only checkpoint bytes,
# verified export time and RSS, tokens/s vs transformers.Trainer, and the 26-layer projection. One configuration at
# a time (~10 min on 2 cores, up to ~12 GB per rank); writes bench/scale.json and bench/scale.md. Then the same
# 1 process, FSDP2 and ZeRO-3 on a 1-layer copy (3.1 GB), whose two ranks fit a 24 GB machine under both backends
# (~6 min): bench/scale-1layer/
SCALE_MODEL ?= build/scale-model
bench-scale: $(STAMP)
	$(PY) scripts/bench_scale.py --out bench --model $(SCALE_MODEL)
	$(PY) scripts/bench_scale.py --out bench/scale-1layer --model $(SCALE_MODEL)-1layer --layers 1 \
		--work runs/bench-scale-1layer --configs single fsdp2 zero3

clean:
	rm -rf runs build *.egg-info .pytest_cache $(LATEST)
