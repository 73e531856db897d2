-- Retention appends what it deletes to the progress log as a row adding
-- -n readings (issue 22): it no longer folds the logs first, an update in
-- place that, at the database's size limit, could find no page before
-- retention's deletes freed any. A count is floored at 0, as the update in
-- place floored it, in this view as in the fold.
DROP VIEW device_progress;
CREATE VIEW device_progress AS
    SELECT d.id AS id,
           max(d.acked_seq, COALESCE(p.acked_seq, 0)) AS acked_seq,
           max(0, d.reading_count + COALESCE(p.added, 0)) AS reading_count,
           max(d.last_seen_ms, COALESCE(p.seen_ms, 0)) AS last_seen_ms,
           COALESCE(p.reading_ms, d.last_reading_ms) AS last_reading_ms
    FROM devices d LEFT JOIN progress_pending p ON p.device_id = d.id;
