-- The analytics schema: tenants, events partitioned by month, and the
-- exact daily rollup. See pg-analytics/README.md.

CREATE TABLE analytics.tenants (
    id         bigint      PRIMARY KEY,
    name       text        NOT NULL,
    plan       text        NOT NULL CHECK (plan IN ('free', 'pro', 'enterprise')),
    created_at timestamptz NOT NULL DEFAULT now()
);

-- The dashboard's semi-join: the tenants of one plan.
CREATE INDEX tenants_plan_idx ON analytics.tenants (plan, id);

-- Events, one partition a month (created by the maintenance job, at least
-- three months ahead). Processing time is kept in whole microseconds so
-- that sums are exact whatever order rows arrive in.
CREATE TABLE analytics.events (
    tenant_id          bigint      NOT NULL,
    created_at         timestamptz NOT NULL,
    event_type         text        NOT NULL,
    processing_time_us bigint      NOT NULL CHECK (processing_time_us >= 0)
) PARTITION BY RANGE (created_at);

-- A row whose month has no partition lands here; its row count is a
-- metric, and the maintenance job refuses to create a partition over it.
CREATE TABLE analytics.events_default PARTITION OF analytics.events DEFAULT;

-- Per partition: a tenant's events in time order.
CREATE INDEX events_tenant_time_idx ON analytics.events (tenant_id, created_at);

-- The daily rollup: counts and sums, never averages, so that it stays
-- exact under late, out-of-order and concurrent writes.
CREATE TABLE analytics.events_daily (
    tenant_id             bigint NOT NULL,
    day                   date   NOT NULL,
    events                bigint NOT NULL CHECK (events >= 0),
    sum_processing_time_us bigint NOT NULL CHECK (sum_processing_time_us >= 0),
    PRIMARY KEY (tenant_id, day)
);

-- Ingest batches already committed: a retried batch is recognised and
-- written once.
CREATE TABLE analytics.ingest_batches (
    batch_id    uuid        PRIMARY KEY,
    rows        integer     NOT NULL,
    committed_at timestamptz NOT NULL DEFAULT now()
);
