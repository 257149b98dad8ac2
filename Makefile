# One way to do each thing: people, the README and .ci/run all call these targets.
PYTHON ?= python3
PIP := $(PYTHON) -m pip

.PHONY: install demo dev lint test test-rust test-python test-abi3 autobahn-deps autobahn bench clean

install:  ## build (release) and install wspool
	$(PIP) install .

demo: install  ## consume the bundled mock stream, with live progress
	$(PYTHON) -m wspool demo

# The development build carries the inert test-only panic triggers (cargo feature test-panic,
# see src/stream.rs) that tests/test_faults.py fires; `make install` builds without them.
dev:  ## editable install with the test and lint tools
	MATURIN_PEP517_ARGS="--features python,pyo3/extension-module,test-panic" $(PIP) install -e '.[dev]'

lint: dev
	cargo fmt --check
	cargo clippy --all-targets -- -D warnings
	cargo clippy --all-targets --features python,test-panic -- -D warnings
	$(PYTHON) -m ruff check python tests benches
	$(PYTHON) -m ruff format --check python tests benches
	$(PYTHON) -m mypy
	$(PYTHON) -m mypy.stubtest wspool._native --ignore-missing-stub

test: dev autobahn-deps test-rust test-python  ## install, then run the Rust and the Python tests

test-rust:
	cargo test --features test-panic

test-python:
	$(PYTHON) -m pytest

# The wheel is abi3 for CPython >= 3.9: build it once, install it on the oldest interpreter
# found (pyenv's 3.9 here) and run the whole Python suite there.
OLDEST_PYTHON ?= $(firstword $(wildcard $(HOME)/.pyenv/versions/3.9*/bin/python3.9))
test-abi3:
	@if [ -z "$(OLDEST_PYTHON)" ]; then echo "test-abi3: no Python 3.9 found, skipped"; exit 0; fi
	rm -rf dist build/py39
	$(PYTHON) -m maturin build --release --out dist
	$(OLDEST_PYTHON) -m venv build/py39
	build/py39/bin/python -m pip install -q dist/*.whl pytest pytest-timeout cryptography
	PATH="$(CURDIR)/build/py39/bin:$$PATH" build/py39/bin/python -m pytest -p no:cacheprovider

# Autobahn|Testsuite (tests/test_conformance.py) runs on Python 2.7: pyenv's, or python2.7 on
# PATH. Its packages come from PyPI into build/autobahn; without Python 2.7 the test is skipped.
PYTHON2 ?= $(or $(lastword $(wildcard $(HOME)/.pyenv/versions/2.7*/bin/python2.7)),$(shell command -v python2.7 2>/dev/null))
autobahn-deps:
	@if [ -z "$(PYTHON2)" ]; then echo "autobahn-deps: no Python 2.7 found, the conformance test will be skipped"; exit 0; fi; \
	if [ -f build/autobahn/autobahntestsuite/wstest.py ]; then exit 0; fi; \
	rm -rf build/autobahn.tmp; $(PYTHON2) -m pip install -q --disable-pip-version-check --target build/autobahn.tmp autobahntestsuite \
	  && rm -rf build/autobahn && mv build/autobahn.tmp build/autobahn

autobahn: autobahn-deps  ## run the Autobahn conformance suite alone, printing every non-OK case
	$(PYTHON) tests/autobahn/run.py

bench: install
	cargo bench --bench pipeline

clean:
	cargo clean
	rm -rf dist build .pytest_cache .ruff_cache .mypy_cache
