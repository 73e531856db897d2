-- The progress logs hold one row per slice per commit, not one per device
-- (issue 22): its marks, a JSON array of arrays, in the order the commit
-- wrote them. At 10k devices × 5 Hz a commit of ~400 one-reading batches
-- appended ~400 progress rows and ~170 series rows, more than half the rows
-- it wrote, each bound, inserted, sorted and deleted again at the fold.
-- A commit now appends a row to each slice it touches, at most
-- `LOG_SLICES` to each log, and the writer folds a slice's rows itself
-- (`store::write::WriteTx::fold_slice`): SQLite's thread does a third less
-- work at that load. The views below read the rows with `json_each`.
--
--   progress_log.marks    [[device_id, acked_seq, added], ...]
--   sensor_seen_log.marks [[device_id, sensor_id], ...]
--
-- Written without spaces: a device's marks are where the text holds
-- "[<device_id>," (see `store::write::LogPick`).

-- What the old logs hold goes into the tables (the fold of the old
-- `store::write::fold_sql`, over the old views), by way of TEMP tables:
-- the old logs are dropped before the tables are updated in place, so at
-- the database's size limit the updates have the logs' pages to grow into.
CREATE TEMP TABLE progress_folded AS SELECT * FROM progress_pending;
CREATE TEMP TABLE sensor_seen_folded AS SELECT * FROM sensor_seen_pending;
DROP VIEW device_progress;
DROP VIEW sensor_progress;
DROP VIEW progress_pending;
DROP VIEW sensor_seen_pending;
DROP TABLE progress_log;
DROP TABLE sensor_seen_log;
UPDATE devices SET acked_seq = max(devices.acked_seq, p.acked_seq),
    reading_count = max(0, devices.reading_count + p.added),
    last_seen_ms = max(devices.last_seen_ms, p.seen_ms),
    last_reading_ms = COALESCE(p.reading_ms, devices.last_reading_ms)
    FROM temp.progress_folded AS p WHERE devices.id = p.device_id;
UPDATE device_sensors SET last_reading_ms = s.seen_ms FROM temp.sensor_seen_folded AS s
    WHERE device_sensors.device_id = s.device_id AND device_sensors.sensor_id = s.sensor_id;
DROP TABLE temp.progress_folded;
DROP TABLE temp.sensor_seen_folded;

-- Keyed by (slice, n) as before: n is the writer's count of log rows.
CREATE TABLE progress_log (
    slice   INTEGER NOT NULL,
    n       INTEGER NOT NULL,
    seen_ms INTEGER NOT NULL,  -- the commit's clock
    marks   TEXT    NOT NULL,
    PRIMARY KEY (slice, n)
) WITHOUT ROWID;

CREATE TABLE sensor_seen_log (
    slice   INTEGER NOT NULL,
    n       INTEGER NOT NULL,
    seen_ms INTEGER NOT NULL,
    marks   TEXT    NOT NULL,
    PRIMARY KEY (slice, n)
) WITHOUT ROWID;

-- What the logs hold, one row per device (series), as before. The keys
-- are cast to INTEGER: an expression without affinity is not indexed, and
-- the join to `devices` below would then be a scan per device.
CREATE VIEW progress_pending AS
    SELECT CAST(m.value ->> 0 AS INTEGER) AS device_id,
           max(CAST(m.value ->> 1 AS INTEGER)) AS acked_seq,
           sum(CAST(m.value ->> 2 AS INTEGER)) AS added, max(l.seen_ms) AS seen_ms,
           max(CASE WHEN m.value ->> 2 > 0 THEN l.seen_ms END) AS reading_ms
    FROM progress_log l, json_each(l.marks) m GROUP BY 1;

CREATE VIEW sensor_seen_pending AS
    SELECT CAST(m.value ->> 0 AS INTEGER) AS device_id,
           CAST(m.value ->> 1 AS INTEGER) AS sensor_id, max(l.seen_ms) AS seen_ms
    FROM sensor_seen_log l, json_each(l.marks) m GROUP BY 1, 2;

-- Unchanged (20261206000015_progress_floor, 20261206000014_progress_log).
CREATE VIEW device_progress AS
    SELECT d.id AS id,
           max(d.acked_seq, COALESCE(p.acked_seq, 0)) AS acked_seq,
           max(0, d.reading_count + COALESCE(p.added, 0)) AS reading_count,
           max(d.last_seen_ms, COALESCE(p.seen_ms, 0)) AS last_seen_ms,
           COALESCE(p.reading_ms, d.last_reading_ms) AS last_reading_ms
    FROM devices d LEFT JOIN progress_pending p ON p.device_id = d.id;

CREATE VIEW sensor_progress AS
    SELECT ds.device_id AS device_id, ds.sensor_id AS sensor_id,
           COALESCE(s.seen_ms, ds.last_reading_ms) AS last_reading_ms
    FROM device_sensors ds LEFT JOIN sensor_seen_pending s
        ON s.device_id = ds.device_id AND s.sensor_id = ds.sensor_id;
