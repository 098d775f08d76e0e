# notify_server: the notify-hub WebSocket + HTTP server (feature `notify-server`).
#
#   docker build -t ferrokeel/notify-server .
#   docker compose up          # two nodes behind nginx, with PostgreSQL and Redis
#
# Configuration is read from the environment: DATABASE_URL, REDIS_URL,
# NOTIFY_JWT_SECRET, NOTIFY_ADDR. See docs/notify-hub/DESIGN.md.

# --- build -------------------------------------------------------------------
FROM rust:1.95-bookworm AS builder
WORKDIR /src
COPY . .
RUN cargo build --release --locked --features notify-server --example notify_server

# --- run ---------------------------------------------------------------------
FROM debian:bookworm-slim
# curl is only for the container health check (GET /healthz).
RUN apt-get update \
 && apt-get install -y --no-install-recommends curl \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin notify
COPY --from=builder /src/target/release/examples/notify_server /usr/local/bin/notify_server
USER notify
ENV NOTIFY_ADDR=0.0.0.0:8080
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/notify_server"]
