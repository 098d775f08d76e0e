-- notify-hub schema, version 4: each group's member count on its stream head.
--
-- A broadcast's receipt reports how many members the group had. Counting
-- them in the send's transaction scanned the whole membership (about 2 ms
-- for 5,000 members, in every broadcast's commit path); the count now sits
-- on the head row that the send locks anyway. The database keeps it, by
-- statement-level triggers over the rows each statement inserted or
-- deleted, so every writer (an older node's join included) maintains it and
-- a join batch of 512 members is one update of each head, not 512.
--
-- Rows are only ever inserted and deleted (a membership is never updated).
-- Not counted: a TRUNCATE of notify_group_members, and rows written with
-- triggers off (session_replication_role = replica): set the counts again
-- with the UPDATE below after either. No CHECK on the count: a count gone
-- wrong should not stop a member from leaving.

-- Locks in the order every writer takes them, heads then members (a
-- broadcast, a leave and a join lock the group's head before they touch its
-- members), so that the migration cannot deadlock with a node still
-- running: the ALTER holds the heads, then no membership changes while the
-- counts are taken and the triggers made. Until the migration commits,
-- every statement on the heads waits (sends to groups, joins, leaves).
ALTER TABLE notify_group_heads ADD COLUMN members bigint NOT NULL DEFAULT 0;

LOCK TABLE notify_group_members IN SHARE MODE;

UPDATE notify_group_heads h SET members = c.n
FROM (SELECT group_id, count(*) AS n FROM notify_group_members GROUP BY group_id) c
WHERE h.group_id = c.group_id;

CREATE FUNCTION notify_group_members_count() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        UPDATE notify_group_heads h SET members = h.members + c.n
        FROM (SELECT group_id, count(*) AS n FROM inserted GROUP BY group_id) c
        WHERE h.group_id = c.group_id;
    ELSE
        UPDATE notify_group_heads h SET members = h.members - c.n
        FROM (SELECT group_id, count(*) AS n FROM deleted GROUP BY group_id) c
        WHERE h.group_id = c.group_id;
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER notify_group_members_counted_insert
    AFTER INSERT ON notify_group_members
    REFERENCING NEW TABLE AS inserted
    FOR EACH STATEMENT EXECUTE FUNCTION notify_group_members_count();

CREATE TRIGGER notify_group_members_counted_delete
    AFTER DELETE ON notify_group_members
    REFERENCING OLD TABLE AS deleted
    FOR EACH STATEMENT EXECUTE FUNCTION notify_group_members_count();
