# `make demo`, `make test` and `make docs` each create .venv if missing and install what they need.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install --quiet --constraint constraints.txt

.PHONY: demo demo-digits test test-fast docs bench clean

$(VENV)/.created:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	touch $@

$(VENV)/.demo: $(VENV)/.created pyproject.toml constraints.txt
	$(PIP) -e ".[torch]" scikit-learn tqdm matplotlib
	touch $@

$(VENV)/.test: $(VENV)/.created pyproject.toml constraints.txt
	$(PIP) -e ".[test,faiss,torch,jax,tensorboard]" tqdm matplotlib
	touch $@ $(VENV)/.demo

# autodoc imports the adapters, so the docs need torch and jax as well as the [docs] extra.
$(VENV)/.docs: $(VENV)/.test
	$(PIP) -e ".[docs]"
	touch $@

# ODC training a ResNet-18 on scikit-learn's digits (CPU, a few minutes); its last line is the
# final NMI/ACC against the true labels next to k-means on the raw pixels. One OpenMP thread:
# on a busy 2-core machine two spinning threads ran 4x slower (35 vs 150 images/s).
demo: $(VENV)/.demo
	OMP_NUM_THREADS=1 $(PY) examples/imagenet_odc_torch.py --out runs/demo-odc

# The memories and the labelling alone on raw pixels, no network (seconds).
demo-digits: $(VENV)/.demo
	$(PY) examples/digits_odc_demo.py
	@echo
	$(PY) examples/digits_deepcluster_demo.py

# Two pytest-xdist workers (whole files per worker, so module fixtures run once): the suite is
# mostly single-threaded Python and subprocess start-up, so two workers fill a 2-core machine.
TEST_WORKERS ?= 2

test: $(VENV)/.test
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile

# The inner loop: everything but the tests marked slow (multi-process runs, fault injection).
test-fast: $(VENV)/.test
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile -m "not slow"

# The site (guides + API reference generated from the docstrings) into docs/_build/html.
# Warnings are errors: a broken cross-reference (-n: nitpicky) or a public name without a
# docstring (docs/_ext/apigen.py) fails the build. --keep-going reports all of them at once.
docs: $(VENV)/.docs
	$(PY) -m sphinx -b html -n -W --keep-going -q docs docs/_build/html
	@echo "docs: open docs/_build/html/index.html"

bench: $(VENV)/.test
	$(PY) benchmarks/odc_step.py
	$(PY) benchmarks/kmeans.py
	$(PY) benchmarks/self_classifier.py --compile
	$(PY) benchmarks/torch_overhead.py
	$(PY) benchmarks/quality_digits.py

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis docs/_build docs/api
