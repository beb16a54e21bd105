#!/usr/bin/env bash
# Everything a GPU session checks and measures, in two phases that each fit one 10-minute device call:
#   bash benchmarks/gpu_session.sh kernels OUT   # kernel tests compiled on the GPU, then the kernel sweep
#   bash benchmarks/gpu_session.sh e2e OUT [GGUF] # (optional) convert the SmolLM2 GGUF, then end-to-end decode
# Results land in OUT (copy them to benchmarks/results/ and commit).
set -uo pipefail
phase=$1
out=${2:-benchmarks/results}
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}. PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader
case "$phase" in
  kernels)
    timeout 200 python3 -m pytest tests/test_decode_attention.py tests/test_selective_gemm.py -x -q \
      -p no:cacheprovider 2>&1 | tail -n 3
    timeout 420 python3 -m benchmarks.kernels --out "$out" 2>&1 | grep -v "^W0000\|Warning"
    ;;
  e2e)
    gguf=${3:-}
    if [ -n "$gguf" ]; then
      python3 -m polar_jax.cli convert "$gguf" models/smollm2-135m-instruct --dtype bf16 --overwrite 2>&1 | tail -n 1
    fi
    timeout 540 python3 -m benchmarks.generate --out "$out" 2>&1 | grep -v "^W0000\|Warning"
    ;;
  *) echo "unknown phase $phase (kernels | e2e)"; exit 2 ;;
esac
