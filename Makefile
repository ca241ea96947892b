# The two commands of the README. Both set up .venv first (quick when it is up to date).
.PHONY: setup demo test lint wheels gpu-check

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

# A GPU machine without internet (CUDA PyTorch in its system Python, no .venv): `make wheels`
# where the package index is reachable (41 MB for x86_64; ARCH="x86_64 aarch64" adds Grace,
# WITH_TRANSFORMERS=1 the optional transformers), copy the repository with wheels/ over, then
# `make gpu-check` there (PYTHON= picks the interpreter, GPU_CHECK_BUDGET_S= the time budget,
# 450 s; GPU_CHECK_INSTALL_ONLY=1 stops after the install step). No `setup`: that machine has
# no venv. Variables given on make's command line reach the scripts' environment.
WHEELS ?= wheels
OUT ?= gpu-check-out

wheels:
	@scripts/fetch_wheels.sh "$(WHEELS)"

gpu-check:
	@scripts/gpu_check.sh "$(WHEELS)" "$(OUT)"
