#!/usr/bin/env bash
# GPU check: run the prebuilt test and bench executables on a machine with a CUDA GPU and
# driver but no Rust toolchain. Fits in 5 minutes (GPU_CHECK_BUDGET seconds, default 285).
#
# Before (on a machine with Rust, same OS/glibc family):
#   scripts/gpu-check.sh --collect      # cargo test/bench --no-run, executables into target/gpu-bin/
#   (stripped of debug information, ~200 MB; also target/gpu-bin.tar.xz, ~13 MB, to carry)
# Then on the GPU machine:
#   OUT=/some/dir scripts/gpu-check.sh [BIN_DIR | target/gpu-bin.tar.xz] [OUT_DIR]
#   scripts/gpu-check.sh --summary OUT_DIR   # print the table again from the logs of a run
#
# What it does, in this order (the most valuable first, so a short machine lease still gets it):
#  1. LD_LIBRARY_PATH: adds the directories of libcublas, libcublasLt, libcusolver, libcusparse,
#     libnvJitLink, libnccl and libnvrtc found anywhere on the machine (`find /`; the GPU image
#     keeps them in a Python environment); the list goes to OUT/libdirs.txt. cudarc loads NCCL
#     as libnccl.so (or libnccl.so.<CUDA major>), never libnccl.so.2, the one name PyTorch's
#     nvidia-nccl-cu13 ships: when only that is found, a libnccl.so link to it in a temporary
#     directory joins the path.
#  2. the cuda bench (`cuda-*`), briefly (criterion `--warm-up-time 1 --measurement-time 2
#     --noplot`), at most GPU_CHECK_BENCH_TIMEOUT s (150): head fwd+bwd vs the linear head, the
#     stage profile (`STAGE ...` lines), the world-size-1 NCCL all-reduce of the forward's
#     packed statistics (K d + K + d + 2 f32 at K = 1000, d = 2048) against a device-to-device
#     copy of as many values, then the eigensolver group (cut by the timeout if slow).
#  3. the test executables with IMPLICIT_ETF_DEVICE=cuda (a missing GPU fails them),
#     `--include-ignored`, GPU_CHECK_TEST_THREADS threads (4): the device tests first, then
#     the others, each with at most min(90 s, what is left of the budget); those the budget
#     does not reach are listed as skipped. The NCCL test (tests/nccl.rs: a world-size-1 NCCL
#     group, 3 head steps against a head without it) runs first, with --nocapture, and gives
#     the row "NCCL world-size-1 step: pass/FAIL/skipped (why)" (skipped without libnccl).
# Logs go to OUT_DIR (second argument, else $OUT, else target/gpu-check); a short table is
# printed last (also OUT_DIR/summary.txt): per test executable pass/fail, the NCCL step, the
# head timings (criterion medians) with the ratio to the linear head, the per-stage table, the
# stream operations per step against the targets, and the all-reduce against the copy. Exit
# status: 0 when every step passed.
set -uo pipefail
cd "$(dirname "$0")/.."
# Temporary directories, removed on exit.
cleanup=()
trap 'rm -rf ${cleanup[@]+"${cleanup[@]}"}' EXIT

if [[ "${1:-}" == "--collect" ]]; then
  set -e
  dst=target/gpu-bin
  rm -rf "$dst" "$dst.tar.xz" "$dst.tar.gz"; mkdir -p "$dst"
  # Test harnesses (lib unit tests, tests/*.rs) from `cargo test`, benches from `cargo bench`:
  # not the examples `cargo test --no-run` also builds, nor the lib's bench-profile harness
  # (the unit tests again).
  for mode in test bench; do
    cargo "$mode" --no-run --message-format=json 2>/dev/null \
      | python3 -c 'import sys, json
