# The two commands that matter (see README): `make demo` and `make test`.
.PHONY: setup demo test test-fast bench

setup:
	bash scripts/setup.sh

demo: setup
	.venv/bin/graphwright demo

test: setup
	bash scripts/install_chromium.sh
	.venv/bin/python -m pytest -q -n 2 --durations=15

test-fast: setup
	.venv/bin/python -m pytest -q -n 2 -m "not slow"

bench: setup
	.venv/bin/python bench/bench_runtime.py
