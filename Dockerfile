# syntax=docker/dockerfile:1
# credbroker: build with cargo, run on a distroless base as a non-root user
# (no shell, no package manager). Build: docker build -t credbroker .
# The build needs no system protoc (protox compiles the .proto files).

FROM rust:1.95-bookworm AS build
WORKDIR /src
# Dependencies first, so a source change does not rebuild them.
COPY Cargo.toml Cargo.lock build.rs ./
COPY proto ./proto
COPY src ./src
COPY crates ./crates
COPY migrations ./migrations
COPY benches ./benches
COPY tests ./tests
COPY examples ./examples
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin credbroker \
    && install -D -m 0755 target/release/credbroker /out/credbroker

# glibc and libgcc, nothing else; uid/gid 65532 ("nonroot").
FROM gcr.io/distroless/cc-debian12:nonroot
LABEL org.opencontainers.image.title="credbroker" \
      org.opencontainers.image.description="Multi-tenant gRPC credential broker for exchange API keys" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=build /out/credbroker /usr/local/bin/credbroker
USER 65532:65532
# gRPC (mTLS), metrics, plaintext health for the kubelet.
EXPOSE 50051 9464 50052
ENTRYPOINT ["/usr/local/bin/credbroker"]
CMD ["server", "--config", "/etc/credbroker/config/credbroker.toml"]
