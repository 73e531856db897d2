-- The blocks index keyed by staging part first (issue 22); see
-- ../20261206000013_blocks_by_part.sql. The month partitions inherit it.
DROP INDEX blocks_series;
CREATE INDEX blocks_series ON blocks ((device_id % 8), device_id, sensor_id, first_ts, last_ts);
