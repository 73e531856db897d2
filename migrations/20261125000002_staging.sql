-- New readings land here first: a plain append-only table, so a commit
-- costs in proportion to its rows instead of dirtying a leaf page of the
-- clustered table per active (device, sensor). The writer moves them into
-- `readings` in large sorted runs (storage.compact_rows), which keeps this
-- table small; queries scan it once and merge.

CREATE TABLE readings_recent (
    device_id INTEGER NOT NULL,
    sensor_id INTEGER NOT NULL,
    ts_ms     INTEGER NOT NULL,
    seq       INTEGER NOT NULL,
    value     REAL    NOT NULL
);
