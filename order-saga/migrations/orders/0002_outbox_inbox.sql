-- The messaging tables of the order service: the transactional outbox, the
-- consumers' inbox, and the order timeline (the service's own consumer).
-- See docs/order-saga/MESSAGING.md.

-- Events written in the same transaction as the state change they describe.
-- `seq` is the relay's reading order; rows are marked published (not
-- deleted) once the bus confirmed them, and purged after a retention time.
CREATE TABLE orders.outbox (
    seq          bigserial   PRIMARY KEY,
    event_id     uuid        NOT NULL UNIQUE,
    order_id     uuid        NOT NULL,
    event_type   text        NOT NULL,
    payload      jsonb       NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    published_at timestamptz
);

-- The relay's only read: the oldest unpublished rows in seq order. A partial
-- index stays as small as the backlog (usually a handful of rows), however
-- large the table grows, and gives the rows already sorted.
CREATE INDEX outbox_unpublished_idx ON orders.outbox (seq) WHERE published_at IS NULL;

-- The purge of published rows past their retention, without a full scan.
CREATE INDEX outbox_published_at_idx ON orders.outbox (published_at)
    WHERE published_at IS NOT NULL;

-- Which consumer has processed which event: a consumer inserts here in the
-- same transaction as its effect, so a redelivered event changes nothing.
CREATE TABLE orders.inbox (
    consumer     text        NOT NULL,
    event_id     uuid        NOT NULL,
    processed_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer, event_id)
);

-- The purge of old inbox rows (older than any redelivery can be).
CREATE INDEX inbox_processed_at_idx ON orders.inbox (processed_at);

-- Every event of an order, recorded once by the OrderTimeline consumer.
CREATE TABLE orders.order_timeline (
    order_id    uuid        NOT NULL,
    event_id    uuid        NOT NULL,
    event_type  text        NOT NULL,
    occurred_at timestamptz NOT NULL,
    payload     jsonb       NOT NULL,
    recorded_at timestamptz NOT NULL DEFAULT now(),
    -- Breaks ties between events of the same instant in recording order.
    position    bigint      GENERATED ALWAYS AS IDENTITY,
    PRIMARY KEY (order_id, event_id)
);

-- timeline(order_id) reads one order's events in time order.
CREATE INDEX order_timeline_order_time_idx
    ON orders.order_timeline (order_id, occurred_at, position);
