#!/usr/bin/env bash
# Runs every fuzz target for N seconds (default 5) from the committed seed corpus, which is
# copied to a scratch directory first so that a run never adds files to it. Fails when a
# target crashes (libFuzzer then leaves the input under fuzz/artifacts/<target>/).
#
#   fuzz/run.sh 5            # what CI runs
#   fuzz/run.sh 600 identify # one target, ten minutes
#
# Needs a nightly toolchain and cargo-fuzz (cargo install cargo-fuzz --locked). Extra
# libFuzzer flags can be passed in FUZZ_FLAGS (e.g. FUZZ_FLAGS=-jobs=2). With
# FUZZ_WORK=DIR the grown corpora and the logs are kept in DIR (RESULTS.md's figures come
# from such a run) instead of a temporary directory.
#
# The sanitizer build shares nothing with the workspace's target/ (other flags), takes
# about 10 min of two cores the first time, and would start cold in every fresh clone. So
# it lives outside the checkout, in FUZZ_TARGET_DIR (default ~/.cache/thaw/fuzz-target),
# where the next clone on the same machine finds it.
set -euo pipefail
cd "$(dirname "$0")"
seconds="${1:-5}"
shift || true
targets=("$@")
if [ "${#targets[@]}" -eq 0 ]; then
  mapfile -t targets < <(cargo +nightly fuzz list)
fi
target_dir="${FUZZ_TARGET_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/thaw/fuzz-target}"
mkdir -p "$target_dir"
# One build of every target up front, so each run's seconds are spent fuzzing.
cargo +nightly fuzz build --target-dir "$target_dir"
if [ -n "${FUZZ_WORK:-}" ]; then
  scratch="$FUZZ_WORK"
  mkdir -p "$scratch"
else
  scratch="$(mktemp -d)"
  trap 'rm -rf "$scratch"' EXIT
fi
failed=()
for t in "${targets[@]}"; do
  mkdir -p "$scratch/$t"
  cp -r "corpus/$t/." "$scratch/$t/"
  echo "== fuzz $t for ${seconds}s"
  # -rss_limit_mb: a hostile input must not balloon memory; -timeout: nor hang.
  # shellcheck disable=SC2086
  if ! cargo +nightly fuzz run --target-dir "$target_dir" "$t" "$scratch/$t" -- \
    -max_total_time="$seconds" -rss_limit_mb=2048 -timeout=10 -print_final_stats=1 ${FUZZ_FLAGS:-} \
    > "$scratch/$t.log" 2>&1; then
    failed+=("$t")
    tail -n 60 "$scratch/$t.log" >&2
  fi
  grep -E '^(#[0-9]+[[:space:]]+DONE|stat::number_of_executed_units|stat::average_exec_per_sec)' "$scratch/$t.log" || true
  echo "corpus: $(find "$scratch/$t" -type f | wc -l) inputs"
done
if [ "${#failed[@]}" -gt 0 ]; then
  echo "fuzz targets that crashed: ${failed[*]} (inputs in fuzz/artifacts/)" >&2
  exit 1
fi
echo "all ${#targets[@]} fuzz targets ran ${seconds}s without a crash"
