-- Device certificates (auth.devices = "tls"): a device may be pinned to the
-- SHA-256 of one certificate (DER), and revoked certificates are refused
-- whichever device they name, across removing and re-adding it.
ALTER TABLE devices ADD COLUMN cert_sha256 BLOB;

CREATE TABLE revoked_certs (
    sha256     BLOB    PRIMARY KEY,
    revoked_ms INTEGER NOT NULL
);
