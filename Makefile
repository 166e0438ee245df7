# Two jobs, each reusing what the last run built:
#   make demo   set up .venv, build moca._C, run the embedded pipeline: CPT, then CL, then the eval table
#   make test   set up .venv, build moca._C, run the test suite (CPU; Triton via its interpreter)
#   make setup  only set up .venv and build moca._C;  make bench  the benchmarks at small shapes (--quick)
# On a GPU machine (its own python with CUDA torch, no .venv; wheels from `make gpu-wheels` in .whl/):
#   make gpu-check   GPU tests, the embedded pipeline on CUDA, every benchmark -> bench/results/<device>-<date>.*
#   make gpu-tune    the tile tunings, and the attention benchmark under the tuned rules (~9 min on an H100/H200)
#                    -> bench/results/<device>-<date>.* and <device>-<date>-tune-*
PY ?= .venv/bin/python
CSRC := $(wildcard csrc/*.cpp csrc/*.h csrc/cuda/*.cu)

.PHONY: demo test bench setup gpu-check gpu-tune gpu-wheels
setup: .venv/.built

.venv/.installed: requirements.txt
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q --disable-pip-version-check -r requirements.txt
	touch $@

.venv/.built: .venv/.installed setup.py pyproject.toml $(CSRC)
	$(PY) -m pip install -q --disable-pip-version-check --no-build-isolation --no-deps -e .
	touch $@

demo: .venv/.built
	$(PY) -m engine.train cpt --overwrite
	$(PY) -m engine.train cl --overwrite

test: .venv/.built
	$(PY) -m pytest -q tests

bench: .venv/.built
	$(PY) bench/throughput.py --quick

gpu-check:
	python3 bench/gpu_check.py

gpu-tune:
	python3 bench/gpu_check.py --only-bench --deadline 560 --bench tune attention_tuned tune_losses

gpu-wheels: .venv/.installed
	bash bench/gpu_wheels.sh
