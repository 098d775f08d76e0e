-- notify-hub schema, version 2: ids compare byte by byte.
--
-- User and group ids are opaque strings. Under the database's default
-- collation (en_US.UTF-8, C.UTF-8, ...) every comparison in the primary-key
-- indexes and in ORDER BY goes through strcoll(); COLLATE "C" compares bytes,
-- which is the order the hub sorts ids in anyway (Rust's str order). For a
-- 10,000-member group, reading the members in order took 3.3 ms instead of
-- 10.2 ms in psql, and inserting 10,000 delivery rows 56-78 ms instead of
-- 98-118 ms (docs/adr/0010-notify-fanout-on-write.md, amendment).
-- Changing only the collation keeps the rows in place; the primary-key
-- indexes are rebuilt once.

ALTER TABLE notify_user_seqs
    ALTER COLUMN user_id TYPE text COLLATE "C";

ALTER TABLE notify_deliveries
    ALTER COLUMN user_id TYPE text COLLATE "C";

ALTER TABLE notify_group_members
    ALTER COLUMN group_id TYPE text COLLATE "C",
    ALTER COLUMN user_id  TYPE text COLLATE "C";
