#!/usr/bin/env bash
# What a request costs the activator as revisions grow, counted by valgrind's cachegrind
# (instructions, and data-cache misses in its simulated caches) rather than timed: on a
# noisy shared machine the revisions bench's rps moves by 15 % between runs, far more
# than one change to the per-revision data does.
#
# `thaw-scale-activator` with REVISIONS registered and the first ACTIVE given two
# queue-proxies (CC=0) in front of one test app, no pod-set churn; one client sends N
# keep-alive `GET /`, each naming the next active revision as its Host. Per request =
# (count at N=6000 - count at N=1000) / 5000, which cancels start-up (registering,
# probing, the first request of each revision) and shutdown.
#
#   benches/scripts/count-revision-cost.sh REVISIONS ACTIVE [ACTIVATOR_BINARY] [RUNS]
#
# Prints, per run: instructions, D1 misses (first-level data cache, reads + writes) and
# LL misses (reads + writes) per request. The simulated last level is 1 MiB, 16-way (a
# core's L2): cachegrind would otherwise take the host's whole shared L3, hundreds of MiB
# on a cloud machine, which one process on a shared 2-core VM never has to itself.
# Needs valgrind (apt-get install valgrind) and `cargo build --release --bins`.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
revisions=${1:?REVISIONS}
active=${2:?ACTIVE}
activator=${3:-$root/target/release/thaw-scale-activator}
runs=${4:-2}
bin=$root/target/release
command -v valgrind >/dev/null || { echo "valgrind is not installed: apt-get install valgrind" >&2; exit 1; }
for b in "$activator" "$bin/queue-proxy" "$bin/thaw-testapp"; do
    [ -x "$b" ] || { echo "missing $b: cargo build --release --bins" >&2; exit 1; }
done
work=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$work"' EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

app_port=$(free_port)
PORT=$app_port "$bin/thaw-testapp" --threads 1 >/dev/null 2>&1 &
pods=()
for _ in 1 2; do
    qp_port=$(free_port)
    env -i CONTAINER_CONCURRENCY=0 QUEUE_SERVING_PORT="$qp_port" QUEUE_SERVING_TLS_PORT=0 \
        USER_PORT="$app_port" REVISION_TIMEOUT_SECONDS=300 SERVING_LOGGING_CONFIG= \
        SERVING_LOGGING_LEVEL=info SERVING_NAMESPACE=bench SERVING_CONFIGURATION=rev \
        SERVING_REVISION=rev SERVING_POD=p SERVING_POD_IP=127.0.0.1 \
        THAW_LISTEN_ADDRESS=127.0.0.1 THAW_ADMIN_PORT=0 THAW_METRICS_PORT=0 \
        THAW_USER_METRICS_PORT=0 THAW_TLS_CERT_FILE=/nonexistent/a \
        THAW_TLS_KEY_FILE=/nonexistent/b "$bin/queue-proxy" >/dev/null 2>&1 &
    pods+=("127.0.0.1:$qp_port")
done

# Prints "Ir D1-misses LL-misses" over one activator life serving $1 requests.
count() {
    local n=$1 port pid
    port=$(free_port)
    # `rep movsb` copies (glibc, 4 KiB and up) count one instruction per byte under
    # valgrind; see count-instructions.sh.
    GLIBC_TUNABLES=glibc.cpu.x86_rep_movsb_threshold=1000000000 \
        valgrind --tool=cachegrind --cache-sim=yes --LL=1048576,16,64 \
        --cachegrind-out-file="$work/out.$n" \
        "$activator" --revisions "$revisions" --active "$active" \
        --pods "$(IFS=,; echo "${pods[*]}")" --updates-per-sec 0 -- \
        --listen-address 127.0.0.1 --http-port "$port" --h2c-port 0 --metrics-port 0 \
        >/dev/null 2>"$work/err.$n" &
    pid=$!
    python3 - "$port" "$n" "$active" <<'PY'
import http.client, socket, sys, time
port, n, active = (int(a) for a in sys.argv[1:4])
for _ in range(1200):
    try:
        socket.create_connection(("127.0.0.1", port)).close()
        break
    except OSError:
        time.sleep(0.1)
c = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
def get(i):
    c.request("GET", "/", headers={"Host": f"rev-{i}.local"})
    r = c.getresponse()
    r.read()
    return r.status
# Every active revision answers once (its pods probed) before the counted requests.
for i in range(active):
    for _ in range(600):
        if get(i) == 200:
            break
        time.sleep(0.1)
    else:
        sys.exit(f"rev-{i} never answered 200")
for k in range(n):
    if (s := get(k % active)) != 200:
        sys.exit(f"status {s}")
PY
    kill -TERM "$pid"; wait "$pid" || true
    # KEEP=DIR keeps the profiles for `cg_annotate` (which functions miss).
    [ -z "${KEEP:-}" ] || cp "$work/out.$n" "$KEEP/cachegrind.$revisions-$active.$n"
    # The summary's columns: Ir I1mr ILmr Dr D1mr DLmr Dw D1mw DLmw.
    awk '/^summary:/ { print $2, $6 + $9, $7 + $10 }' "$work/out.$n"
}

for run in $(seq "$runs"); do
    read -r ir_lo d1_lo ll_lo < <(count 1000)
    read -r ir_hi d1_hi ll_hi < <(count 6000)
    echo "run $run: $(( (ir_hi - ir_lo) / 5000 )) instructions, $(( (d1_hi - d1_lo) / 5000 )) D1 misses, $(( (ll_hi - ll_lo) / 5000 )) LL misses per request"
done
