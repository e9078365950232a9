#!/usr/bin/env bash
# Installs the pinned CUDA 13.0 compiler (nvcc + NVVM + CRT + runtime headers + CCCL + NVRTC)
# from PyPI into DIR, without root. Idempotent: a second run with the same pins does nothing.
# Prints the path of `nvcc` as its last line of stdout.
#
# Usage: scripts/install-cuda-toolchain.sh DIR
# Then:  NVCC=$(scripts/install-cuda-toolchain.sh DIR | tail -n1) cargo build
# (build.rs adds -I DIR/nvidia/cu13/include/cccl itself, found from the nvcc path.)
#
# Why 13.0: GPU machines with driver 580 (CUDA 13.0) reject PTX from a newer compiler.
set -euo pipefail
DIR=${1:?usage: $0 DIR}
PINS=(nvidia-cuda-nvcc==13.0.88 nvidia-nvvm==13.0.88 nvidia-cuda-crt==13.0.88
      nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85 nvidia-cuda-nvrtc==13.0.88)
STAMP="$DIR/.implicit-etf-toolchain"
WANT="${PINS[*]}"
mkdir -p "$DIR"
DIR=$(cd "$DIR" && pwd)
STAMP="$DIR/.implicit-etf-toolchain"
NVCC="$DIR/nvidia/cu13/bin/nvcc"
if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$WANT" && -x "$NVCC" ]]; then
  echo "pinned CUDA toolchain already in $DIR" >&2
else
  PY=${PYTHON:-$(command -v python3 || command -v python)}
  echo "installing ${WANT} into $DIR" >&2
  "$PY" -m pip install --quiet --disable-pip-version-check --no-deps --upgrade \
      --target "$DIR" "${PINS[@]}" >&2
  # pip does not keep the executable bit on every file of these wheels.
  chmod +x "$DIR"/nvidia/cu13/bin/* "$DIR"/nvidia/cu13/nvvm/bin/* 2>/dev/null || true
  echo "$WANT" > "$STAMP"
fi
if [[ ! -x "$NVCC" ]]; then
  NVCC=$(find "$DIR" -type f -name nvcc -perm -u+x | head -n1)
fi
[[ -x "$NVCC" ]] || { echo "nvcc not found under $DIR" >&2; exit 1; }
"$NVCC" --version >&2
echo "$NVCC"
