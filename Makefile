# One way to do each thing: people, the README and .ci/run all call these targets.
PYTHON ?= python3
PIP := $(PYTHON) -m pip

.PHONY: install demo dev lint test test-rust test-python bench clean

install:  ## build (release) and install wspool
	$(PIP) install .

demo: install  ## consume the bundled mock stream, with live progress
	$(PYTHON) -m wspool demo

dev:  ## editable install with the test and lint tools
	$(PIP) install -e '.[dev]'

lint: dev
	cargo fmt --check
	cargo clippy --all-targets -- -D warnings
	cargo clippy --all-targets --features python -- -D warnings
	$(PYTHON) -m ruff check python tests benches
	$(PYTHON) -m ruff format --check python tests benches
	$(PYTHON) -m mypy
	$(PYTHON) -m mypy.stubtest wspool._native --ignore-missing-stub

test: dev test-rust test-python  ## install, then run the Rust and the Python tests

test-rust:
	cargo test

test-python:
	$(PYTHON) -m pytest

bench: install
	cargo bench --bench pipeline

clean:
	cargo clean
	rm -rf dist .pytest_cache .ruff_cache .mypy_cache
