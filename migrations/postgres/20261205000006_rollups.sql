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
    start_ms  BIGINT NOT NULL,
    n         BIGINT NOT NULL,
    sum_v     DOUBLE PRECISION,
    min_v     DOUBLE PRECISION NOT NULL,
    max_v     DOUBLE PRECISION NOT NULL,
    first_v   DOUBLE PRECISION NOT NULL,
    last_v    DOUBLE PRECISION NOT NULL,
    first_ts  BIGINT NOT NULL,
    first_seq BIGINT NOT NULL,
    last_ts   BIGINT NOT NULL,
    last_seq  BIGINT NOT NULL,
    PRIMARY KEY (every_ms, device_id, sensor_id, start_ms)
);

CREATE INDEX rollups_age ON rollups (every_ms, start_ms);
