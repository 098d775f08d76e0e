-- The dashboard reads the rollup of one plan's tenants: with the counts and
-- sums in the primary key's index, each tenant's days are one index-only
-- range scan (no heap visits, no sort in the database; the rows are
-- ordered in the process). Measured in docs/PERFORMANCE.md "pg-analytics".
ALTER TABLE analytics.events_daily
    DROP CONSTRAINT events_daily_pkey,
    ADD CONSTRAINT events_daily_pkey PRIMARY KEY (tenant_id, day)
        INCLUDE (events, sum_processing_time_us);

-- The rollup's rows are updated by every batch, and an index-only scan
-- skips the heap only on pages vacuum has marked all-visible.
ALTER TABLE analytics.events_daily SET (
    autovacuum_vacuum_scale_factor = 0.02,
    autovacuum_vacuum_insert_scale_factor = 0.02
);
