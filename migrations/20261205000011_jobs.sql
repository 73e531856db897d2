-- Jobs (issue 21): a desired-state patch or a command rolled out to the
-- devices a selector matched when the job was created, at a rate, with a
-- concurrency limit and abort thresholds. Written by the ingest writer;
-- driven by one hub (jobs::runner; on PostgreSQL the holder of the `jobs`
-- lease), which resumes from these rows after a restart.
CREATE TABLE jobs (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    name        TEXT    NOT NULL,
    spec        TEXT    NOT NULL,   -- jobs::JobSpec as JSON
    state       TEXT    NOT NULL,   -- in_progress | paused | succeeded | failed | aborted | cancelled
    reason      TEXT,
    total       INTEGER NOT NULL,
    created_ms  INTEGER NOT NULL,
    updated_ms  INTEGER NOT NULL,
    finished_ms INTEGER
);
CREATE INDEX jobs_active ON jobs (id) WHERE state IN ('in_progress', 'paused');

-- One row per targeted device, in rollout order (position).
CREATE TABLE job_devices (
    job_id          INTEGER NOT NULL,
    device          TEXT    NOT NULL,
    position        INTEGER NOT NULL,
    state           TEXT    NOT NULL,   -- pending | in_progress | succeeded | failed | timed_out | cancelled
    started_ms      INTEGER,
    finished_ms     INTEGER,
    command_id      TEXT,               -- what was sent: the command...
    desired_version INTEGER,            -- ...or the desired version it made
    detail          TEXT,
    PRIMARY KEY (job_id, device)
);
CREATE INDEX job_devices_state ON job_devices (job_id, state, position);
