#!/usr/bin/env bash
# Installs Knative Serving's real control plane on a running testbed, from the
# knative.dev/serving Go module's own config/ (the release's serving-core: CRDs, the
# knative-serving namespace, RBAC, config maps, webhooks, and the controller, autoscaler,
# webhook and activator Deployments; the HPA objects are left out). Knative's own names
# are kept. Builds Knative first if needed (build-knative.sh).
#
#   benches/testbed/knative.sh [--images thaw|knative] [--autoscaler KEY=VALUE]...
#   benches/testbed/knative.sh --delete
#
# --images thaw (default): Knative is installed with its own images, then swapped to
#     Thaw's exactly as a user swaps it, with the overlay deploy/knative/testbed
#     (server-side apply, field manager `thaw`): the `activator` Deployment runs
#     thaw.local/activator and config-deployment's queue-sidecar-image is
#     thaw.local/queue-proxy.
# --images knative: Knative's own Go activator and queue (the control group).
# --autoscaler KEY=VALUE: a config-autoscaler setting (e.g. stable-window=6s), repeatable.
# --delete: removes every Knative Service, then everything this script installed, so the
#     same testbed can take the other image set.
#
# Needs KUBECONFIG of a testbed (up.sh prints it); the testbed's state directory, where
# images.tsv lives, is THAW_TESTBED_DIR or else the kubeconfig's directory. Knative's
# images are named knative.testbed/<cmd> and mapped there to the built binaries. Waits
# until the Deployments are Available; on failure prints the failing pods' logs.
# Safe to run again (an image switch rolls the activator and, through
# config-deployment, every Revision's Deployment).
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
target=${CARGO_TARGET_DIR:-$repo/target}

say() { echo "knative.sh: $*" >&2; }
fail() {
  say "$*"
  exit 1
}

images=thaw
delete=0
autoscaler=()
while [ $# -gt 0 ]; do
  case $1 in
  --images)
    [ $# -ge 2 ] || fail "--images needs thaw or knative"
    images=$2
    shift 2
    ;;
  --images=*)
    images=${1#--images=}
    shift
    ;;
  --autoscaler)
    [ $# -ge 2 ] || fail "--autoscaler needs KEY=VALUE"
    autoscaler+=("$2")
    shift 2
    ;;
  --autoscaler=*)
    autoscaler+=("${1#--autoscaler=}")
    shift
    ;;
  --delete)
    delete=1
    shift
    ;;
  -h | --help)
    sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'
    exit 0
    ;;
  *) fail "unknown argument $1 (see --help)" ;;
  esac
done
case $images in
thaw | knative) ;;
*) fail "--images must be thaw or knative, not $images" ;;
esac
for kv in "${autoscaler[@]}"; do
  case $kv in
  *=*) ;;
  *) fail "--autoscaler $kv: expected KEY=VALUE" ;;
  esac
done

[ -n "${KUBECONFIG:-}" ] || fail "KUBECONFIG is not set: start a testbed (benches/testbed/up.sh prints it) and export it"
[ -r "$KUBECONFIG" ] || fail "KUBECONFIG=$KUBECONFIG is not readable"
state=${THAW_TESTBED_DIR:-$(dirname "$KUBECONFIG")}
[ -f "$state/images.tsv" ] || fail "no images.tsv in $state: set THAW_TESTBED_DIR to the testbed's state directory"

k8s_bin=$("$here/build.sh" | tail -n 1)
k() { "$k8s_bin/kubectl" "$@"; }
ns=knative-serving

# --- the manifests, from the module cache --------------------------------------------
kn_bin=$("$here/build-knative.sh" | tail -n 1)
module_dir() {
  (cd "$here/knative" && GOFLAGS=-buildvcs=false GONOSUMDB='*' GOSUMDB=off go list -m -f '{{.Dir}}' "$1")
}
serving=$(module_dir knative.dev/serving)
networking=$(module_dir knative.dev/networking)
caching=$(module_dir knative.dev/caching)
core="$serving/config/core"
[ -d "$core" ] || fail "no config/core in $serving"

