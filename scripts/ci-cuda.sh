#!/usr/bin/env bash
# CI of the CUDA part (called by .ci/run after fmt/clippy/test):
#  1. installs the pinned CUDA 13.0 compiler from PyPI, cached outside the clone
#     (~/.cache/implicit-etf/cuda-13.0, override with IMPLICIT_ETF_CUDA_CACHE);
#  2. builds with that nvcc (IMPLICIT_ETF_REQUIRE_NVCC=1: every kernels/*.cu must compile to
#     PTX and to an sm_90 cubin) and the CPU execution under AddressSanitizer
#     (IMPLICIT_ETF_ASAN=1);
#  3. fails on any register spill (or static shared memory > 48 KiB) in the ptxas report;
#  4. runs the README's test command (`cargo test`) with every test binary started under
#     the ASan runtime (this script is its own cargo runner, see --asan-run).
#  5. checks the `candle-cuda` feature with clippy: candle's own kernels need nvcc at build
#     time (the same pinned one, CUDA_COMPUTE_CAP=90 since no GPU is asked).
# No GPU needed. Prints its duration last.
set -euo pipefail

if [[ "${1:-}" == "--asan-run" ]]; then
  # Cargo runner: `scripts/ci-cuda.sh --asan-run BINARY ARGS...`. allocator_may_return_null:
  # an allocation larger than memory must fail like the system allocator's (the hostile-input
  # tests check that it becomes Error::OutOfMemory), not abort.
  shift
  LD_PRELOAD="$(gcc -print-file-name=libasan.so)${LD_PRELOAD:+:$LD_PRELOAD}" \
  ASAN_OPTIONS="${ASAN_OPTIONS:-detect_leaks=0:halt_on_error=1:allocator_may_return_null=1}" exec "$@"
fi

cd "$(dirname "$0")/.."
ROOT=$PWD
start=$(date +%s)
step() { echo "== ci-cuda [$(( $(date +%s) - start ))s] $*"; }

CACHE=${IMPLICIT_ETF_CUDA_CACHE:-$HOME/.cache/implicit-etf/cuda-13.0}
step "toolchain into $CACHE"
NVCC=$(bash scripts/install-cuda-toolchain.sh "$CACHE" | tail -n1)
export NVCC IMPLICIT_ETF_REQUIRE_NVCC=1 IMPLICIT_ETF_ASAN=1
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
mkdir -p "$TARGET"
REPORT="$TARGET/ptxas-report.tsv"
export IMPLICIT_ETF_PTXAS_REPORT_OUT="$REPORT"
rm -f "$REPORT"

step "build (nvcc: $NVCC; CPU execution with AddressSanitizer)"
cargo test --no-run --quiet

step "ptxas report ($REPORT)"
[[ -s "$REPORT" ]] || { echo "no ptxas report written" >&2; exit 1; }
column -t -s $'\t' "$REPORT" || cat "$REPORT"
bad=$(awk -F'\t' 'NR > 1 && ($4 != 0 || $5 != 0 || $7 > 49152) { print $2 " (spill stores " $4 " B, loads " $5 " B, smem " $7 " B)" }' "$REPORT")
if [[ -n "$bad" ]]; then
  echo "register spills / shared memory over 48 KiB:" >&2
  echo "$bad" >&2
  exit 1
fi

step "cargo test under AddressSanitizer"
export CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUNNER="$ROOT/scripts/ci-cuda.sh --asan-run"
cargo test

step "clippy: candle-cuda (candle's kernels built with $NVCC, CUDA_COMPUTE_CAP=90)"
unset CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUNNER
NVCC_DIR=$(dirname "$NVCC")
PATH="$NVCC_DIR:$PATH" CUDA_ROOT="$(dirname "$NVCC_DIR")" CUDA_PATH="$(dirname "$NVCC_DIR")" \
  CUDA_COMPUTE_CAP=90 cargo clippy --all-targets --features candle-cuda -- -D warnings

step "done in $(( $(date +%s) - start ))s"
