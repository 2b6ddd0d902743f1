#!/usr/bin/env bash
# Builds and runs every libFuzzer target in tests/fuzz for a bounded time each (issue 8:
# hostile input must never panic, hang or blow up memory).
#
#   tests/harness/fuzz.sh [TARGET...]        default: every target
#   FUZZ_SECONDS=60 tests/harness/fuzz.sh    time per target (default 20)
#
#   FUZZ_SANITIZER=address tests/harness/fuzz.sh   (default: none)
#
# No sanitizer by default: every target is safe Rust, where AddressSanitizer finds nothing
# and would halve the executions per second; without one, cargo-fuzz passes only stable rustc
# flags (the sancov pass and its LLVM options). Only a stable toolchain exists here, so
# RUSTC_BOOTSTRAP=1 unlocks the `-Z sanitizer` flags when a sanitizer is asked for.
# Debug assertions stay on so integer overflows panic (a crash) instead of wrapping.
#
# Seeds: the YAML fixtures of crates/smi-api/tests/fixtures (read live) and tests/fuzz/seeds
# (JSON objects and ConversionReviews, protobuf WatchEvents and Apply/Sync requests made from
# those fixtures). New inputs go to a scratch corpus; a crash leaves its input under
# tests/fuzz/artifacts/<target>/ and fails the script.
set -euo pipefail
cd "$(dirname "$0")/../.."

seconds="${FUZZ_SECONDS:-20}"
cache="${CONSUL_SMI_CACHE:-$HOME/.cache/consul-smi}"
cargo_fuzz_version="${CARGO_FUZZ_VERSION:-0.13.2}"
export RUSTC_BOOTSTRAP=1
# Its own target directory (cached like the other harness builds): the instrumented build
# shares nothing with the workspace build.
target_dir="${FUZZ_TARGET_DIR:-$cache/fuzz-target}"

if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "fuzz: installing cargo-fuzz $cargo_fuzz_version" >&2
  cargo install cargo-fuzz --version "$cargo_fuzz_version" --locked
fi

fuzz_dir=tests/fuzz
fixtures=crates/smi-api/tests/fixtures
all_targets=(manifests decode_object convert_review watch_event apply_request)
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=("${all_targets[@]}")

flags=(--fuzz-dir "$fuzz_dir" --target-dir "$target_dir" --sanitizer "${FUZZ_SANITIZER:-none}" --debug-assertions)
started=$(date +%s)
echo "fuzz: building ${targets[*]}" >&2
if [ $# -eq 0 ]; then
  cargo fuzz build "${flags[@]}"
else
  for target in "${targets[@]}"; do cargo fuzz build "${flags[@]}" "$target"; done
fi
echo "fuzz: built in $(( $(date +%s) - started )) s" >&2

scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
for target in "${targets[@]}"; do
  corpus="$scratch/$target"
  seeds=("$fuzz_dir/seeds/$target")
  # libFuzzer reads seed directories recursively: every fixture, valid, invalid and hostile.
  [ "$target" = manifests ] && seeds=("$fixtures")
  mkdir -p "$corpus" "$fuzz_dir/artifacts/$target"
  echo "fuzz: $target for ${seconds} s" >&2
  # -rss_limit_mb: a billion-laughs style input must fail, not eat the machine.
  # -timeout: one input taking longer than this is reported as a hang.
  cargo fuzz run "${flags[@]}" "$target" "$corpus" "${seeds[@]}" -- \
    -max_total_time="$seconds" -rss_limit_mb=2048 -timeout=10 -max_len=65536 \
    -print_final_stats=1 2>"$scratch/$target.log" || {
      tail -n 60 "$scratch/$target.log" >&2
      echo "fuzz: $target FAILED; the input is in $fuzz_dir/artifacts/$target/; reproduce with:" >&2
      echo "  RUSTC_BOOTSTRAP=1 cargo fuzz run ${flags[*]} $target <artifact>" >&2
      exit 1
    }
  grep -E '^stat::number_of_executed_units|^stat::peak_rss_mb|^#[0-9]+.*DONE' "$scratch/$target.log" | sed "s/^/fuzz: $target: /" >&2 || true
done
echo "fuzz: ${#targets[@]} targets passed in $(( $(date +%s) - started )) s" >&2
