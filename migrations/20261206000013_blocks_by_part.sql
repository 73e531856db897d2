-- The blocks index, keyed by the device's staging part first (issue 22).
--
-- A compaction encodes one staging part (device_id % 8, STAGING_PARTS)
-- into a block per series. Keyed by device alone, each index page held
-- series of every part, so every compaction wrote into every page of the
-- index: at 100k devices, 52 MB of pages (and as much WAL) for a few MB of
-- blocks. Keyed by part first, a compaction's blocks land in one eighth
-- of the index.
--
-- A query that seeks blocks by device must say `device_id % 8 = …` as
-- well (the same expression), or it scans the table; the test
-- store::blocks::tests::queries_by_device_seek_the_part_index checks each.

DROP INDEX blocks_series;
CREATE INDEX blocks_series ON blocks (device_id % 8, device_id, sensor_id, first_ts, last_ts);
