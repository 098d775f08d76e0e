-- notify-hub schema, version 2: ids compare byte by byte.
--
-- User and group ids are opaque strings. Under the database's default
-- collation (en_US.UTF-8, C.UTF-8, ...) every comparison in the primary-key
-- indexes and in ORDER BY goes through strcoll(); COLLATE "C" compares bytes,
-- which is the order the hub sorts ids in anyway (Rust's str order). For a
-- 10,000-member broadcast this cut the member read from ~30 ms to ~4 ms and
-- the delivery insert by about a third (docs/adr/0010-notify-fanout-on-write.md).
-- Rewrites the tables and rebuilds their indexes once.

ALTER TABLE notify_user_seqs
    ALTER COLUMN user_id TYPE text COLLATE "C";

ALTER TABLE notify_deliveries
    ALTER COLUMN user_id TYPE text COLLATE "C";

ALTER TABLE notify_group_members
    ALTER COLUMN group_id TYPE text COLLATE "C",
    ALTER COLUMN user_id  TYPE text COLLATE "C";
