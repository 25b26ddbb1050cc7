# syntax=docker/dockerfile:1
#
# The paxoskv image: `paxoskv serve` as a non-root user, with the `paxoskv`
# CLI on the PATH (kubectl exec paxoskv-0 -- paxoskv status).
#
#   docker build -t paxoskv:latest .                              # Debian slim: has a shell (sh) for kubectl exec -it
#   docker build -t paxoskv:distroless --build-arg RUNTIME=distroless .   # no shell, no package manager
#
# protoc is not needed: build.rs compiles the protos with protox.

ARG RUST_VERSION=1.95
# slim (default) or distroless
ARG RUNTIME=slim

FROM rust:${RUST_VERSION}-slim-trixie AS build
WORKDIR /src
COPY . .
# The same build scripts/test.sh checks: one binary, the locked dependencies.
RUN cargo build --release --locked --bin paxoskv \
    && install -D -m 0755 target/release/paxoskv /out/paxoskv \
    && install -d -m 0700 /out/data

FROM debian:trixie-slim AS runtime-slim
RUN groupadd --system --gid 10001 paxoskv \
    && useradd --system --uid 10001 --gid 10001 --home-dir /var/lib/paxoskv --shell /usr/sbin/nologin paxoskv

FROM gcr.io/distroless/cc-debian13:nonroot AS runtime-distroless

# hadolint ignore=DL3006
FROM runtime-${RUNTIME}
LABEL org.opencontainers.image.title="paxoskv" \
      org.opencontainers.image.description="A replicated key-value store kept consistent by Multi-Paxos" \
      org.opencontainers.image.licenses="MIT OR Apache-2.0" \
      app="paxoskv"
COPY --from=build /out/paxoskv /usr/local/bin/paxoskv
COPY --from=build --chown=10001:10001 /out/data /var/lib/paxoskv
# The data directory: mount a volume here (a PersistentVolumeClaim in k8s/).
VOLUME ["/var/lib/paxoskv"]
ENV PAXOSKV_DATA_DIR=/var/lib/paxoskv
# client (KvStore, Admin, health, reflection), peer (paxoskv.v1.Paxos),
# health (plaintext, for probes), HTTP/JSON (KvStore for curl; HTTPS with
# TLS), metrics (Prometheus).
EXPOSE 8081 8181 8281 8381 9090
USER 10001:10001
ENTRYPOINT ["/usr/local/bin/paxoskv"]
CMD ["serve"]
