-- Rollups (issue 22): count, sum, min, max, first and last of each series
-- per fixed interval (storage.rollups), so long ranges are answered without
-- decoding blocks, and shapes outlive raw retention.
--
-- rollup_defs: the intervals this database keeps (hubs make it match
-- storage.rollups at start). A new one is built from the stored blocks a
-- few series at a time (next_device, next_sensor: the build's place) and
-- used by queries once `ready`; from its creation on, every reading that
-- leaves staging (compaction, or retention deleting it) is added to it in
-- the same transaction.
CREATE TABLE rollup_defs (
    every_ms    INTEGER PRIMARY KEY,
    keep_ms     INTEGER NOT NULL,           -- rows older than this are deleted (0: kept)
    ready       INTEGER NOT NULL DEFAULT 0,
    next_device INTEGER NOT NULL DEFAULT -1,
    next_sensor INTEGER NOT NULL DEFAULT -1,
    pruned_before INTEGER NOT NULL DEFAULT 0   -- rows starting before this may be gone (ingest takes no reading before 2000)
);

-- One row per (interval, series, start): start_ms is a multiple of
-- every_ms. first/last are the values of the readings with the least and
-- greatest (ts, seq), kept with those keys so late readings land right.
CREATE TABLE rollups (
    every_ms  INTEGER NOT NULL,
    device_id INTEGER NOT NULL,
    sensor_id INTEGER NOT NULL,
    start_ms  INTEGER NOT NULL,
    n         INTEGER NOT NULL,
    sum_v     REAL,                        -- NULL: NaN (+inf and -inf summed; SQLite keeps no NaN)
    min_v     REAL    NOT NULL,
    max_v     REAL    NOT NULL,
    first_v   REAL    NOT NULL,
    last_v    REAL    NOT NULL,
    first_ts  INTEGER NOT NULL,
    first_seq INTEGER NOT NULL,
    last_ts   INTEGER NOT NULL,
    last_seq  INTEGER NOT NULL,
    PRIMARY KEY (every_ms, device_id, sensor_id, start_ms)
) WITHOUT ROWID;

-- Their retention deletes by age.
CREATE INDEX rollups_age ON rollups (every_ms, start_ms);
