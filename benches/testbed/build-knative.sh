#!/usr/bin/env bash
# Builds Knative Serving for the drop-in tests from the knative.dev/serving Go module that
# knative/go.mod pins, once per version, into <target>/testbed/knative-<version>/bin:
# the control plane (controller, autoscaler, webhook) and Knative's own Go data plane
# (queue, activator), the control group the same tests run against. A second run finds
# them and builds nothing. Prints the bin directory as its last line.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
target=${CARGO_TARGET_DIR:-$repo/target}
module="$here/knative"

version=$(awk '$1 == "knative.dev/serving" { print $2; exit }' "$module/go.mod")
if [ -z "$version" ]; then
  echo "build-knative.sh: no knative.dev/serving version in $module/go.mod" >&2
  exit 1
fi
bin="$target/testbed/knative-$version/bin"
tools=(controller autoscaler webhook queue activator)

have_all() {
  for t in "${tools[@]}"; do [ -x "$bin/$t" ] || return 1; done
}

if have_all; then
  echo "$bin"
  exit 0
fi

if ! command -v go >/dev/null 2>&1; then
  echo "build-knative.sh: Knative is built from its Go module, and 'go' is not on PATH" >&2
  exit 1
fi

mkdir -p "$bin"
# Two test binaries of one checkout may race here.
exec 9>"$target/testbed/build-knative-$version.lock"
flock 9
if have_all; then
  echo "$bin"
  exit 0
fi

echo "building Knative Serving $version into $bin (first time only; about 6 minutes on 2 cores)" >&2
start=$(date +%s)
cd "$module"
tmp="$bin.partial"
rm -rf "$tmp"
mkdir -p "$tmp"
pkgs=()
for t in "${tools[@]}"; do pkgs+=("knative.dev/serving/cmd/$t"); done
# go.sum is committed, so nothing needs the checksum database (not reachable here).
# CGO_ENABLED=0 as ko builds Knative's release images: static binaries.
CGO_ENABLED=0 GOFLAGS=-buildvcs=false GONOSUMDB='*' GOSUMDB=off \
  go build -trimpath -ldflags "-s -w" -o "$tmp/" "${pkgs[@]}"
for t in "${tools[@]}"; do mv "$tmp/$t" "$bin/$t"; done
rmdir "$tmp"
echo "built Knative Serving $version in $(($(date +%s) - start)) s" >&2
echo "$bin"
