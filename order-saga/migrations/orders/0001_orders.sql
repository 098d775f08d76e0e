-- The order service's own tables: orders with their durable saga state,
-- the saga log, and the idempotency keys of create requests.
-- See docs/order-saga/ARCHITECTURE.md ("Schemas").

CREATE SEQUENCE orders.lease_tokens;

CREATE TABLE orders.orders (
    id               uuid        PRIMARY KEY,          -- UUIDv7: time-ordered
    customer         text        NOT NULL,
    state            text        NOT NULL,
    items            jsonb       NOT NULL,
    lines            jsonb       NOT NULL DEFAULT '[]',
    total_cents      bigint      NOT NULL DEFAULT 0,
    currency         text        NOT NULL,
    ship_to          jsonb       NOT NULL,
    cancel_reason    text,
    payment_id       text,
    shipment_id      text,
    attention        text,
    -- The saga: bit sets of begun and done steps and of compensations run.
    saga_begun       smallint    NOT NULL DEFAULT 0,
    saga_done        smallint    NOT NULL DEFAULT 0,
    saga_compensated smallint    NOT NULL DEFAULT 0,
    attempts         integer     NOT NULL DEFAULT 0,
    cancel_requested boolean     NOT NULL DEFAULT false,
    idempotency_key  text,
    -- Work distribution: due time, and the lease fenced by its token.
    next_attempt_at  timestamptz NOT NULL DEFAULT now(),
    lease_owner      text,
    lease_token      bigint      NOT NULL DEFAULT 0,
    lease_until      timestamptz,
    lease_ms         integer     NOT NULL DEFAULT 10000,
    created_at       timestamptz NOT NULL,
    updated_at       timestamptz NOT NULL
);

-- list_orders: a customer's orders newest first, keyset on the id.
CREATE INDEX orders_customer_idx ON orders.orders (customer, id DESC);

-- The claim query: unfinished sagas by due time. Partial, so it holds only
-- the (few) sagas in flight, however many orders are finished.
CREATE INDEX orders_runnable_idx ON orders.orders (next_attempt_at)
    WHERE state NOT IN ('confirmed', 'cancelled', 'needs_attention');

-- Operators and the needs_attention gauge.
CREATE INDEX orders_needs_attention_idx ON orders.orders (updated_at)
    WHERE state = 'needs_attention';

-- The saga log: what began, succeeded, failed, was compensated, in order.
CREATE TABLE orders.saga_log (
    order_id uuid        NOT NULL,
    seq      bigserial,
    at       timestamptz NOT NULL DEFAULT now(),
    entry    text        NOT NULL,
    PRIMARY KEY (order_id, seq)
);

-- Idempotency keys of create requests, per customer, kept 24 h.
-- `status` and `response` are NULL while the first request is in flight.
CREATE TABLE orders.idempotency_keys (
    customer     text        NOT NULL,
    key          text        NOT NULL,
    request_hash bytea       NOT NULL,
    order_id     uuid        NOT NULL,
    status       smallint,
    response     jsonb,
    created_at   timestamptz NOT NULL DEFAULT now(),
    expires_at   timestamptz NOT NULL,
    PRIMARY KEY (customer, key)
);

-- The purge of expired keys.
CREATE INDEX idempotency_keys_expires_idx ON orders.idempotency_keys (expires_at);
