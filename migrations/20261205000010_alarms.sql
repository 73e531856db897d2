-- Alarms (issue 21): rules, the alarms they raise, each series' evaluation
-- state, and the notifications owed to webhooks. Everything here is
-- written by the ingest writer, in the same commit as the readings that
-- caused it, so an alarm never comes from a reading that was not stored
-- and a stored reading is never left unevaluated.

-- When the hub last stored a reading of the device / of one of its sensors
-- (the hub's clock, ms): inactivity rules read these. The per-sensor one
-- is written at most every few seconds per sensor.
ALTER TABLE devices ADD COLUMN last_reading_ms INTEGER;
ALTER TABLE device_sensors ADD COLUMN last_reading_ms INTEGER;
UPDATE devices SET last_reading_ms = last_seen_ms WHERE reading_count > 0;

-- Rules: one row per rule, its definition as JSON (alarms::RuleSpec). A
-- change bumps version; a deleted rule keeps its row (deleted_ms) so old
-- alarms still name it.
CREATE TABLE alarm_rules (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    name       TEXT    NOT NULL,
    version    INTEGER NOT NULL,
    spec       TEXT    NOT NULL,
    created_ms INTEGER NOT NULL,
    updated_ms INTEGER NOT NULL,
    deleted_ms INTEGER
);
CREATE UNIQUE INDEX alarm_rules_name ON alarm_rules (name) WHERE deleted_ms IS NULL;

-- Alarms. At most one open (not cleared) alarm per (rule, device, sensor);
-- sensor is '' for a device-wide inactivity rule.
CREATE TABLE alarms (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    rule_id       INTEGER NOT NULL,
    rule_version  INTEGER NOT NULL,
    rule_name     TEXT    NOT NULL,
    severity      TEXT    NOT NULL,
    device_id     INTEGER NOT NULL,
    device        TEXT    NOT NULL,   -- its external id
    sensor        TEXT    NOT NULL,
    state         TEXT    NOT NULL,   -- active | acknowledged | cleared
    value         REAL,               -- the value that raised it
    last_value    REAL,
    started_ms    INTEGER NOT NULL,   -- when the condition began to hold
    raised_ms     INTEGER NOT NULL,
    changed_ms    INTEGER NOT NULL,
    count         INTEGER NOT NULL,   -- 1 + re-triggers
    acked_ms      INTEGER,
    acked_by      TEXT,
    ack_note      TEXT,
    cleared_ms    INTEGER,
    cleared_by    TEXT,               -- 'rule' or an operator
    clear_note    TEXT
);
CREATE UNIQUE INDEX alarms_open ON alarms (rule_id, device_id, sensor) WHERE state <> 'cleared';
CREATE INDEX alarms_device ON alarms (device_id, id);
CREATE INDEX alarms_cleared ON alarms (cleared_ms) WHERE cleared_ms IS NOT NULL;

-- A series' evaluation state per rule (alarms::engine::SeriesState as
-- JSON), kept only while it is not idle: a condition is pending, an alarm
-- is open, or a rate rule holds samples.
CREATE TABLE alarm_series (
    rule_id   INTEGER NOT NULL,
    device_id INTEGER NOT NULL,
    sensor_id INTEGER NOT NULL,
    state     TEXT    NOT NULL,
    PRIMARY KEY (device_id, rule_id, sensor_id)
) WITHOUT ROWID;

-- Every change of an alarm, in commit order: its history and what is
-- notified (id is the notification id receivers dedupe by).
CREATE TABLE alarm_events (
    id       INTEGER PRIMARY KEY AUTOINCREMENT,
    alarm_id INTEGER NOT NULL,
    kind     TEXT    NOT NULL,   -- raised | retriggered | acknowledged | cleared
    at_ms    INTEGER NOT NULL,
    body     TEXT    NOT NULL    -- the notification's JSON
);
CREATE INDEX alarm_events_alarm ON alarm_events (alarm_id, id);

-- The outbox: one row per (event, webhook), written with the event, sent
-- until delivered or given up. Its rows are the webhook's delivery log.
CREATE TABLE webhook_deliveries (
    event_id     INTEGER NOT NULL,
    webhook      TEXT    NOT NULL,
    attempts     INTEGER NOT NULL DEFAULT 0,
    next_ms      INTEGER NOT NULL,
    created_ms   INTEGER NOT NULL,
    delivered_ms INTEGER,
    failed_ms    INTEGER,            -- given up (webhook max_age)
    last_status  INTEGER,
    last_error   TEXT,
    PRIMARY KEY (event_id, webhook)
);
CREATE INDEX webhook_deliveries_due ON webhook_deliveries (next_ms)
    WHERE delivered_ms IS NULL AND failed_ms IS NULL;
CREATE INDEX webhook_deliveries_log ON webhook_deliveries (webhook, event_id);
