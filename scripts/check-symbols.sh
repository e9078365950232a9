#!/usr/bin/env bash
# Symbol hygiene of the CPU execution (run by .ci/run): a user's binary that links the crate
# with its default features (.ci/symbols) must export no kernel name, no CUDA thread-index
# global (threadIdx, blockIdx, blockDim, gridDim) and no CPU-runtime entry point as a global
# symbol, and must contain no test-only kernel (kernels/test/) at all.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/target}
cargo build --quiet --manifest-path .ci/symbols/Cargo.toml
BIN="$CARGO_TARGET_DIR/debug/implicit-etf-symbols"
"$BIN" # it runs: the kernels are really linked in
# Every kernel name of kernels/**/*.cu.
mapfile -t KERNELS < <(grep -rhoE 'extern "C" __global__ void [A-Za-z0-9_]+' kernels | awk '{print $5}' | sort -u)
mapfile -t TEST_KERNELS < <(grep -rhoE 'extern "C" __global__ void [A-Za-z0-9_]+' kernels/test | awk '{print $5}' | sort -u)
[[ ${#KERNELS[@]} -gt 20 ]] || { echo "found only ${#KERNELS[@]} kernels" >&2; exit 1; }
GLOBAL=$(nm --defined-only "$BIN" | awk '$2 ~ /^[A-Z]$/ {print $3}')
ALL=$(nm "$BIN" | awk '{print $NF}')
bad=0
for k in "${KERNELS[@]}" threadIdx blockIdx blockDim gridDim etf_cpu_launch; do
  if grep -qxF "$k" <<<"$GLOBAL"; then echo "exported: $k" >&2; bad=1; fi
done
if nm -C --defined-only "$BIN" | awk '$2 ~ /^[A-Z]$/' | grep -E 'etf_cpu::|etf_cpu_tramp_' >&2; then
  echo "exported: CPU-runtime symbols above" >&2; bad=1
fi
for k in "${TEST_KERNELS[@]}"; do
  if grep -q "$k" <<<"$ALL"; then echo "test kernel in the binary: $k" >&2; bad=1; fi
done
local_count=$(nm "$BIN" | awk '$2 ~ /^[a-z]$/' | grep -c 'etf_cpu_tramp_' || true)
[[ $local_count -gt 20 ]] || { echo "the kernels do not seem to be linked in ($local_count trampolines)" >&2; exit 1; }
[[ $bad == 0 ]] || exit 1
echo "symbols: ${#KERNELS[@]} kernels and the thread indices are local; ${#TEST_KERNELS[@]} test kernels absent ($local_count local trampolines)"
