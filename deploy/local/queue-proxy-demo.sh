#!/usr/bin/env bash
# Runs Thaw's queue-proxy by hand in front of the test app, on loopback, with the exact
# environment Knative's controller would give it. Ctrl-C drains and stops both.
set -euo pipefail
cd "$(dirname "$0")/../.."

cargo build --release -p thaw-queue-proxy -p thaw-benches --bin queue-proxy --bin thaw-testapp

APP_PORT=${APP_PORT:-8080}
target/release/thaw-testapp --port "$APP_PORT" &
app=$!

export CONTAINER_CONCURRENCY=${CONTAINER_CONCURRENCY:-10}
export QUEUE_SERVING_PORT=${QUEUE_SERVING_PORT:-8012}
export QUEUE_SERVING_TLS_PORT=${QUEUE_SERVING_TLS_PORT:-8112}
export USER_PORT=$APP_PORT
export REVISION_TIMEOUT_SECONDS=${REVISION_TIMEOUT_SECONDS:-300}
export SERVING_LOGGING_CONFIG=''
export SERVING_LOGGING_LEVEL=${SERVING_LOGGING_LEVEL:-info}
export SERVING_NAMESPACE=default
export SERVING_CONFIGURATION=hello
export SERVING_REVISION=hello-00001
export SERVING_POD=hello-00001-deployment-local
export SERVING_POD_IP=127.0.0.1
export SERVING_READINESS_PROBE="{\"tcpSocket\":{\"port\":$APP_PORT}}"
export THAW_LISTEN_ADDRESS=127.0.0.1
export THAW_DRAIN_QUIET_PERIOD=${THAW_DRAIN_QUIET_PERIOD:-2s}

target/release/queue-proxy &
qp=$!
trap 'kill -TERM $qp 2>/dev/null; wait $qp 2>/dev/null; kill $app 2>/dev/null; wait $app 2>/dev/null' EXIT INT TERM

cat <<MSG

queue-proxy on 127.0.0.1:$QUEUE_SERVING_PORT in front of the test app on 127.0.0.1:$APP_PORT. Try:
  curl -i http://127.0.0.1:$QUEUE_SERVING_PORT/
  curl -i http://127.0.0.1:$QUEUE_SERVING_PORT/ -H 'User-Agent: kube-probe/1.30' -H 'K-Network-Probe: queue'
  curl -s http://127.0.0.1:9090/metrics                                  # autoscaler figures as text
  curl -s http://127.0.0.1:9090/metrics -H 'Accept: application/protobuf' | xxd
  curl -s http://127.0.0.1:9091/metrics                                  # user metrics
Ctrl-C to drain and stop.
MSG
wait $qp
