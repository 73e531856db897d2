-- The views through which exact readers see devices' progress marks
-- (issue 22). SQLite appends the marks to logs and folds them in later;
-- PostgreSQL updates the tables in place (other hubs read the marks
-- through their row locks), so here the views are the tables.
CREATE VIEW device_progress AS
    SELECT id, acked_seq, reading_count, last_seen_ms, last_reading_ms FROM devices;

CREATE VIEW sensor_progress AS
    SELECT device_id, sensor_id, last_reading_ms FROM device_sensors;
