# syntax=docker/dockerfile:1
# tcplb in a container: built with the Rust toolchain, run from a small
# Debian image as an unprivileged numeric user (Kubernetes' runAsNonRoot can
# only check a numeric one; 65532 is what docs/kubernetes.md runs as).
#
#   docker build -t tcplb .
#   docker run --rm -p 8080:8080 tcplb --listen :8080 --upstream 192.0.2.10:80
#
# The runtime image keeps /bin/sh so that `kill -HUP 1` (reload) can be run
# in it with `kubectl exec`; tcplb itself is PID 1 and handles its signals.

FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin tcplb \
    && install -D -m 0755 target/release/tcplb /out/tcplb

FROM debian:bookworm-slim
COPY --from=build /out/tcplb /usr/local/bin/tcplb
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/tcplb"]
CMD ["--help"]
