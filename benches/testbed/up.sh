#!/usr/bin/env bash
# Starts the testbed: a real Kubernetes control plane (etcd, kube-apiserver,
# kube-controller-manager) and the testbed's node, which runs pods as processes in network
# namespaces. Builds what is missing first. Its last line is KUBECONFIG=<absolute path>.
#
#   benches/testbed/up.sh [STATE_DIR]
#
# STATE_DIR (or THAW_TESTBED_DIR) holds the PKI, kubeconfigs, logs, pid files and pods;
# default <target>/testbed/default. Two testbeds with different state directories run side
# by side (see lib.sh). Stop one with benches/testbed/down.sh STATE_DIR.
#
# THAW_TESTBED_BIN_DIR    Thaw's binaries (thaw-testbed-node, queue-proxy, activator,
#                         thaw-testapp); default <target>/debug, built there if missing.
# THAW_TESTBED_WATCH_PID  tear the testbed down by itself once this process is gone (the
#                         tests' helper passes its own pid, so nothing outlives a test run).
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
target=${CARGO_TARGET_DIR:-$repo/target}
# shellcheck source=lib.sh
. "$here/lib.sh"

say() { echo "up.sh: $*" >&2; }
fail() {
  say "$*"
  exit 1
}

if [ "$(id -u)" != 0 ]; then
  fail "the testbed needs root: it creates a bridge, network namespaces and veth pairs (run it as root, e.g. sudo -E $0)"
fi

state=${1:-${THAW_TESTBED_DIR:-$target/testbed/default}}
mkdir -p "$state"
state=$(cd "$state" && pwd)
node_name=testbed-node
cluster_domain=cluster.local
k8s_port=6443
for tool in etcd ip openssl curl flock setsid; do
  command -v "$tool" >/dev/null 2>&1 || fail "'$tool' is not installed (Debian: apt-get install etcd-server iproute2 openssl curl util-linux)"
done
# A testbed whose watched owner is gone is being taken down by its watchdog (a test run
# that just ended): finish that here rather than refuse.
if testbed_alive "$state" && [ -s "$state/watched" ] && ! is_running "$(cat "$state/watched")"; then
  "$here/down.sh" "$state" >&2
fi
if testbed_alive "$state"; then
  fail "a testbed is already running in $state; stop it with $here/down.sh $state"
fi

# --- binaries -----------------------------------------------------------------------
k8s_bin=$("$here/build.sh" | tail -n 1)
kubectl="$k8s_bin/kubectl"
thaw_bin=${THAW_TESTBED_BIN_DIR:-$target/debug}
if [ ! -x "$thaw_bin/thaw-testbed-node" ] || [ ! -x "$thaw_bin/queue-proxy" ] ||
  [ ! -x "$thaw_bin/activator" ] || [ ! -x "$thaw_bin/thaw-testapp" ]; then
  if [ -n "${THAW_TESTBED_BIN_DIR:-}" ]; then
    fail "Thaw's binaries are missing from $thaw_bin (need thaw-testbed-node, queue-proxy, activator, thaw-testapp)"
  fi
  say "building Thaw's binaries into $thaw_bin"
  (cd "$repo" && cargo build -q -p thaw-benches -p thaw-queue-proxy -p thaw-activator --bins)
fi

# --- state directory and slot ---------------------------------------------------------
rm -rf "${state:?}"/{pki,pids,logs,etcd,pods,run}
mkdir -p "$state"/{pki,pids,logs,pods,run}
slot=$(slot_claim "$state")
echo "$slot" >"$state/slot"
slot_names "$slot"

# From here on, a failure takes down whatever was started.
started=0
on_exit() {
  local status=$?
  if [ "$status" != 0 ] && [ "$started" = 1 ]; then
    say "start-up failed; the logs are in $state/logs"
    "$here/down.sh" "$state" >&2 || true
  fi
}
trap on_exit EXIT
started=1

# --- PKI: a CA, the API server's serving certificate, one client certificate per user ---
pki="$state/pki"
openssl_quiet() { openssl "$@" 2>/dev/null; }
openssl_quiet ecparam -name prime256v1 -genkey -noout -out "$pki/ca.key"
openssl_quiet req -x509 -new -key "$pki/ca.key" -subj "/CN=thaw-testbed-ca" -days 3650 \
  -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign,digitalSignature" \
  -out "$pki/ca.crt"

