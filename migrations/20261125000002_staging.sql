-- New readings land here first: an append-mostly table whose commits touch
-- few pages, so a commit costs in proportion to its rows. The writer moves
-- them into the clustered `readings` table in large sorted runs
-- (storage.compact_rows). Queries read both.

CREATE TABLE readings_recent (
    device_id INTEGER NOT NULL,
    sensor_id INTEGER NOT NULL,
    ts_ms     INTEGER NOT NULL,
    seq       INTEGER NOT NULL,
    value     REAL    NOT NULL
);

CREATE INDEX readings_recent_key ON readings_recent (device_id, sensor_id, ts_ms, seq);
