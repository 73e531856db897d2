-- The device twin (issue 20); see ../20261205000009_twins.sql. Documents are
-- jsonb here, so fleet filters read paths without parsing text per row.
ALTER TABLE devices RENAME COLUMN labels TO tags;

CREATE TABLE twins (
    device_id        BIGINT  PRIMARY KEY,          -- devices.id
    desired          JSONB   NOT NULL DEFAULT '{}',
    desired_meta     JSONB   NOT NULL DEFAULT '{}',
    desired_version  BIGINT  NOT NULL DEFAULT 0,
    reported         JSONB   NOT NULL DEFAULT '{}',
    reported_meta    JSONB   NOT NULL DEFAULT '{}',
    reported_version BIGINT  NOT NULL DEFAULT 0,
    reported_seq     BIGINT  NOT NULL DEFAULT 0,
    in_sync          BIGINT  NOT NULL DEFAULT 1
);

CREATE INDEX twins_out_of_sync ON twins (device_id) WHERE in_sync = 0;
