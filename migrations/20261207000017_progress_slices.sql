-- The progress logs go from 8 slices to 32 (issue 22; `store::write::
-- LOG_SLICES`): a device's marks move from slice (id >> 12) % 8 to
-- (id >> 12) % 32, and a reader of one device's marks seeks its slice
-- alone. Whatever the logs hold under the old numbering (a hub killed
-- mid-run; a clean stop or start folds them) is folded into the tables
-- here, before any reader looks, as the views read it. The logs are
-- emptied before the tables are updated in place, so that at the
-- database's size limit the updates have the logs' pages to grow into
-- (as in 20261207000016_progress_runs).
CREATE TEMP TABLE progress_folded AS SELECT * FROM progress_pending;
CREATE TEMP TABLE sensor_seen_folded AS SELECT * FROM sensor_seen_pending;
DELETE FROM progress_log;
DELETE FROM sensor_seen_log;
UPDATE devices SET acked_seq = max(devices.acked_seq, p.acked_seq),
    reading_count = max(0, devices.reading_count + p.added),
    last_seen_ms = max(devices.last_seen_ms, p.seen_ms),
    last_reading_ms = COALESCE(p.reading_ms, devices.last_reading_ms)
    FROM temp.progress_folded AS p WHERE devices.id = p.device_id;
UPDATE device_sensors SET last_reading_ms = s.seen_ms FROM temp.sensor_seen_folded AS s
    WHERE device_sensors.device_id = s.device_id AND device_sensors.sensor_id = s.sensor_id;
DROP TABLE temp.progress_folded;
DROP TABLE temp.sensor_seen_folded;