# In Knative's repository, serving's networking CRDs and config-network are symlinks into
# the networking module (and the Image CRD into caching); module zips drop symlinks, so
# they are taken from those modules here, as the release's serving-core.yaml has them.
crds=(
  "$core"/300-resources/*.yaml
  "$networking"/config/certificate.yaml
  "$networking"/config/domain-claim.yaml
  "$networking"/config/ingress.yaml
  "$networking"/config/serverlessservice.yaml
  "$caching"/config/image.yaml
)
objects=(
  "$core"/100-namespace.yaml
  "$core"/200-roles/*.yaml
  "$core"/200-serviceaccount.yaml
  "$core"/configmaps/*.yaml
  "$networking"/config/config-network.yaml
  "$core"/webhooks/*.yaml
  "$core"/deployments/activator.yaml
  "$core"/deployments/autoscaler.yaml
  "$core"/deployments/controller.yaml
  "$core"/deployments/webhook.yaml
)
# Custom resources, applied once the webhook that admits them is up.
resources=(
  "$core"/300-knativecertificate.yaml
  "$core"/999-cache.yaml
)

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# render FILE...: one stream, Knative's ko:// images as testbed names.
render() {
  local f
  for f in "$@"; do
    [ -f "$f" ] || fail "missing manifest $f"
    echo "---"
    sed -e 's#ko://knative.dev/serving/cmd/#knative.testbed/#g' "$f"
  done
}

if [ "$delete" = 1 ]; then
  start=$(date +%s)
  # Knative's own objects first, while the controller still runs their finalizers (a
  # Route left behind holds its CRD in Terminating until a controller comes back).
  for kind in services configurations routes revisions domainmappings; do
    if k get crd "$kind.serving.knative.dev" >/dev/null 2>&1; then
      k delete "$kind.serving.knative.dev" --all --all-namespaces --cascade=foreground \
        --wait=true --timeout=120s >/dev/null
    fi
  done
  render "${resources[@]}" >"$work/resources.yaml"
  render "${objects[@]:1}" >"$work/objects.yaml"
  render "${crds[@]}" >"$work/crds.yaml"
  # The custom resources while the webhook that validates their deletion still runs.
  k delete --ignore-not-found --wait=true --timeout=60s -f "$work/resources.yaml" >/dev/null
  k delete --ignore-not-found --wait=true --timeout=180s -f "$work/objects.yaml" >/dev/null
  # The namespace last, once its pods are gone: with a pod still terminating, the
  # namespace controller looks again only after that pod's grace period (the
  # activator's is 600 s).
  k -n "$ns" wait --for=delete pod --all --timeout=300s >/dev/null
  k delete --ignore-not-found --wait=true --timeout=120s namespace "$ns" >/dev/null
  k delete --ignore-not-found --wait=true --timeout=120s -f "$work/crds.yaml" >/dev/null
  say "Knative Serving removed in $(($(date +%s) - start)) s"
  exit 0
fi

start=$(date +%s)

# A --delete still finishing: applying now would race it for the CRDs.
for ((i = 0; i < 240; i++)); do
  terminating=$(k get crd,namespace -o jsonpath='{range .items[?(@.metadata.deletionTimestamp)]}{.metadata.name}{" "}{end}' 2>/dev/null | tr ' ' '\n' | grep -E 'knative\.dev$|^knative-serving$' || true)
  [ -z "$terminating" ] && break
  [ "$i" = 0 ] && say "waiting for a previous removal to finish: $(echo $terminating)"
  sleep 0.5
done
[ -z "$terminating" ] || fail "still being removed after 120 s: $(echo $terminating)"

# --- images: Knative's commands as knative.testbed/<cmd> ------------------------------
# Replaced atomically: the node reads the file again at every container start.
{
  grep -v '^knative\.testbed/' "$state/images.tsv" || true
  for cmd in controller autoscaler webhook activator queue; do
    printf 'knative.testbed/%s\t%s\n' "$cmd" "$kn_bin/$cmd"
  done
} >"$state/images.tsv.new"
mv "$state/images.tsv.new" "$state/images.tsv"

# Knative's own images always; with --images thaw the overlay swaps them below.
activator_image=knative.testbed/activator
queue_image=knative.testbed/queue

# Settings written into a config map's data (after its `data:` line): KEY=VALUE...
# set_data NAME KEY=VALUE...: an awk program's input for the stream below.
settings="$work/settings.tsv"
: >"$settings"
set_data() {
  local name=$1 kv
  shift
  for kv in "$@"; do
    printf '%s\t%s\t%s\n' "$name" "${kv%%=*}" "${kv#*=}" >>"$settings"
  done
}
# The testbed has no registry: Knative must not try to resolve these tags to digests.
set_data config-deployment \
  "queue-sidecar-image=$queue_image" \
  "registries-skipping-tag-resolving=kind.local,ko.local,dev.local,knative.testbed,thaw.local"
if [ ${#autoscaler[@]} -gt 0 ]; then
  set_data config-autoscaler "${autoscaler[@]}"
fi

render "${crds[@]}" >"$work/crds.yaml"
render "${objects[@]}" |
  awk -v settings="$settings" -v activator="$activator_image" '
    BEGIN {
      FS = "\t"
      while ((getline line < settings) > 0) {
        split(line, f, "\t")
        n[f[1]]++
        key[f[1], n[f[1]]] = f[2]
        val[f[1], n[f[1]]] = f[3]
      }
      FS = " "
    }
    /^---/ { kind = ""; name = ""; print; next }
    /^kind:/ { kind = $2 }
    /^  name:/ && name == "" { name = $2 }
    # A key set here replaces the one in the file (queue-sidecar-image).
    kind == "ConfigMap" && (name in n) && /^  [a-z]/ {
      k = $1; sub(/:$/, "", k)
      for (i = 1; i <= n[name]; i++) if (key[name, i] == k) next
    }
    {
      if (kind == "Deployment" && name == "activator" && $1 == "image:") {
        sub(/image: .*/, "image: " activator)
      }
      print
    }
    kind == "ConfigMap" && (name in n) && /^data:/ {
      for (i = 1; i <= n[name]; i++) {
        v = val[name, i]; gsub(/\\/, "\\\\", v); gsub(/"/, "\\\"", v)
        printf "  %s: \"%s\"\n", key[name, i], v
      }
    }
  ' >"$work/objects.yaml"
