-- Archival, revised (docs/pg-analytics/archival.md, docs/adr/0022).
--
-- 1. The fence is an advisory lock, no longer a row lock. Since this
--    version the writer does not read `analytics.archive_horizon` FOR SHARE
--    (that wrote the row's tuple header and made a MultiXact whenever two
--    batches overlapped, on every batch). Instead:
--      - an ingest transaction takes pg_advisory_xact_lock_shared(K) as its
--        first lock, then reads the horizon with a plain SELECT, a separate
--        statement (READ COMMITTED: its snapshot is taken after the lock is
--        granted, so it sees a horizon committed by whoever held the lock
--        exclusively);
--      - whatever changes the horizon (the archiver's fence, a restore, an
--        abort) takes pg_advisory_xact_lock(K) (exclusive) first, so it
--        waits for the batches in flight, and batches that start later
--        wait for it and see the new horizon.
--    K = 7380064356294359662 = x'666b416e48727a6e', the ASCII bytes of
--    "fkAnHrzn" (ferrokeel analytics horizon) read as a big-endian bigint:
--    pg_analytics::postgres::HORIZON_LOCK_KEY. A single-bigint advisory key
--    does not collide with the archiver's per-month (int4, int4) keys.
--    Anything else that writes analytics.events must take the shared lock
--    the same way, or it is not fenced.
--
-- 2. A month's archival can be called off (Archiver::abort): its partition
--    is attached again and the row says 'aborted'. archive_due leaves an
--    aborted month alone; an explicit archive(month) starts it over.
ALTER TABLE analytics.archives
    DROP CONSTRAINT archives_state_check,
    ADD CONSTRAINT archives_state_check CHECK (state IN
        ('fenced', 'detached', 'exported', 'verified', 'dropped', 'restoring', 'restored', 'aborted'));
