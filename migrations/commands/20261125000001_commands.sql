-- The command log, in its own database file (see ARCHITECTURE.md: command
-- transitions commit in milliseconds even while readings commit in large
-- groups).

CREATE TABLE commands (
    seq           INTEGER PRIMARY KEY,           -- creation order
    command_id    TEXT    NOT NULL UNIQUE,
    device_id     TEXT    NOT NULL,              -- the device's external id
    name          TEXT    NOT NULL,
    params        TEXT    NOT NULL,              -- JSON object
    state         TEXT    NOT NULL,              -- QUEUED, SENT, RECEIVED, SUCCEEDED, ...
    detail        TEXT    NOT NULL DEFAULT '',
    result        TEXT    NOT NULL DEFAULT '',   -- JSON value or ''
    attempts      INTEGER NOT NULL DEFAULT 0,    -- writes to a device stream
    created_at_ms INTEGER NOT NULL,
    updated_at_ms INTEGER NOT NULL,
    expires_at_ms INTEGER NOT NULL
);

CREATE INDEX commands_by_device ON commands (device_id, seq);
CREATE INDEX commands_by_time ON commands (created_at_ms);
CREATE INDEX commands_open ON commands (seq) WHERE state IN ('QUEUED', 'SENT', 'RECEIVED');

CREATE TABLE command_history (
    command_seq INTEGER NOT NULL,
    at_ms       INTEGER NOT NULL,
    state       TEXT    NOT NULL,
    detail      TEXT    NOT NULL DEFAULT ''
);

CREATE INDEX command_history_by_command ON command_history (command_seq);
