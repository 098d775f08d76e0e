# The four order-saga services in one image (feature `order-saga-server`):
# order_service, inventory_service, shipping_service and payment_sim.
# docker-compose.yml runs each from it with its own command; the contract
# (flags, environment, ports) is in docs/order-saga/deploy.md.
#
#   docker build -f deploy/order-saga.Dockerfile -t ferrokeel/order-saga .

# --- build -------------------------------------------------------------------
FROM rust:1.95-bookworm AS builder
WORKDIR /src
COPY . .
RUN cargo build --release --locked --no-default-features --features order-saga-server \
      --example order_service --example inventory_service \
      --example shipping_service --example payment_sim

# --- run ---------------------------------------------------------------------
FROM debian:bookworm-slim
# curl is only for the container health checks (GET /healthz).
RUN apt-get update \
 && apt-get install -y --no-install-recommends curl \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin saga
COPY --from=builder \
     /src/target/release/examples/order_service \
     /src/target/release/examples/inventory_service \
     /src/target/release/examples/shipping_service \
     /src/target/release/examples/payment_sim \
     /usr/local/bin/
USER saga
# Each compose service names its binary; alone, the image runs the order
# service (everything in one process, in memory, unless configured).
ENV BIND=0.0.0.0:8081
EXPOSE 8081 8082 8083 8090
CMD ["order_service"]
