# syntax=docker/dockerfile:1
# check=error=true
#
# The activator image: `activator` runs the activators (THAW_PLATFORM=kubernetes) and,
# as `activator webhook`, the sidecar injector. Build from the repository root:
#   docker build -f deploy/docker/activator.Dockerfile -t ghcr.io/thaw-dev/activator:0.1.0 .
#
# Base images are pinned by tag: no registry is reachable where this was written, so
# their digests could not be resolved here; pin them (FROM image:tag@sha256:...) when you
# build. The builder's Debian release matches the runtime's (trixie = debian13), so the
# binary links against the glibc it runs with.

FROM docker.io/library/rust:1.95.0-slim-trixie AS build
WORKDIR /src
# jemalloc-sys (the allocator, built from C) needs make, which the slim image lacks.
# Pinned to trixie's version, as the base image's Debian release is pinned.
RUN apt-get update && apt-get install -y --no-install-recommends make=4.4.1-2 \
    && rm -rf /var/lib/apt/lists/*
COPY . .
# Cargo's registry and the target folder are cache mounts: a rebuild after a source change
# compiles only what changed. The binary is copied out in the same step, since a cache
# mount is not part of the image.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p thaw-activator \
    && install -D -m 0755 target/release/activator /out/activator

# distroless "cc": glibc, libgcc and CA certificates, no shell, no package manager.
FROM gcr.io/distroless/cc-debian13:nonroot
COPY --from=build /out/activator /activator
# Numeric, so the kubelet can check runAsNonRoot without reading /etc/passwd. The binary
# writes nothing to disk, so the pod's readOnlyRootFilesystem holds with no volume.
USER 65532:65532
# http, h2c, metrics, the leader's stat websocket; the webhook serves HTTPS on 8443.
EXPOSE 8012 8013 9090 8080 8443
ENTRYPOINT ["/activator"]
