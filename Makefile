# `make demo` sets up .venv/ and runs DreamBooth on the toy world (scripts/toy_demo.py); `make test` runs the tests
# (`make test-all` those marked slow too).
# Both create or reuse .venv/ at the repository root.
.PHONY: demo demo-drift test test-all venv venv-test

venv:
	tools/setup_venv.sh requirements.txt

venv-test:
	tools/setup_venv.sh requirements-test.txt

demo: venv
	.venv/bin/python scripts/toy_demo.py

demo-drift: venv
	.venv/bin/python scripts/toy_demo.py --drift

test: venv-test
	.venv/bin/python -m pytest tests -q -n 2 --dist loadfile

test-all: venv-test
	.venv/bin/python -m pytest tests -q -n 2 --dist loadfile --slow
