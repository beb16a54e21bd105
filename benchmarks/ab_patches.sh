#!/usr/bin/env bash
# A/B of source patches on the dense decode step, on one GPU machine, in one log:
#   bash benchmarks/ab_patches.sh LOG CASES PATCH...
# runs `python -m benchmarks.generate --part dense --cases CASES` on the sources as they are, then with each
# PATCH applied (patch -p1, reverted after its run), then as they are again, and writes everything it prints
# (the GPU, each run's ceiling and step times) to LOG. A patch that does not apply or revert stops the script.
set -euo pipefail
log=${1:?usage: ab_patches.sh LOG CASES PATCH...}
cases=${2:?usage: ab_patches.sh LOG CASES PATCH...}
shift 2
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}. PYTHONUNBUFFERED=1
mkdir -p "$(dirname "$log")"
source <(sed -n "/^sources_hash()/,/^}/p" benchmarks/gpu_session.sh)  # the hash the GPU test ledger keys on
run() {  # run LABEL: one dense run, its ceiling and step lines
  echo "== $1"
  timeout 200 python3 -m benchmarks.generate --out "$(mktemp -d)" --part dense --cases "$cases" --name ab 2>&1 \
    | grep "ms/step\|^ceiling:"
}
{
  echo "# bash benchmarks/ab_patches.sh $log $cases $*"
  echo "# $(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null || echo no GPU), $(python3 -c 'import jax; print("jax", jax.__version__)'), $(date -u +%FT%TZ), sources $(sources_hash)"
  run "as committed"
  for p in "$@"; do
    patch -p1 -s --dry-run < "$p"
    patch -p1 -s < "$p"
    run "with $p"
    patch -R -p1 -s < "$p"
  done
  run "as committed"
} 2>&1 | tee "$log"
