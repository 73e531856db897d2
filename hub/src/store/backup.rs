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
    #[error(
        "a backup is named by 1 to 128 characters of A-Z a-z 0-9 . _ - (not starting with a dot), not {0:?}"
    )]
    BadName(String),
    #[error("a backup named {0:?} exists already")]
    Exists(String),
    #[error("cannot create {0}: {1}")]
    CreateDir(PathBuf, std::io::Error),
    #[error("the copy {0} is not a sound database: {1}")]
    Unsound(PathBuf, String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Copies both databases into `root/name` (`hub.db`, `hub-commands.db`)
/// and verifies the copies. The name is a plain file name, so nothing is
/// written outside `root` (`storage.backup_dir`); the directories are made
/// readable by the hub's user only.
pub async fn backup(
    store: &Store,
    commands: &CommandStore,
    root: &Path,
    name: &str,
) -> Result<BackupReport, BackupError> {
    let plain = (1..=128).contains(&name.len())
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if !plain {
        return Err(BackupError::BadName(name.to_owned()));
    }
    if store.backend() != crate::config::Backend::Sqlite {
        return Err(StoreError::NotOnPostgres(
            "hub backup",
            "back the database up with pg_dump (see the README)",
        )
        .into());
    }
    private_dir(root, true)?;
    let dir = root.join(name);
    match private_dir(&dir, false) {
        Err(BackupError::CreateDir(_, e)) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            return Err(BackupError::Exists(name.to_owned()));
        }
        other => other?,
    }
    let readings_path = dir.join("hub.db");
    let commands_path = dir.join("hub-commands.db");
    store.vacuum_into(&readings_path).await?;
    commands.vacuum_into(&commands_path).await?;
    let [devices, readings] = verify(
        &readings_path,
        [
            "SELECT count(*) FROM devices",
            "SELECT (SELECT coalesce(sum(count), 0) FROM blocks) + (SELECT count(*) FROM readings_recent)",
        ],
    )
    .await?;
    let [commands] = verify(&commands_path, ["SELECT count(*) FROM commands"]).await?;
    Ok(BackupReport {
        readings_path,
        commands_path,
        devices,
        readings,
        commands,
    })
}

/// Creates a directory only the hub's user may enter (an existing one is
/// fine when `existing_ok`).
fn private_dir(path: &Path, existing_ok: bool) -> Result<(), BackupError> {
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(existing_ok);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder
        .create(path)
        .map_err(|e| BackupError::CreateDir(path.to_owned(), e))
}

/// Opens a copy read-only, checks it once and runs the counts.
async fn verify<const N: usize>(path: &Path, counts: [&str; N]) -> Result<[u64; N], BackupError> {
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
    let mut found = [0u64; N];
    for (sql, n) in counts.into_iter().zip(&mut found) {
        let count: i64 = sqlx::query_scalar(sql)
            .fetch_one(&mut conn)
            .await
            .map_err(unsound)?;
        *n = count as u64;
    }
    let _ = conn.close().await;
    Ok(found)
}