want = {"test": {"lib", "test"}, "bench": {"bench"}}[sys.argv[1]]
for l in sys.stdin:
    try: m = json.loads(l)
    except Exception: continue
    e = m.get("executable")
    if e and want & set(m.get("target", {}).get("kind", [])): print(e)' "$mode" \
      | sort -u | while read -r exe; do cp "$exe" "$dst/"; done
  done
  # Without debug information (symbols kept for backtraces): ~10 MB instead of ~120 MB each.
  if command -v strip > /dev/null; then strip --strip-debug "$dst"/*; fi
  # One archive to carry to the GPU machine (pass it as BIN_DIR there).
  if command -v xz > /dev/null; then
    tar -C target -cf - gpu-bin | xz -9 -T0 > "$dst.tar.xz"; arc=$dst.tar.xz
  else
    tar -C target -czf "$dst.tar.gz" gpu-bin; arc=$dst.tar.gz
  fi
  ls -l "$dst" "$arc"
  exit 0
fi

# The table, from the logs in $1 (tests.tsv and cuda-*.log).
summary() {
  local dir=$1
  echo
  local gpu; gpu=$(cat "$dir/gpu.txt" 2>/dev/null)
  echo "GPU check (${gpu:-no GPU name: nvidia-smi failed})"
  if [[ -f "$dir/tests.tsv" ]]; then
    printf '%-22s %-5s %-8s %-34s %s\n' executable kind verdict result time
    while IFS=$'\t' read -r name kind verdict result secs; do
      printf '%-22s %-5s %-8s %-34s %s\n' "$name" "$kind" "$verdict" "$result" "$secs"
    done < "$dir/tests.tsv"
  fi
  echo "NCCL world-size-1 step: $(cat "$dir/nccl.txt" 2>/dev/null || echo 'not run (no nccl test executable)')"
  local log
  for log in "$dir"/cuda-*.log; do
    [[ -f "$log" ]] || continue
    echo
    grep -m1 -E "^device:|CUDA part skipped" "$log" || true
    awk '
      { gsub(/\033\[[0-9;]*[A-Za-z]/, "") }  # colours, if criterion printed any
      function micros(v, u) {
        if (u == "ps") return v / 1000000
        if (u == "ns") return v / 1000
        if (u == "ms") return v * 1000
        if (u == "s") return v * 1000000
        return v  # µs / us
      }
      function fmt(us) {
        if (us == "") return "-"
        if (us >= 1000) return sprintf("%.3f ms", us / 1000)
        return sprintf("%.1f us", us)
      }
      function ratio(a, b) { return (a == "" || b == "" || b == 0) ? "-" : sprintf("%.1fx", a / b) }
      # A criterion result: the id on its own line or before "time:", the median the middle
      # of the three values.
      /^cuda_(head_fwd_bwd|eig|allreduce)\/[^ ]+/ { split($1, p, "/"); fn = p[2]; arg = p[3]; grp = p[1] }
      /time: +\[/ && fn != "" {
        s = $0; sub(/.*time: +\[/, "", s); n = split(s, t, " ")
        med = micros(t[3] + 0, t[4])
        if (grp == "cuda_head_fwd_bwd") {
          if (!(arg in seen)) { seen[arg] = 1; ids[++nid] = arg }
          head[fn, arg] = med
        } else if (grp == "cuda_allreduce") { ar[fn] = med; arid = arg }
        else { eig[++neig] = fn "/" arg; eigt[neig] = med }
        fn = ""
      }
      /sweeps$/ { sweeps[++nsw] = $0 }
      /^NCCL all-reduce skipped/ { arskip = $0 }
      /^STAGE d=/ {
        # STAGE d=<d> K=<k> <label...> <us> us <ops> ops
        shape = $2 " " $3; label = $4
        for (i = 5; i <= NF - 4; i++) label = label " " $i
        if (!(shape in sseen)) { sseen[shape] = 1; shapes[++nsh] = shape }
        if (!(label in lseen)) { lseen[label] = 1; labels[++nl] = label }
        st[shape, label] = $(NF - 3); so[shape, label] = $(NF - 1)
      }
      /^STAGETOTAL d=/ { shape = $2 " " $3; tot[shape] = $4; totops[shape] = $6 }
      /^STEP d=/ { wall[$2 " " $3] = $5 }
      /^OPS d=/ { ops[$2 " " $3] = $5 }
      END {
        if (nid > 0) {
          print "head fwd+bwd, N = 256, criterion medians (uncaptured / graph / linear head):"
          printf "  %-16s %-11s %-11s %-11s %-13s %s\n", "shape", "head", "head graph", "linear", "head/linear", "graph/linear"
          for (i = 1; i <= nid; i++) {
            a = ids[i]; h = head["implicit_etf", a]; g = head["implicit_etf_graph", a]; l = head["linear_baseline", a]
            printf "  %-16s %-11s %-11s %-11s %-13s %s\n", a, fmt(h), fmt(g), fmt(l), ratio(h, l), ratio(g, l)
          }
          print "  targets: graph <= 100 us at N256_d2048_K100, <= 2 ms at N256_d2048_K1000"
        } else print "head fwd+bwd: no criterion result in the log"
        if (nsh > 0) {
          print "stages (uncaptured steps, median per stage; a stage ends at its mark):"
          printf "  %-26s", "stage"
          for (j = 1; j <= nsh; j++) printf " %-24s", shapes[j]
          printf "\n"
          for (i = 1; i <= nl; i++) {
            printf "  %-26s", labels[i]
            for (j = 1; j <= nsh; j++) {
              k = shapes[j] SUBSEP labels[i]
              printf " %-24s", ((k in st) ? sprintf("%9.1f us %4d ops", st[k], so[k]) : "-")
            }
            printf "\n"
          }
          printf "  %-26s", "total (sum of stages)"
          for (j = 1; j <= nsh; j++) printf " %-24s", sprintf("%9.1f us %4d ops", tot[shapes[j]], totops[shapes[j]])
          printf "\n  %-26s", "step wall, profiling off"
          for (j = 1; j <= nsh; j++) printf " %-24s", sprintf("%9.1f us", wall[shapes[j]])
          printf "\n  %-26s", "stream ops / step (off)"
          for (j = 1; j <= nsh; j++) printf " %-24s", sprintf("%9d", ops[shapes[j]])
          printf "\n  targets: stream ops <= 40 at K=100, <= 60 at K=1000\n"
        } else print "stages: no STAGE lines in the log"
        if (("nccl_world1" in ar) || ("d2d_copy_baseline" in ar) || arskip != "") {
          print "all-reduce of K d + K + d + 2 f32 values (" arid "), criterion medians, one synchronise each:"
          n1 = ("nccl_world1" in ar) ? ar["nccl_world1"] : ""
          cp = ("d2d_copy_baseline" in ar) ? ar["d2d_copy_baseline"] : ""
          printf "  %-34s %s\n", "NCCL all-reduce, world size 1", fmt(n1)
          printf "  %-34s %s\n", "device-to-device copy (baseline)", fmt(cp)
          printf "  %-34s %s\n", "all-reduce / copy", ratio(n1, cp)
          if (arskip != "") print "  " arskip
        }
        if (neig > 0) {
          print "eigensolvers alone (criterion medians):"
          for (i = 1; i <= neig; i++) printf "  %-34s %s\n", eig[i], fmt(eigt[i])
          for (i = 1; i <= nsw; i++) print "  " sweeps[i]
        }
      }' "$log"
  done
}

if [[ "${1:-}" == "--summary" ]]; then
  summary "${2:?usage: scripts/gpu-check.sh --summary OUT_DIR}"
  exit 0
fi

BIN=${1:-target/gpu-bin}
OUTDIR=${2:-${OUT:-target/gpu-check}}
if [[ -f "$BIN" && "$BIN" == *.tar.* ]]; then  # the archive of --collect: unpack outside OUT
  tmp=$(mktemp -d); cleanup+=("$tmp")
  tar -C "$tmp" -xf "$BIN" || { echo "cannot unpack $BIN" >&2; exit 2; }
  BIN=$tmp/gpu-bin
fi
BUDGET=${GPU_CHECK_BUDGET:-285}
BENCH_TIMEOUT=${GPU_CHECK_BENCH_TIMEOUT:-150}
THREADS=${GPU_CHECK_TEST_THREADS:-4}
START=$(date +%s)
left() { echo $(( BUDGET - ($(date +%s) - START) )); }
mkdir -p "$OUTDIR"
[[ -d "$BIN" ]] || { echo "no executables in $BIN (run scripts/gpu-check.sh --collect first)" >&2; exit 2; }
: > "$OUTDIR/tests.tsv"; rm -f "$OUTDIR/nccl.txt"
nvidia-smi > "$OUTDIR/nvidia-smi.txt" 2>&1 || true
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null | head -n1 > "$OUTDIR/gpu.txt"

# 1. The CUDA libraries' directories.
timeout 60 find / \( -path /proc -o -path /sys -o -path /dev \) -prune -o \( -name 'libcublas.so*' \
  -o -name 'libcublasLt.so*' -o -name 'libcusolver.so*' -o -name 'libcusparse.so*' -o -name 'libnvJitLink.so*' \
  -o -name 'libnccl.so*' -o -name 'libnvrtc.so*' \) -print 2>/dev/null > "$OUTDIR/libfiles.txt"
xargs -r -n1 dirname < "$OUTDIR/libfiles.txt" | awk '!seen[$0]++' > "$OUTDIR/libdirs.txt"
# cudarc loads libnccl.so, not libnccl.so.2 (nvidia-nccl-cu13's only name): link it.
if ! grep -qE '/libnccl\.so$' "$OUTDIR/libfiles.txt"; then
  nccl2=$(grep -m1 -E '/libnccl\.so\.2$' "$OUTDIR/libfiles.txt" || grep -m1 -E '/libnccl\.so\.2\.' "$OUTDIR/libfiles.txt")
  if [[ -n "$nccl2" ]]; then
    ncclink=$(mktemp -d); cleanup+=("$ncclink")
    ln -s "$nccl2" "$ncclink/libnccl.so" && echo "$ncclink" >> "$OUTDIR/libdirs.txt"
    echo "libnccl.so -> $nccl2 (in $ncclink)" > "$OUTDIR/nccl-link.txt"
  fi
fi
libdirs=$(paste -sd: "$OUTDIR/libdirs.txt")
export LD_LIBRARY_PATH="${libdirs}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH" > "$OUTDIR/env.txt"

status=0
row() { printf '%s\t%s\t%s\t%s\t%s\n' "$@" >> "$OUTDIR/tests.tsv"; }

# 2. The bench.
for exe in "$BIN"/cuda-*; do
  [[ -x "$exe" && -f "$exe" ]] || continue
  name=$(basename "$exe"); t0=$(date +%s)
  IMPLICIT_ETF_DEVICE=cuda timeout "$BENCH_TIMEOUT" "$exe" --bench --warm-up-time 1 --measurement-time 2 --noplot \
    > "$OUTDIR/$name.log" 2>&1
  rc=$?
  case $rc in 0) v=pass ;; 124) v=timeout ;; *) v=FAIL; status=1 ;; esac
  row "${name%-*}" bench "$v" "rc=$rc" "$(( $(date +%s) - t0 ))s"
done

# 3. The tests: the device tests first.
order=(nccl implicit_etf device_head device_capture device_head_errors device_interop device_eig kernels_exec
       hostile head_trait properties alloc)
exes=()
for p in "${order[@]}"; do for e in "$BIN/$p"-*; do [[ -f "$e" ]] && exes+=("$e"); done; done
for e in "$BIN"/*; do
  n=$(basename "$e"); n=${n%-*}
  [[ -f "$e" && -x "$e" ]] || continue
  [[ " ${order[*]} cuda cpu " == *" $n "* ]] || exes+=("$e")
done
for exe in "${exes[@]}"; do
  name=$(basename "$exe"); short=${name%-*}
  budget=$(left)
  if (( budget < 10 )); then
    row "$short" test skipped "time budget spent" "-"
    [[ $short == nccl ]] && echo "skipped (time budget spent)" > "$OUTDIR/nccl.txt"
    continue
  fi
  (( budget > 90 )) && budget=90
  t0=$(date +%s)
  extra=() th=$THREADS
  # Its pass / skip line goes to the summary: printed, and not interleaved with other tests'.
  [[ $short == nccl ]] && extra=(--nocapture) th=1
  IMPLICIT_ETF_DEVICE=cuda RUST_BACKTRACE=1 timeout "$budget" "$exe" --include-ignored --test-threads="$th" \
    ${extra[@]+"${extra[@]}"} > "$OUTDIR/$name.log" 2>&1
  rc=$?
  if [[ $short == nccl ]]; then
    why=$(grep -o -m1 'NCCL check skipped: .*' "$OUTDIR/$name.log" | sed 's/^NCCL check skipped: //')
    if (( rc == 0 )) && grep -q 'NCCL world-size-1 step: pass' "$OUTDIR/$name.log"; then nv=pass
    elif (( rc == 0 )) && [[ -n "$why" ]]; then nv="skipped ($why)"
    else nv="FAIL (rc=$rc, see $name.log)"; fi
    echo "$nv" > "$OUTDIR/nccl.txt"
  fi
  # "test result: ok. 12 passed; 0 failed; 1 ignored; 0 measured; ..." -> "12 passed, 0 failed, 1 ignored"
  res=$(grep -E "^test result:" "$OUTDIR/$name.log" | tail -n1 \
    | sed -E 's/.* ([0-9]+) passed; ([0-9]+) failed; ([0-9]+) ignored.*/\1 passed, \2 failed, \3 ignored/')
  case $rc in 0) v=pass ;; 124) v=timeout; status=1 ;; *) v=FAIL; status=1 ;; esac
  row "$short" test "$v" "${res:-rc=$rc}" "$(( $(date +%s) - t0 ))s"
done

summary "$OUTDIR" | tee "$OUTDIR/summary.txt"
exit $status
