#!/usr/bin/env bash
# Set up the environment and run the test suite (CPU; Pallas kernels in interpret mode).
# Extra arguments go to pytest, e.g. ./test.sh -k decode_attention
set -euo pipefail
cd "$(dirname "$0")"
bash scripts/setup_env.sh
exec .venv/bin/python -m pytest "$@"
