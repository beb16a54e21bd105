#!/usr/bin/env bash
# Set up the environment and run the test suite (CPU; Pallas kernels in interpret mode).
# Extra arguments go to pytest, e.g. ./test.sh -k decode_attention. Two worker processes (pytest-xdist), each
# taking whole test files, so that a file's module fixtures are built once; ./test.sh -n 0 runs in one process.
set -euo pipefail
cd "$(dirname "$0")"
bash scripts/setup_env.sh
exec .venv/bin/python -m pytest -n 2 --dist loadfile "$@"