render "${resources[@]}" >"$work/resources.yaml"

# The manifests say `devel`; what runs is the module's release.
version=$(awk '$1 == "knative.dev/serving" { print $2; exit }' "$here/knative/go.mod")
for f in "$work"/*.yaml; do
  sed -i "s#app.kubernetes.io/version: devel#app.kubernetes.io/version: \"$version\"#" "$f"
done

# --- apply ---------------------------------------------------------------------------
say "installing Knative Serving $version with $images images"
k apply --server-side --force-conflicts -f "$work/crds.yaml" >/dev/null
# `kubectl wait` fails at once ("<nil> is of the type <nil>") when it reads a CRD before
# the API server has given it any condition, so it is retried until a deadline.
deadline=$((SECONDS + 60))
until out=$(k wait --for=condition=Established --timeout=60s -f "$work/crds.yaml" 2>&1); do
  [ "$SECONDS" -lt "$deadline" ] || fail "Knative's CRDs were not established within 60 s: $out"
  sleep 0.5
done
# Config maps pass Knative's validating webhook once it runs; on a first install it is
# not there yet (its configuration has no rules until the webhook writes them).
k apply --server-side --force-conflicts -f "$work/objects.yaml" >/dev/null
if [ "$images" = thaw ]; then
  # The swap a user makes (README, "Knative: the drop-in"), so CI checks the overlay.
  # Its own field manager: under the installer's, the partial objects would drop every
  # field they leave out.
  k apply --server-side --force-conflicts --field-manager=thaw -k "$repo/deploy/knative/testbed" >/dev/null
  got=$(k -n "$ns" get deployment activator -o jsonpath='{.spec.template.spec.containers[0].image}')
  sidecar=$(k -n "$ns" get configmap config-deployment -o jsonpath='{.data.queue-sidecar-image}')
  case $got in
  thaw.local/activator*) ;;
  *) fail "deploy/knative/testbed did not swap the activator's image (got $got)" ;;
  esac
  case $sidecar in
  thaw.local/queue-proxy*) ;;
  *) fail "deploy/knative/testbed did not set queue-sidecar-image (got $sidecar)" ;;
  esac
fi

# --- wait ----------------------------------------------------------------------------
deployments=(controller autoscaler webhook activator)
show_failure() {
  local d pod c
  for d in "${deployments[@]}"; do
    k -n "$ns" get deployment "$d" -o wide >&2 || true
    for pod in $(k -n "$ns" get pods -l "app=$d" -o name 2>/dev/null); do
      pod=${pod#pod/}
      k -n "$ns" get pod "$pod" -o wide >&2 || true
      for c in $(k -n "$ns" get pod "$pod" -o jsonpath='{.spec.containers[*].name}' 2>/dev/null); do
        for log in "$state"/pods/"${ns}_${pod}"_*/"$c.log"; do
          [ -f "$log" ] || continue
          echo "--- $log (last 40 lines)" >&2
          tail -n 40 "$log" >&2
        done
      done
    done
  done
  k -n "$ns" get events --sort-by=.lastTimestamp 2>/dev/null | tail -n 20 >&2 || true
}
for d in "${deployments[@]}"; do
  if ! k -n "$ns" rollout status "deployment/$d" --timeout=240s >/dev/null 2>&1 ||
    ! k -n "$ns" wait --for=condition=Available "deployment/$d" --timeout=60s >/dev/null 2>&1; then
    say "deployment $d did not become Available; its pods:"
    show_failure
    fail "Knative Serving install failed (deployment $d); the testbed's logs are in $state/logs"
  fi
done
# The webhook admits Knative's resources once it has written its certificate and rules.
webhook_ready() {
  local ca
  ca=$(k get mutatingwebhookconfiguration webhook.serving.knative.dev -o jsonpath='{.webhooks[0].clientConfig.caBundle}' 2>/dev/null)
  [ -n "$ca" ] && k apply --server-side --force-conflicts --dry-run=server -f "$work/resources.yaml" >/dev/null 2>&1
}
for ((i = 0; i < 300; i++)); do
  webhook_ready && break
  sleep 0.5
done
if ! k apply --server-side --force-conflicts -f "$work/resources.yaml" >"$work/apply.log" 2>&1; then
  cat "$work/apply.log" >&2
  show_failure
  fail "Knative's webhook does not admit its own resources"
fi
say "Knative Serving $version ready in $(($(date +%s) - start)) s ($images images)"
