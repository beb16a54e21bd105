#!/usr/bin/env bash
# Set up the environment, convert SmolLM2-135M-Instruct once, and generate for a batch of prompts.
# Extra arguments go to `polar demo` (see `.venv/bin/polar demo --help`).
set -euo pipefail
cd "$(dirname "$0")"
bash scripts/setup_env.sh
exec .venv/bin/polar demo "$@"
