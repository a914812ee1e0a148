# `make test` sets up .venv/ (created or reused) and runs the test suite.
.PHONY: test venv

venv:
	tools/setup_venv.sh requirements-test.txt

test: venv
	.venv/bin/python -m pytest tests -q
