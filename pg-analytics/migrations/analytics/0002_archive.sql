-- Archival of old months to Parquet in an object store: the manifest of
-- archives and the archived horizon that fences late rows. See
-- docs/pg-analytics/archival.md and docs/adr/0022.

-- One row: events created before `archived_before` are refused by the
-- writer (reason `before_archived_horizon`). The archiver raises it, and
-- commits, before it detaches a month; the writer reads it `FOR SHARE` in
-- its ingest transaction, so the raise waits for batches in flight and no
-- later batch writes into a month being archived (without the fence, such
-- a row would land in the default partition once the month is detached).
-- NULL: nothing is archived.
CREATE TABLE analytics.archive_horizon (
    only_row        boolean     PRIMARY KEY DEFAULT true CHECK (only_row),
    archived_before timestamptz,
    updated_at      timestamptz NOT NULL DEFAULT now()
);
INSERT INTO analytics.archive_horizon (only_row, archived_before) VALUES (true, NULL);

-- One row a month partition that was ever archived. `state` is the step
-- the archiver finished last; each step records its effect here before
-- the next starts, so a run after a crash resumes from this row:
--   fenced → detached → exported → verified → dropped   (archive)
--   dropped → restoring → restored                      (restore)
-- A restored month may be archived again (back to fenced).
CREATE TABLE analytics.archives (
    month          date        PRIMARY KEY CHECK (extract(day FROM month) = 1),
    partition_name text        NOT NULL,
    object_path    text        NOT NULL,
    state          text        NOT NULL CHECK (state IN
                       ('fenced', 'detached', 'exported', 'verified', 'dropped', 'restoring', 'restored')),
    -- The partition's size once detached (no write changes it after):
    -- pg_relation_size (the heap's main fork) and pg_total_relation_size
    -- (with its indexes and TOAST).
    heap_bytes     bigint,
    total_bytes    bigint,
    -- What the export wrote: rows, the object's size and SHA-256 (hex).
    rows           bigint,
    parquet_bytes  bigint,
    sha256         text,
    started_at     timestamptz NOT NULL DEFAULT now(),
    updated_at     timestamptz NOT NULL DEFAULT now(),
    exported_at    timestamptz,
    verified_at    timestamptz,
    dropped_at     timestamptz,
    restored_at    timestamptz,
    -- The last failure of a step on this month, cleared when a step succeeds.
    last_error     text
);
