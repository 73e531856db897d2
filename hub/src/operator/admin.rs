//! What changes the hub itself, for admins at any door: enrolling,
//! re-keying and removing devices (`crate::devices` does the writing), and
//! backups of the SQLite databases.

use std::collections::BTreeMap;
use std::path::PathBuf;

use super::{OpError, Operations};
use crate::devices;
use crate::store::backup::{self, BackupReport};
use crate::store::commands::CommandStore;

/// Where backups go, and the one that may run at a time.
pub struct Backups {
    pub command_store: CommandStore,
    /// `storage.backup_dir`: each backup is a directory below it.
    pub root: PathBuf,
    pub running: tokio::sync::Mutex<()>,
}

impl Operations {
    /// Adds a device (or re-adds a removed one) with labels; its new token,
    /// shown this once. A stream on its old credentials is ended.
    pub async fn add_device(
        &self,
        device_id: &str,
        labels: BTreeMap<String, String>,
    ) -> Result<String, OpError> {
        Ok(devices::add(&self.ingest, &self.registry, device_id, labels).await?)
    }

    /// A new token for a device; the old one stops working at once.
    pub async fn rotate_device_token(&self, device_id: &str) -> Result<String, OpError> {
        Ok(devices::rotate_token(&self.ingest, &self.registry, device_id).await?)
    }

    /// Removes a device; whether it had a live stream (now ended).
    pub async fn remove_device(&self, device_id: &str) -> Result<bool, OpError> {
        Ok(devices::remove(&self.ingest, &self.registry, device_id).await?)
    }

    /// Pins a device to one client certificate (`sha256`: 64 hex digits of
    /// the SHA-256 of its DER), or unpins it (None).
    pub async fn pin_device_certificate(
        &self,
        device_id: &str,
        sha256: Option<&str>,
    ) -> Result<(), OpError> {
        let sha256 = sha256.map(parse_sha256).transpose()?;
        Ok(devices::pin_certificate(&self.ingest, &self.registry, device_id, sha256).await?)
    }

    /// Refuses a client certificate from now on (`sha256`: 64 hex digits);
    /// whether it was newly revoked, and the live streams on it ended.
    pub async fn revoke_certificate(&self, sha256: &str) -> Result<(bool, u32), OpError> {
        let sha256 = parse_sha256(sha256)?;
        Ok(devices::revoke_certificate(&self.ingest, &self.registry, sha256).await?)
    }

    /// A consistent copy of both databases into backup `name`; one at a
    /// time (FAILED_PRECONDITION while another runs).
    pub async fn backup(&self, name: &str) -> Result<BackupReport, OpError> {
        let Ok(_one_at_a_time) = self.backups.running.try_lock() else {
            return Err(OpError::Precondition("a backup is running already".into()));
        };
        Ok(backup::backup(
            &self.store,
            &self.backups.command_store,
            &self.backups.root,
            name,
        )
        .await?)
    }
}

/// A certificate's SHA-256 as 64 hex digits (upper or lower case; `:`
/// between bytes, as openssl prints fingerprints, is allowed).
pub fn parse_sha256(raw: &str) -> Result<[u8; 32], OpError> {
    let digits: String = raw.chars().filter(|c| *c != ':').collect();
    hex::decode(&digits)
        .ok()
        .and_then(|bytes| <[u8; 32]>::try_from(bytes).ok())
        .ok_or_else(|| {
            OpError::Invalid(format!(
                "a certificate's SHA-256 is 64 hex digits, not {:?}",
                crate::domain::shown(raw)
            ))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprints_as_people_paste_them() {
        let hex = "ab".repeat(32);
        assert_eq!(parse_sha256(&hex).unwrap(), [0xab; 32]);
        let openssl = vec!["AB"; 32].join(":");
        assert_eq!(parse_sha256(&openssl).unwrap(), [0xab; 32]);
        assert!(parse_sha256("abc").is_err());
        assert!(parse_sha256(&"ab".repeat(31)).is_err());
    }
}
