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
