//! Online backup: `VACUUM INTO` copies a database as of one read
//! transaction (consistent, while the writer goes on committing), then the
//! copy is opened and counted, which proves it is readable.

use std::path::{Path, PathBuf};

use sqlx::sqlite::SqliteConnectOptions;
use sqlx::{ConnectOptions, Connection};

use super::commands::CommandStore;
use super::{Store, StoreError};

/// What a verified backup holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackupReport {
    pub readings_path: PathBuf,
    pub commands_path: PathBuf,
    pub devices: u64,
    pub readings: u64,
    pub commands: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error("{0} exists already; back up into a new directory")]
    Exists(PathBuf),
    #[error("cannot create {0}: {1}")]
    CreateDir(PathBuf, std::io::Error),
    #[error("the copy {0} is not a sound database: {1}")]
    Unsound(PathBuf, String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Copies both databases into `dir` (`hub.db`, `hub-commands.db`) and
/// verifies the copies.
pub async fn backup(
    store: &Store,
    commands: &CommandStore,
    dir: &Path,
) -> Result<BackupReport, BackupError> {
    std::fs::create_dir_all(dir).map_err(|e| BackupError::CreateDir(dir.to_owned(), e))?;
    let readings_path = dir.join("hub.db");
    let commands_path = dir.join("hub-commands.db");
    for path in [&readings_path, &commands_path] {
        if path.exists() {
            return Err(BackupError::Exists(path.clone()));
        }
    }
    store.vacuum_into(&readings_path).await?;
    commands.vacuum_into(&commands_path).await?;
    let devices = count(&readings_path, "SELECT count(*) FROM devices").await?;
    let readings = count(
        &readings_path,
        "SELECT (SELECT count(*) FROM readings) + (SELECT count(*) FROM readings_recent)",
    )
    .await?;
    let commands = count(&commands_path, "SELECT count(*) FROM commands").await?;
    Ok(BackupReport {
        readings_path,
        commands_path,
        devices,
        readings,
        commands,
    })
}

/// Opens a copy read-only, checks it and runs one count.
async fn count(path: &Path, sql: &str) -> Result<u64, BackupError> {
    let unsound = |e: sqlx::Error| BackupError::Unsound(path.to_owned(), e.to_string());
    let mut conn = SqliteConnectOptions::new()
        .filename(path)
        .read_only(true)
        .connect()
        .await
        .map_err(unsound)?;
    let check: String = sqlx::query_scalar("PRAGMA quick_check")
        .fetch_one(&mut conn)
        .await
        .map_err(unsound)?;
    if check != "ok" {
        return Err(BackupError::Unsound(path.to_owned(), check));
    }
    let n: i64 = sqlx::query_scalar(sql)
        .fetch_one(&mut conn)
        .await
        .map_err(unsound)?;
    let _ = conn.close().await;
    Ok(n as u64)
}
