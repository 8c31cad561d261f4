# The two commands of the README: `make demo` and `make test`. Everything they need is
# installed here, into .venv (Python) and by hack/install-test-deps.sh (etcd, Prometheus,
# a kube-apiserver built from the Go module proxy, cached outside the repo) and
# hack/install-openadr3-vtn.sh (an OpenADR 3 VTN built from crates.io, cached likewise).
#
# The repository's `controller/` and `operators/` folders install as `aifactory.controller`
# and `aifactory.operators`. `make demo` needs only the default editable install (an import
# hook). The lint and test targets re-install in setuptools' "strict" editable mode, a tree
# of links under build/ that mypy and import-linter can read (they cannot follow the hook);
# it is refreshed before every lint and test run, so new modules are always seen.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
export PIP_DISABLE_PIP_VERSION_CHECK := 1
# setuptools prints a screen of advice (a UserWarning) on every editable install with a
# package-dir mapping; the install itself is what matters here.
PIP := PYTHONWARNINGS=ignore::UserWarning $(BIN)/pip
LINK := $(PIP) install -q --no-deps --no-build-isolation -e . \
	--config-settings editable_mode=strict

.PHONY: demo test unit lint integration clean link

$(VENV)/.base: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip 'setuptools>=77'
	$(PIP) install -q -e .
	touch $@

$(VENV)/.dev: $(VENV)/.base
	$(PIP) install -q -e '.[operator,ray,report,nvml,grid,test,lint]'
	touch $@

link: $(VENV)/.dev
	$(LINK)

demo: $(VENV)/.base
	$(BIN)/aifactory simulate

lint: link
	$(BIN)/ruff check .
	$(BIN)/mypy -p aifactory.controller -p aifactory.operators -p aifactory_examples
	$(BIN)/lint-imports
	$(BIN)/python hack/check_import_cycles.py

unit: link
	$(BIN)/python -m pytest tests/unit -q

test: link
	bash hack/install-test-deps.sh
	bash hack/install-openadr3-vtn.sh
	bash hack/install-torch.sh $(BIN)/python
	$(MAKE) lint
	AIFACTORY_REQUIRE_INTEGRATION=1 $(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) build .pytest_cache .mypy_cache .ruff_cache
