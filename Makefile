# Two commands on a fresh machine:  make demo  |  make test
PYTHON ?= python3
VENV ?= .venv
BIN = $(VENV)/bin
# CPU machines: the exact torch build clipscan is tested with. GPU clusters: TORCH= (empty) keeps yours.
TORCH ?= torch==2.14.1 torchvision==0.29.1
# CPU machines: faiss-cpu. GPU clusters: EXTRAS=gpu,dev (faiss-gpu-cu12; never both, they are one module).
EXTRAS ?= cpu,dev

.PHONY: install demo test lint bench clean

$(BIN)/clipscan-installed: pyproject.toml requirements/constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -c requirements/constraints.txt $(TORCH) -e '.[$(EXTRAS)]'
	touch $@

install: $(BIN)/clipscan-installed

demo: install
	$(BIN)/python jobs/daf.py --config configs/daf-demo.yaml

# vLLM's CPU engine has its own virtualenv (scripts/vllm_env.sh, skipped with CLIPSCAN_SKIP_VLLM=1).
# Both virtualenvs are pip installs that mostly wait on downloads and disk, so the two are
# built side by side; the vLLM one's log is $(VLLM_LOG).
VLLM_LOG ?= .vllm-env.log

test:
	@if [ "$$CLIPSCAN_SKIP_VLLM" = 1 ]; then $(MAKE) --no-print-directory install; exit $$?; fi; \
	bash scripts/vllm_env.sh > /dev/null 2> $(VLLM_LOG) & vllm=$$!; \
	$(MAKE) --no-print-directory install; installed=$$?; \
	if ! wait $$vllm; then echo "scripts/vllm_env.sh failed; the end of $(VLLM_LOG):"; tail -n 40 $(VLLM_LOG); exit 1; fi; \
	exit $$installed
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/python -m pytest -q -m "not vllm" --durations=15
	$(BIN)/python -m pytest -q -m vllm

lint: install
	$(BIN)/ruff check .
	$(BIN)/mypy

clean:
	rm -rf runs/daf-tiny runs/daf-demo runs/tcac-tiny runs/bias-tiny runs/demo-corpus runs/demo-scenes
