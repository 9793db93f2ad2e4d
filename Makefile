# `make demo` and `make test` each create .venv if missing and install what they need.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install --quiet --constraint constraints.txt

.PHONY: demo test bench clean

$(VENV)/.created:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	touch $@

$(VENV)/.demo: $(VENV)/.created pyproject.toml constraints.txt
	$(PIP) -e . scikit-learn tqdm
	touch $@

$(VENV)/.test: $(VENV)/.created pyproject.toml constraints.txt
	$(PIP) -e ".[test,faiss]" tqdm matplotlib
	touch $@ $(VENV)/.demo

demo: $(VENV)/.demo
	$(PY) examples/digits_odc_demo.py
	@echo
	$(PY) examples/digits_deepcluster_demo.py

test: $(VENV)/.test
	$(PY) -m pytest -q

bench: $(VENV)/.test
	$(PY) benchmarks/odc_step.py
	$(PY) benchmarks/kmeans.py
	$(PY) benchmarks/self_classifier.py

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
