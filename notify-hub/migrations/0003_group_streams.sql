-- notify-hub schema, version 3: a stream per group (ADR 0026).
--
-- A broadcast appends one item to its group's stream, numbered by the group
-- (its offset), besides the per-member delivery rows that protocol v1 reads.
-- Membership becomes intervals over the group's offsets: a member sees the
-- items with joined_after < offset <= left_after. Nothing existing is
-- rewritten: current members join at offset 0, every stream starts empty.

-- One row per group: the last offset handed out. Updating it takes the row
-- lock that orders a group's broadcasts and leaves, as notify_user_seqs
-- orders a user's deliveries.
CREATE TABLE notify_group_heads (
    group_id     text COLLATE "C" PRIMARY KEY,
    last_offset  bigint NOT NULL CHECK (last_offset >= 0)
) WITH (fillfactor = 70);                     -- room for HOT updates

INSERT INTO notify_group_heads (group_id, last_offset)
SELECT DISTINCT group_id, 0 FROM notify_group_members;

-- The group's stream: a notification, or the record of a member leaving
-- (so that every node cuts the leaver off at the same offset).
CREATE TABLE notify_group_items (
    group_id         text COLLATE "C" NOT NULL,
    group_offset     bigint NOT NULL CHECK (group_offset > 0),
    notification_id  uuid,
    left_user        text COLLATE "C",
    PRIMARY KEY (group_id, group_offset),
    CHECK ((notification_id IS NULL) <> (left_user IS NULL))
);

-- A current member sees the offsets above joined_after. Existing members
-- count from 0; new ones are written with the head's offset, so the column
-- has no default once it is filled (an older node's join fails loudly
-- instead of joining at 0).
ALTER TABLE notify_group_members ADD COLUMN joined_after bigint NOT NULL DEFAULT 0;
ALTER TABLE notify_group_members ALTER COLUMN joined_after DROP DEFAULT;

-- A user's memberships, current ones by this index, past ones below.
CREATE INDEX notify_group_members_by_user ON notify_group_members (user_id, group_id);

-- Past memberships: the member saw joined_after < offset <= left_after.
CREATE TABLE notify_group_member_intervals (
    user_id       text COLLATE "C" NOT NULL,
    group_id      text COLLATE "C" NOT NULL,
    joined_after  bigint NOT NULL,
    left_after    bigint NOT NULL,
    joined_at     timestamptz NOT NULL,
    left_at       timestamptz NOT NULL,
    PRIMARY KEY (user_id, group_id, joined_after),
    CHECK (left_after > joined_after)
);

-- v1's per-member delivery rows of a broadcast, told apart from direct
-- sends: a client reading the group streams skips them in its own sequence
-- (it gets the broadcast from the stream). NULL on rows written before this
-- version, which are read as direct.
ALTER TABLE notify_deliveries ADD COLUMN via_group boolean;
