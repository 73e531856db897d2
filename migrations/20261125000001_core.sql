-- Devices, the sensor dictionary and readings.
-- Readings are keyed on integers and clustered by (device, sensor, ts) in a
-- WITHOUT ROWID table, so a range scan of one sensor reads adjacent pages.

CREATE TABLE devices (
    id            INTEGER PRIMARY KEY,
    external_id   TEXT    NOT NULL UNIQUE,
    firmware      TEXT    NOT NULL DEFAULT '',
    labels        TEXT    NOT NULL DEFAULT '{}',  -- JSON object
    first_seen_ms INTEGER NOT NULL,
    last_seen_ms  INTEGER NOT NULL,
    acked_seq     INTEGER NOT NULL DEFAULT 0,     -- committed high-water mark
    reading_count INTEGER NOT NULL DEFAULT 0      -- kept up to date by the writer
);

CREATE TABLE sensors (
    id   INTEGER PRIMARY KEY,
    name TEXT    NOT NULL UNIQUE
);

CREATE TABLE readings (
    device_id INTEGER NOT NULL,
    sensor_id INTEGER NOT NULL,
    ts_ms     INTEGER NOT NULL,
    seq       INTEGER NOT NULL,
    value     REAL    NOT NULL,
    PRIMARY KEY (device_id, sensor_id, ts_ms, seq)
) WITHOUT ROWID;
