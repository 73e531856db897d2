-- Staging split by device: readings_recent_{device_id mod 8} (the
-- non-negative remainder, as the hub's staging_part computes it). Compaction
-- encodes and truncates one part at a time (store::STAGING_PARTS), so each
-- compaction is an eighth of a pause between group commits rather than one
-- long stall of every ack. What was staged moves to its part; the view
-- `readings_recent` shows all parts, for reading and for tools.
CREATE TABLE readings_recent_0 (
    device_id INTEGER NOT NULL,
    sensor_id INTEGER NOT NULL,
    ts_ms     INTEGER NOT NULL,
    seq       INTEGER NOT NULL,
    value     REAL    NOT NULL
);
CREATE TABLE readings_recent_1 (
    device_id INTEGER NOT NULL,
    sensor_id INTEGER NOT NULL,
    ts_ms     INTEGER NOT NULL,
    seq       INTEGER NOT NULL,
    value     REAL    NOT NULL
);
CREATE TABLE readings_recent_2 (
    device_id INTEGER NOT NULL,
    sensor_id INTEGER NOT NULL,
    ts_ms     INTEGER NOT NULL,
    seq       INTEGER NOT NULL,
    value     REAL    NOT NULL
);
CREATE TABLE readings_recent_3 (
    device_id INTEGER NOT NULL,
    sensor_id INTEGER NOT NULL,
    ts_ms     INTEGER NOT NULL,
    seq       INTEGER NOT NULL,
    value     REAL    NOT NULL
);
CREATE TABLE readings_recent_4 (
    device_id INTEGER NOT NULL,
    sensor_id INTEGER NOT NULL,
    ts_ms     INTEGER NOT NULL,
    seq       INTEGER NOT NULL,
    value     REAL    NOT NULL
);
CREATE TABLE readings_recent_5 (
    device_id INTEGER NOT NULL,
    sensor_id INTEGER NOT NULL,
    ts_ms     INTEGER NOT NULL,
    seq       INTEGER NOT NULL,
    value     REAL    NOT NULL
);
CREATE TABLE readings_recent_6 (
    device_id INTEGER NOT NULL,
    sensor_id INTEGER NOT NULL,
    ts_ms     INTEGER NOT NULL,
    seq       INTEGER NOT NULL,
    value     REAL    NOT NULL
);
CREATE TABLE readings_recent_7 (
    device_id INTEGER NOT NULL,
    sensor_id INTEGER NOT NULL,
    ts_ms     INTEGER NOT NULL,
    seq       INTEGER NOT NULL,
    value     REAL    NOT NULL
);
INSERT INTO readings_recent_0 (device_id, sensor_id, ts_ms, seq, value)
    SELECT device_id, sensor_id, ts_ms, seq, value FROM readings_recent WHERE ((device_id % 8) + 8) % 8 = 0 ORDER BY rowid;
INSERT INTO readings_recent_1 (device_id, sensor_id, ts_ms, seq, value)
    SELECT device_id, sensor_id, ts_ms, seq, value FROM readings_recent WHERE ((device_id % 8) + 8) % 8 = 1 ORDER BY rowid;
INSERT INTO readings_recent_2 (device_id, sensor_id, ts_ms, seq, value)
    SELECT device_id, sensor_id, ts_ms, seq, value FROM readings_recent WHERE ((device_id % 8) + 8) % 8 = 2 ORDER BY rowid;
INSERT INTO readings_recent_3 (device_id, sensor_id, ts_ms, seq, value)
    SELECT device_id, sensor_id, ts_ms, seq, value FROM readings_recent WHERE ((device_id % 8) + 8) % 8 = 3 ORDER BY rowid;
INSERT INTO readings_recent_4 (device_id, sensor_id, ts_ms, seq, value)
    SELECT device_id, sensor_id, ts_ms, seq, value FROM readings_recent WHERE ((device_id % 8) + 8) % 8 = 4 ORDER BY rowid;
INSERT INTO readings_recent_5 (device_id, sensor_id, ts_ms, seq, value)
    SELECT device_id, sensor_id, ts_ms, seq, value FROM readings_recent WHERE ((device_id % 8) + 8) % 8 = 5 ORDER BY rowid;
INSERT INTO readings_recent_6 (device_id, sensor_id, ts_ms, seq, value)
    SELECT device_id, sensor_id, ts_ms, seq, value FROM readings_recent WHERE ((device_id % 8) + 8) % 8 = 6 ORDER BY rowid;
INSERT INTO readings_recent_7 (device_id, sensor_id, ts_ms, seq, value)
    SELECT device_id, sensor_id, ts_ms, seq, value FROM readings_recent WHERE ((device_id % 8) + 8) % 8 = 7 ORDER BY rowid;

DROP TABLE readings_recent;

CREATE VIEW readings_recent AS
    SELECT device_id, sensor_id, ts_ms, seq, value FROM readings_recent_0
    UNION ALL
    SELECT device_id, sensor_id, ts_ms, seq, value FROM readings_recent_1
    UNION ALL
    SELECT device_id, sensor_id, ts_ms, seq, value FROM readings_recent_2
    UNION ALL
    SELECT device_id, sensor_id, ts_ms, seq, value FROM readings_recent_3
    UNION ALL
    SELECT device_id, sensor_id, ts_ms, seq, value FROM readings_recent_4
    UNION ALL
    SELECT device_id, sensor_id, ts_ms, seq, value FROM readings_recent_5
    UNION ALL
    SELECT device_id, sensor_id, ts_ms, seq, value FROM readings_recent_6
    UNION ALL
    SELECT device_id, sensor_id, ts_ms, seq, value FROM readings_recent_7;
