-- The inventory service's schema: stock per SKU, reservations and their
-- lines. The migrator creates the schema `inventory` and runs this file in
-- one transaction. Why each column and index exists:
-- docs/order-saga/inventory.md.

-- One row per SKU: the hot row of a hot SKU, so it holds only what must
-- change atomically with the stock. `held` counts the units taken out of
-- `available` by reservations that still hold them (reserved or
-- committed); committing a reservation moves nothing here, so an order
-- locks its SKU rows once (reserve), not twice. The CHECKs are the last
-- line of defence behind the conditional updates (`WHERE available >= q`):
-- even a bug cannot oversell.
CREATE TABLE inventory.skus (
    sku              text        PRIMARY KEY
                                 CHECK (sku ~ '^[A-Za-z0-9._-]{1,64}$'),
    available        bigint      NOT NULL DEFAULT 0 CHECK (available >= 0),
    held             bigint      NOT NULL DEFAULT 0 CHECK (held >= 0),
    unit_price_cents bigint      NOT NULL CHECK (unit_price_cents >= 0),
    created_at       timestamptz NOT NULL,
    updated_at       timestamptz NOT NULL
);

-- One row per reservation, keyed by the order's id (the idempotency key).
CREATE TABLE inventory.reservations (
    id         uuid        PRIMARY KEY,
    state      text        NOT NULL
                           CHECK (state IN ('reserved', 'committed', 'released', 'expired')),
    expires_at timestamptz NOT NULL,
    created_at timestamptz NOT NULL,
    updated_at timestamptz NOT NULL
);

-- The sweeper's queue: only reservations still holding stock, in expiry
-- order. Partial, so it stays as small as the number of open reservations
-- however many finished ones pile up, and the sweeper's
-- `WHERE state = 'reserved' AND expires_at <= now ORDER BY expires_at`
-- reads it from the left end.
CREATE INDEX reservations_sweep_idx
    ON inventory.reservations (expires_at)
    WHERE state = 'reserved';

-- The lines of a reservation, priced when reserved. The primary key serves
-- "the lines of reservation X" (commit, release, sweep, reads) and refuses
-- a SKU twice in one reservation. `open` mirrors "the reservation is still
-- reserved", so a SKU's reserved units are a sum over its open lines.
CREATE TABLE inventory.reservation_lines (
    reservation_id   uuid    NOT NULL REFERENCES inventory.reservations (id),
    sku              text    NOT NULL REFERENCES inventory.skus (sku),
    quantity         bigint  NOT NULL CHECK (quantity > 0),
    unit_price_cents bigint  NOT NULL CHECK (unit_price_cents >= 0),
    open             boolean NOT NULL DEFAULT true,
    PRIMARY KEY (reservation_id, sku)
);

-- A SKU's open lines: `reserved` in a stock read is a sum over this
-- partial index (an index-only scan of the few lines still open), and
-- `committed` is `held - reserved`.
CREATE INDEX reservation_lines_open_idx
    ON inventory.reservation_lines (sku) INCLUDE (quantity)
    WHERE open;
