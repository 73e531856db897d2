-- Which sensors each device has used. The writer enforces
-- ingest.max_sensors_per_device with it (one device must not fill the
-- shared sensor dictionary), and a device's sensors are one index range.

CREATE TABLE device_sensors (
    device_id INTEGER NOT NULL,
    sensor_id INTEGER NOT NULL,
    PRIMARY KEY (device_id, sensor_id)
) WITHOUT ROWID;

INSERT OR IGNORE INTO device_sensors (device_id, sensor_id)
    SELECT DISTINCT device_id, sensor_id FROM readings;
INSERT OR IGNORE INTO device_sensors (device_id, sensor_id)
    SELECT DISTINCT device_id, sensor_id FROM readings_recent;

-- Before seqs were range-checked, a seq of 2^63 or more could become a
-- device's mark. It was stored negative and read back as 2^64-1, so every
-- later reading counted as a duplicate. Such a mark goes back to the highest
-- seq actually stored for the device.
UPDATE devices SET acked_seq = COALESCE(
    (SELECT max(seq) FROM (
        SELECT max(seq) AS seq FROM readings WHERE readings.device_id = devices.id
        UNION ALL
        SELECT max(seq) AS seq FROM readings_recent WHERE readings_recent.device_id = devices.id)),
    0)
WHERE acked_seq < 0;
