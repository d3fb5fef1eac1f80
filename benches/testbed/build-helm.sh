#!/usr/bin/env bash
# Builds the Helm CLI that the deploy checks (benches/tests/deploy.rs) render and lint the
# chart in deploy/helm/thaw with, from the helm.sh/helm/v4 Go module that helm/go.mod
# pins, once per version, into <target>/testbed/helm-<version>/bin/helm. A second run
# finds it and builds nothing. Prints the bin directory as its last line.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
target=${CARGO_TARGET_DIR:-$repo/target}
module="$here/helm"

version=$(awk '$1 == "helm.sh/helm/v4" { print $2; exit }' "$module/go.mod")
if [ -z "$version" ]; then
  echo "build-helm.sh: no helm.sh/helm/v4 version in $module/go.mod" >&2
  exit 1
fi
bin="$target/testbed/helm-$version/bin"

if [ -x "$bin/helm" ]; then
  echo "$bin"
  exit 0
fi

if ! command -v go >/dev/null 2>&1; then
  echo "build-helm.sh: Helm is built from its Go module, and 'go' is not on PATH" >&2
  exit 1
fi

mkdir -p "$bin"
# Two test binaries of one checkout may race here.
exec 9>"$target/testbed/build-helm-$version.lock"
flock 9
if [ -x "$bin/helm" ]; then
  echo "$bin"
  exit 0
fi

# What `helm version` reports; Helm's Makefile sets the same variables for a release.
pkg=helm.sh/helm/v4/internal/version
ldflags="-s -w -X $pkg.version=$version -X $pkg.metadata= -X $pkg.gitTreeState=clean"

echo "building Helm $version into $bin (first time only; about 4 minutes on 2 cores)" >&2
start=$(date +%s)
cd "$module"
tmp="$bin.partial"
rm -rf "$tmp"
mkdir -p "$tmp"
# go.sum is committed, so nothing needs the checksum database (not reachable here).
# CGO_ENABLED=0 as Helm's own release builds: a static binary.
CGO_ENABLED=0 GOFLAGS=-buildvcs=false GONOSUMDB='*' GOSUMDB=off \
  go build -trimpath -ldflags "$ldflags" -o "$tmp/" helm.sh/helm/v4/cmd/helm
mv "$tmp/helm" "$bin/helm"
rmdir "$tmp"
echo "built Helm $version in $(($(date +%s) - start)) s" >&2
echo "$bin"
