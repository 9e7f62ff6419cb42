# syntax=docker/dockerfile:1.7
# The egress-scaler image: a static (musl) binary alone on a distroless base, with no shell
# and no package manager; it runs as UID 65532 and writes no file, so a read-only root
# filesystem works.   docker build -t egress-scaler:0.1.0 .

FROM rust:1.95-bookworm AS build
# musl-gcc compiles ring's C and assembly for the static target.
RUN apt-get update \
 && apt-get install -y --no-install-recommends musl-tools=1.2.3-1 \
 && rm -rf /var/lib/apt/lists/*
RUN rustup target add x86_64-unknown-linux-musl
WORKDIR /src
COPY Cargo.toml Cargo.lock build.rs ./
COPY proto proto
COPY benches benches
COPY src src
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --target x86_64-unknown-linux-musl --bin egress-scaler \
 && cp target/x86_64-unknown-linux-musl/release/egress-scaler /egress-scaler

# Static: no libc needed; the base brings CA certificates (rediss://, https:// LiveKit) and
# the nonroot user.
FROM gcr.io/distroless/static-debian12:nonroot
COPY --from=build /egress-scaler /usr/local/bin/egress-scaler
USER 65532:65532
# KEDA gRPC, then HTTP API, webhooks, /metrics and probes.
EXPOSE 9090 8080
ENTRYPOINT ["/usr/local/bin/egress-scaler", "serve"]
