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

-- One row per series and chunk of 32 intervals (a query of 30 days of
-- hours reads 23 rows): each interval's count, sum, min, max, first and
-- last, the last two with their readings' (ts, seq) so late readings land
-- right. The writer reads, merges and writes back the chunks a
-- compaction touches.
CREATE TABLE rollups (
    every_ms  INTEGER NOT NULL,
    device_id INTEGER NOT NULL,
    sensor_id INTEGER NOT NULL,
    chunk_ms  INTEGER NOT NULL,  -- a multiple of 32 * every_ms
    data      BLOB    NOT NULL,  -- hub/src/store/rollups.rs encode_chunk
    PRIMARY KEY (every_ms, device_id, sensor_id, chunk_ms)
) WITHOUT ROWID;

-- Their retention deletes by age.
CREATE INDEX rollups_age ON rollups (every_ms, chunk_ms);
