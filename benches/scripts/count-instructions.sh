#!/usr/bin/env bash
# Instructions per request through the queue-proxy, counted by valgrind's callgrind rather
# than timed, so builds a few tenths of a percent apart can be told apart on a noisy
# machine. One worker thread, CC=0, N keep-alive `GET /` from one client to the test app;
# per request = (Ir at N=9000 - Ir at N=1000) / 8000, which cancels start-up and shutdown.
# glibc copies blocks of 4 KiB and more with `rep movsb`, which valgrind counts one
# instruction per byte: a request future that grows past 4 KiB would look 8 000
# instructions dearer than it is. The copy threshold is raised so every size is counted
# as the vector loop it is below it.
#
#   benches/scripts/count-instructions.sh [QUEUE_PROXY_BINARY] [RUNS]
#
# Needs valgrind (apt-get install valgrind) and `cargo build --release --bins`.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
qp=${1:-$root/target/release/queue-proxy}
runs=${2:-3}
app=$root/target/release/thaw-testapp
command -v valgrind >/dev/null || { echo "valgrind is not installed: apt-get install valgrind" >&2; exit 1; }
[ -x "$qp" ] && [ -x "$app" ] || { echo "build first: cargo build --release --bins" >&2; exit 1; }
work=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$work"' EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# Prints the instructions callgrind collected over one queue-proxy life serving $1 requests.
count() {
    local n=$1 app_port qp_port app_pid qp_pid
    app_port=$(free_port); qp_port=$(free_port)
    PORT=$app_port "$app" --threads 1 >/dev/null 2>&1 &
    app_pid=$!
    env -i CONTAINER_CONCURRENCY=0 QUEUE_SERVING_PORT="$qp_port" QUEUE_SERVING_TLS_PORT=0 \
        USER_PORT="$app_port" REVISION_TIMEOUT_SECONDS=300 SERVING_LOGGING_CONFIG= \
        SERVING_LOGGING_LEVEL=info SERVING_NAMESPACE=default SERVING_CONFIGURATION=hello \
        SERVING_REVISION=hello-00001 SERVING_POD=p SERVING_POD_IP=127.0.0.1 \
        THAW_LISTEN_ADDRESS=127.0.0.1 THAW_ADMIN_PORT=0 THAW_METRICS_PORT=0 \
        THAW_USER_METRICS_PORT=0 THAW_TLS_CERT_FILE=/nonexistent/a \
        THAW_TLS_KEY_FILE=/nonexistent/b THAW_WORKER_THREADS=1 \
        GLIBC_TUNABLES=glibc.cpu.x86_rep_movsb_threshold=1000000000 \
        valgrind --tool=callgrind --callgrind-out-file="$work/out.$n" "$qp" \
        >/dev/null 2>"$work/err.$n" &
    qp_pid=$!
    python3 - "$qp_port" "$n" <<'PY'
import http.client, socket, sys, time
port, n = int(sys.argv[1]), int(sys.argv[2])
for _ in range(300):
    try:
        socket.create_connection(("127.0.0.1", port)).close()
        break
    except OSError:
        time.sleep(0.1)
c = http.client.HTTPConnection("127.0.0.1", port)
for _ in range(n):
    c.request("GET", "/")
    r = c.getresponse()
    r.read()
    if r.status != 200:
        sys.exit(f"status {r.status}")
PY
    kill -TERM "$qp_pid"; wait "$qp_pid" || true
    kill "$app_pid"; wait "$app_pid" 2>/dev/null || true
    sed -n 's/.*Collected : \([0-9]*\).*/\1/p' "$work/err.$n"
}

for run in $(seq "$runs"); do
    low=$(count 1000); high=$(count 9000)
    echo "run $run: $(( (high - low) / 8000 )) instructions per request"
done