# cert NAME SUBJECT EXTENDED_KEY_USAGE [SUBJECT_ALT_NAMES]
cert() {
  local name=$1 subject=$2 usage=$3 sans=${4:-}
  openssl_quiet ecparam -name prime256v1 -genkey -noout -out "$pki/$name.key"
  openssl_quiet req -new -key "$pki/$name.key" -subj "$subject" -out "$pki/$name.csr"
  {
    echo "basicConstraints=critical,CA:FALSE"
    echo "keyUsage=critical,digitalSignature,keyEncipherment"
    echo "extendedKeyUsage=$usage"
    [ -n "$sans" ] && echo "subjectAltName=$sans"
  } >"$pki/$name.ext"
  openssl_quiet x509 -req -in "$pki/$name.csr" -CA "$pki/ca.crt" -CAkey "$pki/ca.key" \
    -CAcreateserial -days 3650 -extfile "$pki/$name.ext" -out "$pki/$name.crt"
  rm -f "$pki/$name.csr" "$pki/$name.ext"
}
# The first ClusterIP of the range is the `kubernetes` Service's.
kubernetes_ip="10.96.$slot.1"
cert apiserver "/CN=kube-apiserver" serverAuth \
  "IP:$gateway,IP:$kubernetes_ip,IP:127.0.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.$cluster_domain"
cert admin "/O=system:masters/CN=thaw-testbed-admin" clientAuth
cert controller-manager "/CN=system:kube-controller-manager" clientAuth
cert node "/O=system:nodes/CN=system:node:$node_name" clientAuth
# Binding pods is the scheduler's right, which NodeRestriction denies a node.
cert scheduler "/CN=system:kube-scheduler" clientAuth
cert front-proxy-client "/CN=front-proxy-client" clientAuth
# The key that signs service-account tokens.
openssl_quiet ecparam -name prime256v1 -genkey -noout -out "$pki/sa.key"
openssl_quiet ec -in "$pki/sa.key" -pubout -out "$pki/sa.pub"

server="https://$gateway:$k8s_port"
# kubeconfig FILE USER
kubeconfig() {
  cat >"$1" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: testbed
  cluster:
    server: $server
    certificate-authority-data: $(base64 -w0 "$pki/ca.crt")
users:
- name: $2
  user:
    client-certificate-data: $(base64 -w0 "$pki/$2.crt")
    client-key-data: $(base64 -w0 "$pki/$2.key")
contexts:
- name: testbed
  context:
    cluster: testbed
    user: $2
current-context: testbed
EOF
}
kubeconfig "$state/admin.kubeconfig" admin
kubeconfig "$state/controller-manager.kubeconfig" controller-manager
kubeconfig "$state/node.kubeconfig" node
kubeconfig "$state/scheduler.kubeconfig" scheduler

# --- network: the bridge pods hang off, and the ClusterIP range made local -------------
# A fixed MAC: a bridge without one takes the lowest of its ports' MACs, so it changed
# whenever a pod came or went, and every pod's ARP entry for the gateway (DNS, the
# Service proxy, the API server, replies to the node) pointed nowhere for up to a minute.
ip link add "$bridge" address "$(printf '02:74:68:00:00:%02x' "$slot")" type bridge
ip addr add "$gateway/24" dev "$bridge"
ip link set "$bridge" up
# Every ClusterIP is a local address, so the node's Service proxy can bind any of them
# (kube-proxy's userspace mode, without iptables).
ip route add local "$service_cidr" dev lo

# --- processes --------------------------------------------------------------------------
# run NAME COMMAND...: in the background, in its own session, logging to logs/NAME.log.
run() {
  local name=$1
  shift
  setsid "$@" >"$state/logs/$name.log" 2>&1 </dev/null &
  echo $! >"$state/pids/$name.pid"
}

# wait_for WHAT SECONDS LOG COMMAND...: polls COMMAND until it succeeds.
wait_for() {
  local what=$1 seconds=$2 log=$3 i
  shift 3
  for ((i = 0; i < seconds * 5; i++)); do
    if "$@" >/dev/null 2>&1; then return 0; fi
    if [ -n "$log" ] && ! pid_alive "$state/pids/$log.pid"; then
      tail -n 20 "$state/logs/$log.log" >&2 || true
      fail "$log exited while waiting for $what"
    fi
    sleep 0.2
  done
  [ -n "$log" ] && tail -n 20 "$state/logs/$log.log" >&2
  fail "timed out after ${seconds}s waiting for $what"
}

run etcd etcd --name testbed --data-dir "$state/etcd" \
  --listen-client-urls "http://$loopback:2379" --advertise-client-urls "http://$loopback:2379" \
  --listen-peer-urls "http://$loopback:2380" --initial-advertise-peer-urls "http://$loopback:2380" \
  --initial-cluster "testbed=http://$loopback:2380" --initial-cluster-state new \
  --listen-metrics-urls "" --log-level warn
wait_for "etcd" 30 etcd curl -sf "http://$loopback:2379/health"

