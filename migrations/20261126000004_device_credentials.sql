-- Device credentials (auth.devices = "token"): the SHA-256 of a device's
-- own token (hub devices add / rotate-token), and when an operator removed
-- the device. A removed device is refused, even with a valid fleet token,
-- until it is added again; its readings stay (retention deletes them).

ALTER TABLE devices ADD COLUMN token_sha256 BLOB;
ALTER TABLE devices ADD COLUMN removed_ms INTEGER;
