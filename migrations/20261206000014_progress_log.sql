-- Devices' progress marks, appended rather than updated in place (issue 22).
--
-- Each commit moves the mark of every device in it: acked_seq, the count
-- of readings, when it was last seen and last stored a reading, and when
-- each of its series last stored one. Updated in place, at 100k devices a
-- commit of ~250 devices rewrote ~210 of the 592 pages of `devices` and as
-- many of `device_sensors`: 6 MB of WAL and two thirds of the commit's
-- time, for 250 readings. Appended here they fill a few pages; the writer
-- folds the logs into the tables a slice of devices at a time, each slice
-- every few seconds, and all of them when the store opens, before
-- retention and at a clean stop.
--
-- The tables alone lag the logs: whatever must be exact reads the views
-- `device_progress` and `sensor_progress` (PostgreSQL has the same views
-- over its tables, which it still updates in place: other hubs read them).

-- Keyed by (slice, n): a slice is a range of device ids (see
-- `store::write::log_slice`), n the writer's count of log rows. A commit
-- appends at the end of each slice; a fold takes one slice at a time, so
-- it touches the pages of that slice's devices alone and deletes a run of
-- the log's own pages.
CREATE TABLE progress_log (
    slice     INTEGER NOT NULL,
    n         INTEGER NOT NULL,
    device_id INTEGER NOT NULL,
    acked_seq INTEGER NOT NULL,  -- the mark after the commit
    added     INTEGER NOT NULL,  -- readings the commit stored
    seen_ms   INTEGER NOT NULL,  -- the commit's clock
    PRIMARY KEY (slice, n)
) WITHOUT ROWID;

CREATE TABLE sensor_seen_log (
    slice     INTEGER NOT NULL,
    n         INTEGER NOT NULL,
    device_id INTEGER NOT NULL,
    sensor_id INTEGER NOT NULL,
    seen_ms   INTEGER NOT NULL,
    PRIMARY KEY (slice, n)
) WITHOUT ROWID;

-- What the logs hold, one row per device (series); a mark only grows and
-- a device's id is never reused, so max() and sum() fold them.
CREATE VIEW progress_pending AS
    SELECT device_id, max(acked_seq) AS acked_seq, sum(added) AS added,
           max(seen_ms) AS seen_ms,
           max(CASE WHEN added > 0 THEN seen_ms END) AS reading_ms
    FROM progress_log GROUP BY device_id;

CREATE VIEW sensor_seen_pending AS
    SELECT device_id, sensor_id, max(seen_ms) AS seen_ms
    FROM sensor_seen_log GROUP BY device_id, sensor_id;

-- Hellos write last_seen_ms in place, after log rows of earlier commits.
CREATE VIEW device_progress AS
    SELECT d.id AS id,
           max(d.acked_seq, COALESCE(p.acked_seq, 0)) AS acked_seq,
           d.reading_count + COALESCE(p.added, 0) AS reading_count,
           max(d.last_seen_ms, COALESCE(p.seen_ms, 0)) AS last_seen_ms,
           COALESCE(p.reading_ms, d.last_reading_ms) AS last_reading_ms
    FROM devices d LEFT JOIN progress_pending p ON p.device_id = d.id;

CREATE VIEW sensor_progress AS
    SELECT ds.device_id AS device_id, ds.sensor_id AS sensor_id,
           COALESCE(s.seen_ms, ds.last_reading_ms) AS last_reading_ms
    FROM device_sensors ds LEFT JOIN sensor_seen_pending s
        ON s.device_id = ds.device_id AND s.sensor_id = ds.sensor_id;