run kube-apiserver "$k8s_bin/kube-apiserver" \
  --etcd-servers "http://$loopback:2379" \
  --bind-address "$gateway" --advertise-address "$gateway" --secure-port "$k8s_port" \
  --tls-cert-file "$pki/apiserver.crt" --tls-private-key-file "$pki/apiserver.key" \
  --client-ca-file "$pki/ca.crt" \
  --service-account-issuer "https://kubernetes.default.svc.$cluster_domain" \
  --service-account-key-file "$pki/sa.pub" --service-account-signing-key-file "$pki/sa.key" \
  --service-cluster-ip-range "$service_cidr" \
  --authorization-mode Node,RBAC \
  --enable-admission-plugins NodeRestriction \
  --allow-privileged=true \
  --enable-aggregator-routing=true \
  --proxy-client-cert-file "$pki/front-proxy-client.crt" --proxy-client-key-file "$pki/front-proxy-client.key" \
  --requestheader-client-ca-file "$pki/ca.crt" --requestheader-allowed-names front-proxy-client \
  --requestheader-username-headers X-Remote-User --requestheader-group-headers X-Remote-Group \
  --requestheader-extra-headers-prefix X-Remote-Extra- \
  --profiling=false
readyz() {
  curl -sf --cacert "$pki/ca.crt" --cert "$pki/admin.crt" --key "$pki/admin.key" "$server/readyz"
}
wait_for "the API server's /readyz" 120 kube-apiserver readyz

run kube-controller-manager "$k8s_bin/kube-controller-manager" \
  --kubeconfig "$state/controller-manager.kubeconfig" \
  --authentication-kubeconfig "$state/controller-manager.kubeconfig" \
  --authorization-kubeconfig "$state/controller-manager.kubeconfig" \
  --bind-address "$loopback" --secure-port 10257 \
  --leader-elect=false \
  --use-service-account-credentials=true \
  --service-account-private-key-file "$pki/sa.key" \
  --root-ca-file "$pki/ca.crt" \
  --cluster-signing-cert-file "$pki/ca.crt" --cluster-signing-key-file "$pki/ca.key" \
  --service-cluster-ip-range "$service_cidr" \
  --profiling=false

k() { "$kubectl" --kubeconfig "$state/admin.kubeconfig" "$@"; }
# The node is the kubelet (its rights come from the Node authorizer), the scheduler (it
# binds pending pods, as system:kube-scheduler) and the Service proxy, for which it reads
# Services and EndpointSlices with kube-proxy's role.
k apply -f - >/dev/null <<EOF
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata:
  name: thaw-testbed-node-proxier
roleRef: { apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: system:node-proxier }
subjects:
- { apiGroup: rbac.authorization.k8s.io, kind: User, name: system:node:$node_name }
EOF

# The image map: image name (any tag) → the executable that stands for it. knative.sh and
# tests may add lines; the node reads the file again at every container start.
cat >"$state/images.tsv" <<EOF
# image	executable
thaw.local/queue-proxy	$thaw_bin/queue-proxy
thaw.local/activator	$thaw_bin/activator
thaw.local/testapp	$thaw_bin/thaw-testapp
thaw.local/testbed-node	$thaw_bin/thaw-testbed-node
EOF

run node "$thaw_bin/thaw-testbed-node" run \
  --kubeconfig "$state/node.kubeconfig" \
  --scheduler-kubeconfig "$state/scheduler.kubeconfig" \
  --node-name "$node_name" \
  --state-dir "$state" \
  --bridge "$bridge" --netns-prefix "$netns_prefix" \
  --pod-cidr "$pod_cidr" --gateway "$gateway" \
  --cluster-domain "$cluster_domain" \
  --images "$state/images.tsv"
wait_for "the node to register" 60 node k get node "$node_name"
wait_for "the node to be Ready" 60 node k wait --for=condition=Ready "node/$node_name" --timeout=1s
# Pods in `default` need its service account, which the controller-manager creates.
wait_for "the default service account" 60 kube-controller-manager k get serviceaccount default -n default

if [ -n "${THAW_TESTBED_WATCH_PID:-}" ]; then
  watched=$THAW_TESTBED_WATCH_PID
  echo "$watched" >"$state/watched"
  setsid bash -c ". '$here/lib.sh'; while is_running $watched; do sleep 0.5; done; exec '$here/down.sh' '$state'" \
    >"$state/logs/watchdog.log" 2>&1 </dev/null &
  echo $! >"$state/pids/watchdog.pid"
fi

started=0
say "testbed up in $state (slot $slot, API server $server)"
echo "KUBECONFIG=$state/admin.kubeconfig"
