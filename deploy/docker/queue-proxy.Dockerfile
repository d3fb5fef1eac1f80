# syntax=docker/dockerfile:1
# check=error=true
#
# The queue-proxy image: the sidecar the webhook injects next to each function's
# container (and `queue-proxy inject`, the same injection for manifests). Build from the
# repository root:
#   docker build -f deploy/docker/queue-proxy.Dockerfile -t ghcr.io/thaw-dev/queue-proxy:0.1.0 .
#
# Base images are pinned by tag: no registry is reachable where this was written, so
# their digests could not be resolved here; pin them (FROM image:tag@sha256:...) when you
# build. The builder's Debian release matches the runtime's (trixie = debian13).

FROM docker.io/library/rust:1.95.0-slim-trixie AS build
WORKDIR /src
# jemalloc-sys (the allocator, built from C) needs make, which the slim image lacks.
# Pinned to trixie's version, as the base image's Debian release is pinned.
RUN apt-get update && apt-get install -y --no-install-recommends make=4.4.1-2 \
    && rm -rf /var/lib/apt/lists/*
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p thaw-queue-proxy \
    && install -D -m 0755 target/release/queue-proxy /out/queue-proxy

FROM gcr.io/distroless/cc-debian13:nonroot
COPY --from=build /out/queue-proxy /queue-proxy
# Knative's queue-proxy runs as a non-root user with a read-only root filesystem too; the
# binary writes nothing to disk.
USER 65532:65532
# serving, h2c serving, admin, metrics, user metrics.
EXPOSE 8012 8013 8022 9090 9091
ENTRYPOINT ["/queue-proxy"]
