#!/usr/bin/env bash
# Builds the testbed's control plane (kube-apiserver, kube-controller-manager and a
# matching kubectl) from the k8s.io/kubernetes Go module that control-plane/go.mod pins,
# once per version, into <target>/testbed/k8s-<version>/bin. A second run finds them and
# builds nothing. Prints the bin directory as its last line.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
target=${CARGO_TARGET_DIR:-$repo/target}
module="$here/control-plane"

version=$(awk '$1 == "k8s.io/kubernetes" { print $2; exit }' "$module/go.mod")
if [ -z "$version" ]; then
  echo "build.sh: no k8s.io/kubernetes version in $module/go.mod" >&2
  exit 1
fi
bin="$target/testbed/k8s-$version/bin"
tools=(kube-apiserver kube-controller-manager kubectl)

have_all() {
  for t in "${tools[@]}"; do [ -x "$bin/$t" ] || return 1; done
}

if have_all; then
  echo "$bin"
  exit 0
fi

if ! command -v go >/dev/null 2>&1; then
  echo "build.sh: the testbed builds Kubernetes from its Go module, and 'go' is not on PATH" >&2
  exit 1
fi

mkdir -p "$bin"
# Two checkouts may share nothing, but two test binaries of one checkout may race here.
exec 9>"$target/testbed/build-$version.lock"
flock 9
if have_all; then
  echo "$bin"
  exit 0
fi

# The version the binaries report. Clients check it (Knative refuses a server older than
# its minimum), and a plain `go build` would report v0.0.0-master.
minor=${version#v1.}
minor=${minor%%.*}
pkg=k8s.io/component-base/version
ldflags="-s -w"
ldflags+=" -X $pkg.gitVersion=$version -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor"
ldflags+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=1970-01-01T00:00:00Z"
ldflags+=" -X k8s.io/client-go/pkg/version.gitVersion=$version"

echo "building Kubernetes $version control plane into $bin (first time only; 7 to 12 minutes on 2 cores)" >&2
start=$(date +%s)
cd "$module"
tmp="$bin.partial"
rm -rf "$tmp"
mkdir -p "$tmp"
# go.sum is committed, so nothing needs the checksum database (not reachable here).
GOFLAGS=-buildvcs=false GONOSUMDB='*' GOSUMDB=off \
  go build -trimpath -ldflags "$ldflags" -o "$tmp/" \
  k8s.io/kubernetes/cmd/kube-apiserver \
  k8s.io/kubernetes/cmd/kube-controller-manager \
  k8s.io/kubernetes/cmd/kubectl
for t in "${tools[@]}"; do mv "$tmp/$t" "$bin/$t"; done
rmdir "$tmp"
echo "built Kubernetes $version in $(($(date +%s) - start)) s" >&2
echo "$bin"
