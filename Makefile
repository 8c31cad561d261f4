# The two commands of the README: `make demo` and `make test`. Everything they need is
# installed here, into .venv (Python) and by hack/install-test-deps.sh (etcd, Prometheus,
# a kube-apiserver built from the Go module proxy, cached outside the repo).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: demo test unit lint integration clean

$(VENV)/.base: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e .
	touch $@

$(VENV)/.dev: $(VENV)/.base
	$(BIN)/pip install -q -e '.[operator,ray,report,nvml,test,lint]'
	touch $@

demo: $(VENV)/.base
	$(BIN)/aifactory simulate

lint: $(VENV)/.dev
	$(BIN)/ruff check .
	$(BIN)/mypy controller operators
	$(BIN)/lint-imports

unit: $(VENV)/.dev
	$(BIN)/python -m pytest tests/unit -q

test: $(VENV)/.dev
	bash hack/install-test-deps.sh
	bash hack/install-torch.sh $(BIN)/python
	$(MAKE) lint
	AIFACTORY_REQUIRE_INTEGRATION=1 $(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
