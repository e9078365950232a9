#!/usr/bin/env bash
# GPU check: run the prebuilt test and bench executables on a machine with a CUDA GPU and
# driver but no Rust toolchain. Fits in about 8 minutes.
#
# Before (on a machine with Rust, same OS/glibc family):
#   cargo test --no-run --message-format=json | jq -r 'select(.executable != null) | .executable'
#   cargo bench --no-run --message-format=json  | jq -r 'select(.executable != null) | .executable'
#   and copy those executables into target/gpu-bin/ (git-ignored), e.g.
#   scripts/gpu-check.sh --collect      # does exactly that
# Then on the GPU machine:
#   OUT=/some/dir scripts/gpu-check.sh [BIN_DIR] [OUT_DIR]
# Logs go to $OUT (or the second argument, default target/gpu-check); a short table is
# printed last. The tests run with IMPLICIT_ETF_DEVICE=cuda, so a missing GPU fails them.
set -uo pipefail
cd "$(dirname "$0")/.."

if [[ "${1:-}" == "--collect" ]]; then
  set -e
  dst=target/gpu-bin
  rm -rf "$dst"; mkdir -p "$dst"
  for cmd in "cargo test --no-run" "cargo bench --no-run"; do
    $cmd --message-format=json 2>/dev/null \
      | python3 -c 'import sys, json
for l in sys.stdin:
    try: m = json.loads(l)
    except Exception: continue
    e = m.get("executable")
    if e: print(e)' \
      | sort -u | while read -r exe; do cp "$exe" "$dst/"; done
  done
  ls -l "$dst"
  exit 0
fi

BIN=${1:-target/gpu-bin}
OUTDIR=${2:-${OUT:-target/gpu-check}}
mkdir -p "$OUTDIR"
[[ -d "$BIN" ]] || { echo "no executables in $BIN (run scripts/gpu-check.sh --collect first)" >&2; exit 2; }
nvidia-smi > "$OUTDIR/nvidia-smi.txt" 2>&1 || true
rows=()
status=0
for exe in "$BIN"/*; do
  [[ -x "$exe" && -f "$exe" ]] || continue
  name=$(basename "$exe")
  case "$name" in
    cuda-*)  # the criterion bench of the whole head vs a linear head, run briefly
      t0=$(date +%s)
      IMPLICIT_ETF_DEVICE=cuda timeout 300 "$exe" --bench --warm-up-time 1 --measurement-time 2 > "$OUTDIR/$name.log" 2>&1
      rc=$?
      rows+=("$name|bench|rc=$rc|$(( $(date +%s) - t0 ))s")
      ;;
    cpu-*) continue ;;  # the CPU-backend criterion bench is not part of the GPU check
    *)
      t0=$(date +%s)
      IMPLICIT_ETF_DEVICE=cuda RUST_BACKTRACE=1 timeout 150 "$exe" --include-ignored --test-threads=1 > "$OUTDIR/$name.log" 2>&1
      rc=$?
      res=$(grep -E "^test result:" "$OUTDIR/$name.log" | tail -n1 | sed 's/test result: //; s/; finished.*//')
      rows+=("$name|test|rc=$rc ${res}|$(( $(date +%s) - t0 ))s")
      ;;
  esac
  [[ $rc -eq 0 ]] || status=1
done
{
  echo
  echo "GPU check ($(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null | head -n1))"
  printf '%-40s %-6s %-60s %s\n' executable kind result time
  for r in "${rows[@]}"; do IFS='|' read -r a b c d <<< "$r"; printf '%-40s %-6s %-60s %s\n' "$a" "$b" "$c" "$d"; done
  for f in "$OUTDIR"/cuda-*.log; do [[ -f "$f" ]] && { echo; echo "timing ($(basename "$f"), criterion [low median high]):"; grep -E "device:|skipped|cuda_head_fwd_bwd/|cuda_eig/|sweeps|time:" "$f" | sed -E 's/^ +/    /'; }; done
} | tee "$OUTDIR/summary.txt"
exit $status
