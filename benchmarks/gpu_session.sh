#!/usr/bin/env bash
# Everything a GPU session checks and measures, in phases that each fit one 10-minute device call:
#   bash benchmarks/gpu_session.sh tests                       # GPU test set + kernel tests compiled on the GPU
#   bash benchmarks/gpu_session.sh kernels OUT                 # kernel sweep -> OUT/kernels*.{json,md,png}
#   bash benchmarks/gpu_session.sh e2e OUT [dense|sparse|all] [GGUF]
#                                                              # (GGUF: convert SmolLM2 first) end-to-end decode
#   bash benchmarks/gpu_session.sh bench OUT SECONDS MODULE [ARGS...]
#                                                              # any benchmark module (bench_paged, serve_offline)
#   bash benchmarks/gpu_session.sh serve OUT [ARGS...]         # the HTTP server on W beside the offline engine
#                                                              # -> OUT/serve_http.{json,md,png} (carry .whl/server)
# The benchmark phases refuse to run unless `tests` passed on this machine for exactly these sources (a
# stamp under benchmarks/results/tmp/, which git ignores). Every command runs under `timeout`; the first
# failure (a test, a timeout, a benchmark that finds a figure above its ceiling) stops the session. Results
# are written to a staging folder and copied into OUT only when the whole phase succeeded; after a failure
# nothing is written to OUT (the staged files go to OUT.failed/ for inspection).
set -euo pipefail
phase=${1:?usage: gpu_session.sh tests | kernels OUT | e2e OUT [dense|sparse|all] [GGUF] | bench OUT SECONDS MODULE [ARGS...] | serve OUT [ARGS...]}
out=${2:-benchmarks/results}
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}. PYTHONUNBUFFERED=1
tmp=benchmarks/results/tmp
stamp=$tmp/gpu_tests_passed
mkdir -p "$tmp"

sources_hash() {  # the files the GPU tests check: the model, the engine and the kernels (not the HTTP server,
  # the evaluation front end or the benchmark scripts, which the tests do not run on the GPU)
  find polar_jax pallas_kernels -name '*.py' -not -path 'polar_jax/server/*' -not -path 'polar_jax/evals/*' \
    | LC_ALL=C sort | xargs sha256sum | sha256sum | cut -c1-16
}

quiet() { grep -v "^W0000\|Warning" || true; }  # drop JAX/XLA log noise; never fails the pipeline itself

step() {  # step SECONDS CMD...: run under a timeout, output filtered; exit with its status on failure
  local limit=$1
  shift
  echo "== $(date -u +%H:%M:%S) $* (limit ${limit}s)"
  local rc=0
  timeout --kill-after=15 "$limit" "$@" 2>&1 | quiet || rc=${PIPESTATUS[0]}
  if [ "$rc" -ne 0 ]; then
    [ "$rc" -eq 124 ] && echo "!! TIMED OUT after ${limit}s: $*" || echo "!! FAILED (exit $rc): $*"
    exit "$rc"
  fi
}

publish() {  # publish STAGE: copy the staged results into OUT (only reached when every step passed)
  mkdir -p "$out"
  cp -r "$1"/. "$out"/
  echo "== results written to $out: $(ls "$1" | tr '\n' ' ')"
}

require_tests() {
  if [ "$(cat "$stamp" 2>/dev/null)" != "$(sources_hash)" ]; then
    echo "!! the GPU tests have not passed on this machine for these sources: run 'bash benchmarks/gpu_session.sh tests' first"
    exit 4
  fi
}

nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader
rm -f "$stamp.new"
case "$phase" in
  tests)
    rm -f "$stamp"
    step 300 python3 -m pytest tests/test_gpu.py -m gpu -x -q -p no:cacheprovider
    step 150 python3 -m pytest tests/test_decode_attention.py tests/test_selective_gemm.py \
      tests/test_paged_attention.py tests/test_prefill_attention.py -x -q -p no:cacheprovider
    step 120 python3 -m pytest tests/test_paged_cache.py tests/test_engine.py -x -q -p no:cacheprovider
    sources_hash > "$stamp"
    echo "== GPU tests passed; stamp $(cat "$stamp")"
    ;;
  kernels)
    require_tests
    stage=$tmp/stage-kernels
    rm -rf "$stage" "$out.failed"
    trap 'rc=$?; if [ $rc -ne 0 ] && [ -d "$stage" ]; then mv "$stage" "$out.failed"; echo "!! nothing written to $out; partial files in $out.failed"; fi' EXIT
    step 560 python3 -m benchmarks.kernels --out "$stage"
    publish "$stage"
    ;;
  e2e)
    require_tests
    part=${3:-all}
    gguf=${4:-}
    stage=$tmp/stage-e2e
    rm -rf "$stage" "$out.failed"
    trap 'rc=$?; if [ $rc -ne 0 ] && [ -d "$stage" ]; then mv "$stage" "$out.failed"; echo "!! nothing written to $out; partial files in $out.failed"; fi' EXIT
    if [ -n "$gguf" ]; then
      step 60 python3 -m polar_jax.cli convert "$gguf" models/smollm2-135m-instruct --dtype bf16 --overwrite
    fi
    step 500 python3 -m benchmarks.generate --part "$part" --out "$stage"
    publish "$stage"
    ;;
  bench)
    require_tests
    limit=${3:?bench OUT SECONDS MODULE [ARGS...]}
    module=${4:?bench OUT SECONDS MODULE [ARGS...]}
    shift 4
    stage=$tmp/stage-$module
    rm -rf "$stage" "$out.failed"
    trap 'rc=$?; if [ $rc -ne 0 ] && [ -d "$stage" ]; then mv "$stage" "$out.failed"; echo "!! nothing written to $out; partial files in $out.failed"; fi' EXIT
    step "$limit" python3 -m "benchmarks.$module" --out "$stage" "$@"
    publish "$stage"
    ;;
  serve)
    require_tests
    shift $(( $# < 2 ? $# : 2 ))
    stage=$tmp/stage-serve
    rm -rf "$stage" "$out.failed"
    trap 'rc=$?; if [ $rc -ne 0 ] && [ -d "$stage" ]; then mv "$stage" "$out.failed"; echo "!! nothing written to $out; partial files in $out.failed"; fi' EXIT
    if [ -d .whl/server ]; then  # FastAPI, Starlette, pydantic, uvicorn: not in the GPU image
      python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/server/*.whl
      export PYTHONPATH=/tmp/site:$PYTHONPATH  # the server subprocesses inherit it
    fi
    python3 -c "import fastapi, uvicorn, pydantic" || { echo "!! no FastAPI/uvicorn/pydantic: carry .whl/server"; exit 3; }
    # The script keeps to --budget-s (450 s by default: it skips sweep points that would overrun) and stops its
    # servers on SIGTERM; the limit only catches a hang.
    step 510 python3 -m benchmarks.serve_http --out "$stage" "$@"
    publish "$stage"
    ;;
  *) echo "unknown phase $phase (tests | kernels | e2e | bench | serve)"; exit 2 ;;
esac
