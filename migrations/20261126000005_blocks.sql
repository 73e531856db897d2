-- Compressed series. Compaction encodes staged readings into blocks: one
-- (device, sensor) series' readings of a stretch of time, sorted by
-- (ts, seq), a few bits each (hub/src/store/codec.rs). Blocks of the same
-- level of a series are merged FANIN at a time into one of the next level
-- (hub/src/store/blocks.rs), so a reading is rewritten a few times at most
-- and a long-lived series ends in large sealed blocks.
--
-- A plain rowid table: a compaction's new blocks are appended at the end,
-- and the index on (device, sensor, first_ts) finds a series' blocks in
-- time order. The hub converts what the old clustered `readings` table
-- holds into blocks at start-up (store::blocks::convert_legacy) and then
-- drops it.

CREATE TABLE blocks (
    id        INTEGER PRIMARY KEY AUTOINCREMENT,  -- never reused: queries page by id
    device_id INTEGER NOT NULL,
    sensor_id INTEGER NOT NULL,
    level     INTEGER NOT NULL,
    first_ts  INTEGER NOT NULL,  -- the earliest reading's ts_ms
    last_ts   INTEGER NOT NULL,  -- the latest reading's ts_ms
    count     INTEGER NOT NULL,
    data      BLOB    NOT NULL
);

CREATE INDEX blocks_series ON blocks (device_id, sensor_id, first_ts, last_ts);
