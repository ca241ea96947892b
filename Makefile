# The two commands of the README. Both set up .venv first (quick when it is up to date).
.PHONY: setup demo test lint

setup:
	@scripts/setup.sh

# (1) the main job on its embedded default: the CPU toy run
demo: setup
	.venv/bin/trb-nemo train

# (2) the test suite
test: setup
	.venv/bin/python -m pytest

lint: setup
	.venv/bin/ruff check trb_nemo tests benchmarks examples
	.venv/bin/hadolint Dockerfile
