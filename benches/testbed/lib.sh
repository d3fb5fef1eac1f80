# Shared by up.sh and down.sh (sourced, not run).
#
# A testbed owns a "slot" N (1-250), claimed under /run/thaw-testbed, so that two copies on
# one machine (CI and a developer, two checkouts) never share an address, a bridge or a
# namespace name. Everything network-facing is derived from N:
#   bridge thawtbN, pod netns thawtbN-<octet>, pods 10.244.N.0/24 behind 10.244.N.1 (the
#   API server and the cluster DNS listen there), Service ClusterIPs 10.96.N.0/24 (served
#   by the node's proxy), and 127.244.N.1 on loopback for etcd and the controller-manager.

slots_dir=/run/thaw-testbed

slot_names() {
  local n=$1
  bridge="thawtb$n"
  netns_prefix="thawtb$n-"
  pod_cidr="10.244.$n.0/24"
  gateway="10.244.$n.1"
  service_cidr="10.96.$n.0/24"
  loopback="127.244.$n.1"
}

# True when a pid file names a live process. A zombie is not alive: whoever adopted the
# detached processes (PID 1 here) may be slow to reap them.
pid_alive() {
  local pid
  pid=$(cat "$1" 2>/dev/null) || return 1
  [ -n "$pid" ] && is_running "$pid"
}

is_running() {
  local stat
  stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
  stat=${stat##*) }
  [ "${stat%% *}" != Z ]
}

# True when the testbed whose state directory is $1 still has a live process.
testbed_alive() {
  local f
  for f in "$1"/pids/*.pid; do
    [ -e "$f" ] || continue
    pid_alive "$f" && return 0
  done
  return 1
}

# Removes what a slot's network left behind: every process still inside one of its pod
# namespaces, the namespaces (their veths go with them), the bridge and the local route.
slot_network_cleanup() {
  slot_names "$1"
  local ns pid
  for ns in $(ip netns list 2>/dev/null | awk '{ print $1 }' | grep "^$netns_prefix" || true); do
    for pid in $(ip netns pids "$ns" 2>/dev/null || true); do
      kill -9 "$pid" 2>/dev/null || true
    done
    ip netns delete "$ns" 2>/dev/null || true
  done
  ip link delete "$bridge" 2>/dev/null || true
  ip route delete local "$service_cidr" dev lo 2>/dev/null || true
}

# Claims a free slot for state directory $1 and prints its number. A slot whose owner has
# no live process is stale: its leftovers are cleaned and it is reused.
slot_claim() {
  local state=$1 n d owner
  mkdir -p "$slots_dir"
  exec 8>"$slots_dir/lock"
  flock 8
  for n in $(seq 1 250); do
    d="$slots_dir/$n"
    if [ -e "$d/owner" ]; then
      owner=$(cat "$d/owner" 2>/dev/null || true)
      if [ "$owner" != "$state" ] && testbed_alive "$owner"; then
        continue
      fi
      slot_network_cleanup "$n"
    fi
    mkdir -p "$d"
    echo "$state" >"$d/owner"
    exec 8>&-
    echo "$n"
    return 0
  done
  exec 8>&-
  echo "no free testbed slot under $slots_dir (250 in use)" >&2
  return 1
}

slot_release() {
  local n=$1 state=$2
  if [ "$(cat "$slots_dir/$n/owner" 2>/dev/null || true)" = "$state" ]; then
    rm -rf "${slots_dir:?}/$n"
  fi
}

# Stops the process in pid file $1: SIGTERM, up to $2 seconds, then SIGKILL.
stop_pid() {
  local file=$1 grace=$2 pid i
  pid=$(cat "$file" 2>/dev/null) || return 0
  if [ -n "$pid" ] && is_running "$pid"; then
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < grace * 10; i++)); do
      is_running "$pid" || break
      sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null || true
  fi
  rm -f "$file"
}
