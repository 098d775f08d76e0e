-- The inventory service's schema: stock per SKU, reservations and their
-- lines. The migrator creates the schema `inventory` and runs this file in
-- one transaction. Why each index exists: docs/order-saga/inventory.md.

-- One row per SKU. The three counts move between each other, never below
-- zero: the CHECKs are the last line of defence behind the conditional
-- updates (`WHERE available >= q`), so even a bug cannot oversell.
CREATE TABLE inventory.skus (
    sku              text        PRIMARY KEY
                                 CHECK (sku ~ '^[A-Za-z0-9._-]{1,64}$'),
    available        bigint      NOT NULL DEFAULT 0 CHECK (available >= 0),
    reserved         bigint      NOT NULL DEFAULT 0 CHECK (reserved >= 0),
    committed        bigint      NOT NULL DEFAULT 0 CHECK (committed >= 0),
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
-- however many committed ones pile up, and the sweeper's
-- `WHERE state = 'reserved' AND expires_at <= now ORDER BY expires_at`
-- reads it from the left end.
CREATE INDEX reservations_sweep_idx
    ON inventory.reservations (expires_at)
    WHERE state = 'reserved';

-- The lines of a reservation, priced when reserved. The primary key serves
-- "the lines of reservation X" (commit, release, sweep, reads) and refuses
-- a SKU twice in one reservation.
CREATE TABLE inventory.reservation_lines (
    reservation_id   uuid   NOT NULL REFERENCES inventory.reservations (id),
    sku              text   NOT NULL REFERENCES inventory.skus (sku),
    quantity         bigint NOT NULL CHECK (quantity > 0),
    unit_price_cents bigint NOT NULL CHECK (unit_price_cents >= 0),
    PRIMARY KEY (reservation_id, sku)
);
