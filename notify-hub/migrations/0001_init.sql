-- notify-hub schema, version 1.
--
-- Fan-out on write: a notification's body is stored once; each recipient
-- gets one small row in notify_deliveries with their own sequence number.
-- See docs/notify-hub/DESIGN.md and docs/adr/0010-notify-fanout-on-write.md.

CREATE TABLE notify_notifications (
    id          uuid        PRIMARY KEY,      -- UUIDv7: time-ordered
    body        jsonb       NOT NULL,         -- the notification as sent
    created_at  timestamptz NOT NULL
);

-- One row per user: the last sequence number handed out. Updating it takes
-- the row lock that orders concurrent writers for that user.
CREATE TABLE notify_user_seqs (
    user_id   text   PRIMARY KEY,
    last_seq  bigint NOT NULL CHECK (last_seq >= 0)
) WITH (fillfactor = 70);                     -- room for HOT updates

-- The per-user stream: history and replay are range scans of this key.
CREATE TABLE notify_deliveries (
    user_id          text   NOT NULL,
    seq              bigint NOT NULL,
    notification_id  uuid   NOT NULL,
    PRIMARY KEY (user_id, seq)
);

CREATE TABLE notify_group_members (
    group_id   text        NOT NULL,
    user_id    text        NOT NULL,
    joined_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (group_id, user_id)
);
