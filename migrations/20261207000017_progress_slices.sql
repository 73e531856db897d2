-- The progress logs go from 8 slices to 32 (issue 22; `store::write::
-- LOG_SLICES`): a device's marks move from slice (id >> 12) % 8 to
-- (id >> 12) % 32, and a reader of one device's marks seeks its slice
-- alone. What the logs hold under the old numbering (a hub killed mid-run;
-- a clean stop or start folds them) is renumbered here, before any reader
-- looks: each row's marks are split by their devices' new slices, under
-- the row's own n (rows of two old slices never share a new one, so the
-- keys stay unique). Renumbered rather than folded into the tables: a
-- fold grows `devices` rows in place, which fails at the database's size
-- limit, and a migration that fails keeps the hub from starting (the
-- writer's own fold is allowed to fail and try again). Rows that are not
-- arrays of marks with an integer device id are left as they are: the
-- writer's fold reads them, or drops text that is not JSON.
CREATE TEMP TABLE progress_renumbered AS
    SELECT (CAST(m.value ->> 0 AS INTEGER) >> 12) % 32 AS slice, l.n AS n, l.slice AS old,
           l.seen_ms AS seen_ms, json_group_array(json(m.value)) AS marks
    FROM progress_log l, json_each(l.marks) m
    WHERE json_valid(l.marks) AND json_type(l.marks) = 'array'
      AND NOT EXISTS (SELECT 1 FROM json_each(l.marks) e
                      WHERE json_type(e.value, '$[0]') IS NOT 'integer')
    GROUP BY l.slice, l.n, 1;
CREATE TEMP TABLE sensor_seen_renumbered AS
    SELECT (CAST(m.value ->> 0 AS INTEGER) >> 12) % 32 AS slice, l.n AS n, l.slice AS old,
           l.seen_ms AS seen_ms, json_group_array(json(m.value)) AS marks
    FROM sensor_seen_log l, json_each(l.marks) m
    WHERE json_valid(l.marks) AND json_type(l.marks) = 'array'
      AND NOT EXISTS (SELECT 1 FROM json_each(l.marks) e
                      WHERE json_type(e.value, '$[0]') IS NOT 'integer')
    GROUP BY l.slice, l.n, 1;
DELETE FROM progress_log
    WHERE (slice, n) IN (SELECT old, n FROM temp.progress_renumbered);
DELETE FROM sensor_seen_log
    WHERE (slice, n) IN (SELECT old, n FROM temp.sensor_seen_renumbered);
INSERT INTO progress_log (slice, n, seen_ms, marks)
    SELECT slice, n, seen_ms, marks FROM temp.progress_renumbered;
INSERT INTO sensor_seen_log (slice, n, seen_ms, marks)
    SELECT slice, n, seen_ms, marks FROM temp.sensor_seen_renumbered;
DROP TABLE temp.progress_renumbered;
DROP TABLE temp.sensor_seen_renumbered;
