#!/usr/bin/env bash
# Type-checks the `candle-cuda` feature where no CUDA toolkit is installed (called by .ci/run).
#
# candle's `cuda` feature pulls in candle-kernels, whose build script compiles candle's kernels
# with nvcc. For this check only, candle-kernels is replaced (a cargo `patch` given on the
# command line) by a copy of the same release whose build script writes empty PTX strings:
# everything else, candle-core's real CUDA backend, cudarc, and this crate's CUDA path in
# src/candle.rs, is compiled and linted as it is. Nothing is linked or run (clippy only), so
# the empty kernels are never used. Cargo.lock is restored afterwards. The real build, with
# candle's kernels compiled by the pinned nvcc, is in scripts/ci-cuda.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
cargo fetch --quiet
VER=$(awk '$0 == "name = \"candle-kernels\"" { getline; gsub(/[^0-9.]/, ""); print; exit }' Cargo.lock)
[[ -n "$VER" ]] || { echo "candle-kernels is not in Cargo.lock" >&2; exit 1; }
SRC=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/candle-kernels-"$VER" 2>/dev/null | head -n1)
[[ -d "$SRC" ]] || { echo "candle-kernels $VER not in the cargo registry cache" >&2; exit 1; }
TMP=$(mktemp -d)
cp Cargo.lock "$TMP/Cargo.lock.orig"
trap 'cp "$TMP/Cargo.lock.orig" "$ROOT/Cargo.lock"; rm -rf "$TMP"' EXIT
cp -r "$SRC" "$TMP/candle-kernels"
chmod -R u+w "$TMP/candle-kernels"
# No build dependencies (cudaforge drives nvcc), and a build script that writes one empty PTX
# string per `mdl!(NAME, Id)` of src/lib.rs.
awk '/^\[/ { skip = ($0 ~ /^\[build-dependencies/) } !skip' "$SRC/Cargo.toml" > "$TMP/candle-kernels/Cargo.toml"
cat > "$TMP/candle-kernels/build.rs" <<'RS'
fn main() {
    let lib = std::fs::read_to_string("src/lib.rs").unwrap();
    let mut ptx = String::new();
    for line in lib.lines() {
        if let Some(rest) = line.trim().strip_prefix("mdl!(") {
            let name = rest.split(',').next().unwrap().trim();
            ptx.push_str(&format!("pub const {name}: &str = \"\";\n"));
        }
    }
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR").unwrap());
    std::fs::write(out.join("ptx.rs"), ptx).unwrap();
}
RS
cargo clippy --all-targets --features candle-cuda \
  --config "patch.crates-io.candle-kernels.path=\"$TMP/candle-kernels\"" -- -D warnings
