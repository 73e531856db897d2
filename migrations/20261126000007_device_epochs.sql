-- Which hub holds a device's stream, and the session epoch that fences the
-- others: every accepted Hello bumps the epoch (issue 12). With several hubs
-- on PostgreSQL a hub commits a device's readings only while the epoch it
-- got at the Hello is still the device's; on SQLite (one hub) the columns
-- are kept the same way, for one schema.
ALTER TABLE devices ADD COLUMN epoch INTEGER NOT NULL DEFAULT 0;
ALTER TABLE devices ADD COLUMN hub TEXT;
