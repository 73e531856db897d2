-- Rollups (issue 22); see ../20261205000012_rollups.sql.
CREATE TABLE rollup_defs (
    every_ms    BIGINT PRIMARY KEY,
    keep_ms     BIGINT NOT NULL,
    ready       BIGINT NOT NULL DEFAULT 0,
    next_device BIGINT NOT NULL DEFAULT -1,
    next_sensor BIGINT NOT NULL DEFAULT -1,
    pruned_before BIGINT NOT NULL DEFAULT 0
);

CREATE TABLE rollups (
    every_ms  BIGINT NOT NULL,
    device_id BIGINT NOT NULL,
    sensor_id BIGINT NOT NULL,
    chunk_ms  BIGINT NOT NULL,
    data      BYTEA  NOT NULL,
    PRIMARY KEY (every_ms, device_id, sensor_id, chunk_ms)
);

CREATE INDEX rollups_age ON rollups (every_ms, chunk_ms);
