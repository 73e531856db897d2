-- Which hub holds a device's stream, the session epoch that fences the
-- others (every accepted Hello bumps it), and since when the device is
-- connected there; the hubs and their heartbeats (issue 12). These matter
-- with several hubs on one PostgreSQL database: a device is online while
-- online_since_ms is set and its hub's heartbeat is fresh. On SQLite (one
-- hub) the same schema is kept and the hub's own sessions say who is online.
ALTER TABLE devices ADD COLUMN epoch INTEGER NOT NULL DEFAULT 0;
ALTER TABLE devices ADD COLUMN hub TEXT;
ALTER TABLE devices ADD COLUMN online_since_ms INTEGER;

CREATE TABLE hubs (
    id           TEXT    PRIMARY KEY,
    started_ms   INTEGER NOT NULL,
    heartbeat_ms INTEGER NOT NULL
);
