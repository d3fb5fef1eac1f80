#!/usr/bin/env bash
# Stops the testbed that up.sh started in STATE_DIR (default as for up.sh): every process
# it recorded, by pid, then whatever is left in its pod namespaces, the namespaces, the
# bridge and its slot. Logs stay in STATE_DIR/logs. Safe to run twice.
#
#   benches/testbed/down.sh [STATE_DIR]
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
target=${CARGO_TARGET_DIR:-$repo/target}
# shellcheck source=lib.sh
. "$here/lib.sh"

state=${1:-${THAW_TESTBED_DIR:-$target/testbed/default}}
if [ ! -d "$state" ]; then
  echo "down.sh: no testbed state in $state" >&2
  exit 0
fi
state=$(cd "$state" && pwd)
if [ "$(id -u)" != 0 ]; then
  echo "down.sh: the testbed needs root to remove its network namespaces and bridge" >&2
  exit 1
fi

# The node first: on SIGTERM it stops its pods' processes. Then the control plane, the
# store last. The watchdog may be the one running this script: never stop ourselves.
for name in node kube-controller-manager kube-apiserver etcd watchdog; do
  file="$state/pids/$name.pid"
  [ -e "$file" ] || continue
  if [ "$(cat "$file")" = "$$" ]; then
    rm -f "$file"
    continue
  fi
  case $name in
  node) grace=15 ;;
  kube-apiserver) grace=3 ;;
  *) grace=5 ;;
  esac
  stop_pid "$file" "$grace"
done

if [ -e "$state/slot" ]; then
  slot=$(cat "$state/slot")
  slot_network_cleanup "$slot"
  slot_release "$slot" "$state"
  rm -f "$state/slot"
fi
rm -rf "${state:?}/etcd" "${state:?}/run"
echo "down.sh: testbed in $state stopped" >&2
