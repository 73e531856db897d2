-- The device twin (issue 20). Tags are operator-owned key/values: the labels
-- that devices sent in their Hellos until now become their tags, once, here;
-- from now on a Hello's labels are reported state (twins.reported.hello)
-- and never change tags.
ALTER TABLE devices RENAME COLUMN labels TO tags;

-- One row per device with a twin (written on its first Hello or desired
-- change). Documents are JSON objects; their *_meta mirror them with each
-- key's last update (ms). Versions only grow, by one per change.
CREATE TABLE twins (
    device_id        INTEGER PRIMARY KEY,          -- devices.id
    desired          TEXT    NOT NULL DEFAULT '{}',
    desired_meta     TEXT    NOT NULL DEFAULT '{}',
    desired_version  INTEGER NOT NULL DEFAULT 0,
    reported         TEXT    NOT NULL DEFAULT '{}',
    reported_meta    TEXT    NOT NULL DEFAULT '{}',
    reported_version INTEGER NOT NULL DEFAULT 0,
    reported_seq     INTEGER NOT NULL DEFAULT 0,   -- highest ReportedPatch.seq committed
    in_sync          INTEGER NOT NULL DEFAULT 1    -- 1 when the delta is empty
);

-- "Which devices are out of sync" reads only those.
CREATE INDEX twins_out_of_sync ON twins (device_id) WHERE in_sync = 0;
