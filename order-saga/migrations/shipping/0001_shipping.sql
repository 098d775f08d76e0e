-- The shipping service's one table: one row per order, either a live
-- shipment or a cancelled one. A cancel of an order that has no row inserts
-- a cancelled row (a tombstone), so a schedule arriving late cannot book it.
-- Rows are never deleted. Why each index exists: docs/order-saga/shipping.md.
CREATE TABLE shipping.shipments (
    -- The idempotency key of every call: schedule is INSERT ... ON CONFLICT
    -- (order_id) DO NOTHING, cancel an upsert on it, lookups are by it.
    order_id     uuid        PRIMARY KEY,
    -- The id given to callers (and a carrier); unique, so a shipment id
    -- names one order.
    id           text        NOT NULL UNIQUE,
    state        text        NOT NULL CHECK (state IN ('scheduled', 'cancelled')),
    -- The request as booked; NULL only on a tombstone.
    address      jsonb,
    items        jsonb,
    created_at   timestamptz NOT NULL,
    cancelled_at timestamptz,
    CONSTRAINT shipments_cancelled_at_iff_cancelled
        CHECK ((state = 'cancelled') = (cancelled_at IS NOT NULL)),
    CONSTRAINT shipments_live_rows_have_a_request
        CHECK (state = 'cancelled' OR (address IS NOT NULL AND items IS NOT NULL))
);
