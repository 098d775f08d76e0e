-- A batch id's first answer, kept with it so that a replay answers what the
-- first commit answered, and a batch id reused for other events is refused.
-- See docs/pg-analytics/API.md "Idempotency-Key".

-- `events_sha256`: SHA-256 of the canonical encoding of the submitted
-- events (all of them, the refused ones included; see
-- pg_analytics::postgres::writer). A replay whose events hash differently is
-- refused (`AnalyticsError::IdempotencyKeyReused`). NULL on batches
-- committed before this migration: their replays are answered as before
-- (the refusals computed again).
--
-- `rejected_*`: the refused rows of the first answer, in index order (three
-- parallel arrays: position in the batch, code, reason), returned as they
-- are on a replay, whatever the rules, the tenants or the horizon say now.
--
-- A batch with no row accepted is not recorded at all (it wrote nothing), so
-- a client that fixes its rows and sends them again under the same id gets
-- them written.
ALTER TABLE analytics.ingest_batches
    ADD COLUMN events_sha256   bytea CHECK (octet_length(events_sha256) = 32),
    ADD COLUMN rejected_index  integer[] NOT NULL DEFAULT '{}',
    ADD COLUMN rejected_code   text[]    NOT NULL DEFAULT '{}',
    ADD COLUMN rejected_reason text[]    NOT NULL DEFAULT '{}';
