//! Storage through sqlx, on SQLite (embedded, the default) or PostgreSQL
//! (`storage.backend`; see [`db`]). Returns domain types; its own error
//! type.
//!
//! There is one writer connection ([`StoreWriter`], owned by the ingest
//! writer task) and a small pool of reader connections ([`Store`]) for
//! queries. On SQLite, WAL mode lets readers run beside the writer.

/// A struct read from a query's row by column name, on either backend:
/// what `#[derive(sqlx::FromRow)]` gives, without sqlx's proc macros
/// (see [`migrations`] for why).
macro_rules! row_struct {
    (
        $(#[$meta:meta])*
        $vis:vis struct $name:ident {
            $($(#[$field_meta:meta])* $field_vis:vis $field:ident : $ty:ty),* $(,)?
        }
    ) => {
        $(#[$meta])*
        $vis struct $name {
            $($(#[$field_meta])* $field_vis $field: $ty),*
        }

        impl<'r, R: sqlx::Row> sqlx::FromRow<'r, R> for $name
        where
            &'static str: sqlx::ColumnIndex<R>,
            $($ty: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>),*
        {
            fn from_row(row: &'r R) -> Result<Self, sqlx::Error> {
                Ok(Self { $($field: row.try_get(stringify!($field))?),* })
            }
        }
    };
}

pub mod alarms;
pub mod backup;
pub mod blocks;
pub mod codec;
pub mod commands;
pub mod credentials;
mod db;
pub mod jobs;
pub mod migrations;
mod partitions;
mod pg_copy;
pub mod rollups;
pub mod snapshot;
pub mod twins;
mod write;
mod write_conn;

pub use partitions::month_of;
pub use twins::{TWINS_CHANNEL, TwinNotice};

use std::path::Path;
use std::str::FromStr;

use sqlx::ConnectOptions;
use sqlx::sqlite::{
    SqliteAutoVacuum, SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqliteSynchronous,
};

use self::db::{Connector, Pool, with_pool};
use self::migrations::Schema;
use crate::config::{Backend, StorageSettings, Synchronous};
use crate::domain::{DeviceKey, DeviceRecord, SensorKey};

pub use write::{
    CLAIMS_CHANNEL, CREDENTIALS_CHANGED, Claim, DeviceProgress, LOG_SLICES, REVOKED, Registration,
    RowToInsert, STAGING_PARTS, StoreWriter, WriteTx, log_slice, staging_part,
};
pub(crate) use write_conn::WriteConn;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database error: {0}")]
    Sqlx(#[from] sqlx::Error),
    #[error("migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("cannot create the database directory {path}: {source}")]
    CreateDir {
        path: String,
        source: std::io::Error,
    },
    #[error("cannot prepare the database file {path}: {source}")]
    File {
        path: String,
        source: std::io::Error,
    },
    #[error(
        "another hub process is serving the database {path} (its lock file is held); \
         stop it first: two processes on one SQLite file would store readings twice"
    )]
    InUse { path: String },
    #[error(
        "{staged} new readings wait for a compaction that keeps failing; refusing more until it succeeds"
    )]
    StagingFull { staged: u64 },
    #[error("a staging table holds {found} readings where the writer counted {expected}")]
    StagingChanged { expected: u64, found: u64 },
    #[error("{found} of the {expected} blocks read to be replaced were still there")]
    BlocksChanged { expected: u64, found: u64 },
    #[error("a stored block cannot be decoded: {0}")]
    Corrupt(#[from] codec::CodecError),
    #[error("{0} is not possible on PostgreSQL: {1}")]
    NotOnPostgres(&'static str, &'static str),
    /// The failure of a statement that answered several callers at once.
    #[error(transparent)]
    Shared(std::sync::Arc<StoreError>),
}

impl StoreError {
    /// PostgreSQL gave the transaction up for a conflict with another
    /// one (a deadlock, 40P01, or a serialization failure, 40001): it was
    /// rolled back and may simply be run again.
    pub fn is_conflict(&self) -> bool {
        match self {
            StoreError::Sqlx(sqlx::Error::Database(e)) => {
                matches!(e.code().as_deref(), Some("40P01" | "40001"))
            }
            _ => false,
        }
    }
}

/// Read side of the store: cheap to clone.
#[derive(Clone)]
pub struct Store {
    read: Pool,
}

/// Opens (creating if needed) the database, applies migrations and returns
/// the read pool and the single writer connection.
pub async fn open(settings: &StorageSettings) -> Result<(Store, StoreWriter), StoreError> {
    let mut lock = None;
    let (writer, read) = match settings.backend {
        Backend::Sqlite => {
            let options = connect_options(&settings.path, settings)?;
            lock = Some(lock_database(&settings.path)?);
            if is_empty_file(&settings.path) {
                create_database(&options).await?;
            }
            let page_size = page_size_of(&settings.path);
            let writer = Connector::Sqlite(with_size_limit(
                options.clone(),
                settings.max_size_mib,
                page_size,
            ));
            (writer, Connector::Sqlite(options))
        }
        Backend::Postgres => {
            let options = Connector::Postgres(db::postgres_options(settings.url.as_str())?);
            (options.clone(), options)
        }
    };
    let mut writer = WriteConn::open(writer).await?;
    migrate(writer.conn()).await?;
    let mut writer = StoreWriter::new(writer, lock);
    // What a hub killed mid-run left in the progress logs: the tables are
    // whole again before the ingest writer reads them. A fold that fails
    // (a database at its size limit) is left to the writer's first group.
    match writer.fold_progress(None).await {
        Ok(0) => {}
        Ok(folded) => tracing::info!(folded, "progress marks left in the logs folded in"),
        Err(e) => {
            writer.abort().await;
            tracing::warn!(error = %e, "could not fold the progress logs in at start; the first commit does");
        }
    }
    writer.number_log_rows().await?;
    let converted = writer.convert_legacy().await?;
    if converted > 0 {
        tracing::info!(
            converted,
            "stored readings converted into compressed blocks"
        );
    }
    writer.sync_rollups(&settings.rollups).await?;
    let read = read.pool(settings.read_connections).await?;
    Ok((Store { read }, writer))
}

/// PostgreSQL: a second writer connection, for the ingest writer's block
/// work beside its group commits (`ingest::sidecar`); None on SQLite,
/// where one connection writes. Open after [`open`] (the schema is made).
pub async fn open_sidecar(settings: &StorageSettings) -> Result<Option<StoreWriter>, StoreError> {
    match settings.backend {
        Backend::Sqlite => Ok(None),
        Backend::Postgres => {
            let options = Connector::Postgres(db::postgres_options(settings.url.as_str())?);
            let conn = WriteConn::open(options).await?;
            Ok(Some(StoreWriter::new(conn, None)))
        }
    }
}

/// Brings the readings database's schema (on PostgreSQL, the one database's)
/// up to date. sqlx holds an advisory lock on PostgreSQL while it migrates,
/// so hubs starting together do not race.
async fn migrate(conn: &mut db::Conn) -> Result<(), StoreError> {
    match conn {
        db::Conn::Sqlite(c) => Schema::Sqlite.migrator().await?.run(c).await?,
        db::Conn::Postgres(c) => Schema::Postgres.migrator().await?.run(c).await?,
    }
    Ok(())
}

/// `VACUUM INTO` on a connection of its own, so a long copy does not hold
/// one of the pool's (queries and Hellos read through them). SQLite only:
/// a PostgreSQL database is backed up with pg_dump.
pub(crate) async fn vacuum_into(pool: &Pool, path: &Path) -> Result<(), StoreError> {
    let Pool::Sqlite(pool) = pool else {
        return Err(StoreError::NotOnPostgres(
            "hub backup",
            "back the database up with pg_dump (see the README)",
        ));
    };
    sqlite_vacuum_into(pool, path).await
}

async fn sqlite_vacuum_into(pool: &SqlitePool, path: &Path) -> Result<(), StoreError> {
    let mut conn = pool.connect_options().connect().await?;
    sqlx::query("VACUUM INTO ?")
        .bind(path.to_string_lossy().into_owned())
        .execute(&mut conn)
        .await?;
    let _ = sqlx::Connection::close(conn).await;
    Ok(())
}

/// `storage.max_size_mib` as SQLite's page limit on the writer's connection:
/// past it, a commit fails with SQLITE_FULL as on a full disk.
fn with_size_limit(
    options: SqliteConnectOptions,
    max_size_mib: u64,
    page_size: u64,
) -> SqliteConnectOptions {
    if max_size_mib == 0 {
        return options;
    }
    let pages = max_size_mib.saturating_mul(1024 * 1024) / page_size.max(512);
    options.pragma("max_page_count", pages.max(1).to_string())
}

/// The page size of new databases. Blocks are rows of up to a few KiB:
/// 16 KiB pages hold them with little slack, where 4 KiB pages (SQLite's
/// default, and this hub's before issue 22) left a quarter of the pages of
/// full-precision data unused. A database keeps the page size it was made
/// with.
const PAGE_SIZE: u32 = 16384;

/// The series with a block that starts before `$1`: one index seek each
/// (the blocks index leads with the part: see [`blocks::MERGE_SELECT`]).
const SERIES_OLDER_THAN: &str = "SELECT d.device_id, d.sensor_id FROM device_sensors d \
     WHERE EXISTS (SELECT 1 FROM blocks b WHERE b.device_id % 8 = d.device_id % 8 \
     AND b.device_id = d.device_id AND b.sensor_id = d.sensor_id AND b.first_ts < $1)";

/// Makes a new database, its schema included, on a connection of its own
/// with larger pages and incremental auto-vacuum (free pages can then be
/// given back at a clean stop). Both take effect only before the first
/// table, so no later connection sets them: on an existing database
/// `auto_vacuum` takes the write lock, and a writer reconnecting past a
/// stuck transaction, or a reader, would wait on it.
async fn create_database(options: &SqliteConnectOptions) -> Result<(), StoreError> {
    let creating = options
        .clone()
        .page_size(PAGE_SIZE)
        .auto_vacuum(SqliteAutoVacuum::Incremental);
    let mut conn = Connector::Sqlite(creating).connect().await?;
    migrate(&mut conn).await?;
    conn.close().await
}

fn is_empty_file(path: &Path) -> bool {
    std::fs::metadata(path).map_or(true, |m| m.len() == 0)
}

/// The page size of the database at `path`, from its header (bytes 16-17,
/// big-endian, 1 meaning 65536), or [`PAGE_SIZE`] for one not made yet.
fn page_size_of(path: &Path) -> u64 {
    use std::io::Read;
    let mut header = [0u8; 18];
    let read = std::fs::File::open(path).and_then(|mut f| f.read_exact(&mut header));
    match read.map(|()| u16::from_be_bytes([header[16], header[17]])) {
        Ok(1) => 65536,
        Ok(n) if n >= 512 => u64::from(n),
        _ => u64::from(PAGE_SIZE),
    }
}

/// Makes the database's directory (0700 when this makes it) and file
/// (0600; an existing one is narrowed to it): readings, tokens' hashes and
/// commands are nobody else's to read. SQLite gives its WAL and shared
/// memory files the database file's mode.
fn private_file(path: &Path) -> Result<(), StoreError> {
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty())
        && !dir.exists()
    {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|source| StoreError::CreateDir {
                path: dir.display().to_string(),
                source,
            })?;
    }
    let file_error = |source| StoreError::File {
        path: path.display().to_string(),
        source,
    };
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)
        .map_err(file_error)?;
    file.set_permissions(std::fs::Permissions::from_mode(0o600))
        .map_err(file_error)?;
    Ok(())
}

/// Holds `{path}.lock` exclusively (flock) for as long as the writer lives:
/// a second hub process on the same SQLite file refuses to start, naming
/// the path. A lock file beside the database, not the database itself:
/// closing a descriptor of the database would drop SQLite's own locks.
fn lock_database(path: &Path) -> Result<std::fs::File, StoreError> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut name = path.as_os_str().to_owned();
    name.push(".lock");
    let lock_path = std::path::PathBuf::from(name);
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(&lock_path)
        .map_err(|source| StoreError::File {
            path: lock_path.display().to_string(),
            source,
        })?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => Err(StoreError::InUse {
            path: path.display().to_string(),
        }),
        Err(std::fs::TryLockError::Error(source)) => Err(StoreError::File {
            path: lock_path.display().to_string(),
            source,
        }),
    }
}

/// The same settings for every database file of the hub: WAL, the
/// configured durability, busy timeout and cache. Creates the directory.
fn connect_options(
    path: &Path,
    settings: &StorageSettings,
) -> Result<SqliteConnectOptions, StoreError> {
    private_file(path)?;
    let synchronous = match settings.synchronous {
        Synchronous::Full => SqliteSynchronous::Full,
        Synchronous::Normal => SqliteSynchronous::Normal,
        Synchronous::Off => SqliteSynchronous::Off,
    };
    Ok(SqliteConnectOptions::from_str("sqlite:")?
        .filename(path)
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(synchronous)
        .busy_timeout(settings.busy_timeout)
        .foreign_keys(false)
        .pragma(
            "cache_size",
            format!("-{}", u64::from(settings.cache_size_mib) * 1024),
        )
        .pragma("temp_store", "memory")
        // The writer alone prepares ~130 distinct statements (multi-row
        // shapes, 8 staging parts); past sqlx's default of 100 the busiest
        // ones would be prepared again and again.
        .statement_cache_capacity(256)
        .disable_statement_logging())
}

impl Store {
    pub async fn close(&self) {
        self.read.close().await;
    }

    pub fn backend(&self) -> Backend {
        self.read.backend()
    }

    /// A consistent copy of the database (one read transaction) at `path`.
    pub async fn vacuum_into(&self, path: &Path) -> Result<(), StoreError> {
        vacuum_into(&self.read, path).await
    }

    pub async fn find_device(&self, external_id: &str) -> Result<Option<DeviceRecord>, StoreError> {
        // The one device's slice of the progress log, not all of it.
        let progress = device_progress_of(
            self.backend(),
            "(SELECT id FROM devices WHERE external_id = $1)",
        );
        let sql = format!(
            "{} WHERE d.external_id = $1 AND d.removed_ms IS NULL",
            device_select_from(2, &progress)
        );
        let row: Option<DeviceRow> = with_pool!(&self.read, pool, _Db => {
            sqlx::query_as(&sql)
                .bind(external_id)
                .bind(lease_cutoff())
                .fetch_optional(pool)
                .await?
        });
        Ok(row.map(DeviceRow::into_record))
    }

    /// Up to `limit` devices after `after` (by id) that `filter` matches
    /// (but for its `online` clauses, which the caller answers), removed
    /// ones left out.
    pub async fn list_devices(
        &self,
        after: &str,
        limit: u32,
        filter: &crate::twin::filter::Filter,
    ) -> Result<Vec<DeviceRecord>, StoreError> {
        let (cond, vals) = twins::filter_sql(filter, self.backend(), 4);
        let sql = format!(
            "{} WHERE d.external_id > $1 AND d.removed_ms IS NULL AND {cond} \
             ORDER BY d.external_id LIMIT $2",
            device_select(3)
        );
        let vals: Vec<db::Val<'_>> = vals.iter().map(twins::Text::val).collect();
        let rows: Vec<DeviceRow> = with_pool!(&self.read, pool, _Db => {
            let q = sqlx::query(&sql)
                .bind(after)
                .bind(i64::from(limit))
                .bind(lease_cutoff());
            let q = db::bind_vals(q, &vals);
            let rows = q.fetch_all(pool).await?;
            rows.iter()
                .map(<DeviceRow as sqlx::FromRow<_>>::from_row)
                .collect::<Result<Vec<_>, _>>()?
        });
        Ok(rows.into_iter().map(DeviceRow::into_record).collect())
    }

    pub async fn sensor_key(&self, name: &str) -> Result<Option<SensorKey>, StoreError> {
        let id: Option<i64> = with_pool!(&self.read, pool, _Db => {
            sqlx::query_scalar("SELECT id FROM sensors WHERE name = $1")
                .bind(name)
                .fetch_optional(pool)
                .await?
        });
        Ok(id.map(SensorKey))
    }

    /// The sensors a device has readings for, in key order.
    pub async fn device_sensors(
        &self,
        device: DeviceKey,
    ) -> Result<Vec<(SensorKey, String)>, StoreError> {
        let rows: Vec<(i64, String)> = with_pool!(&self.read, pool, _Db => {
            sqlx::query_as(
                "SELECT d.sensor_id, s.name FROM device_sensors d \
                 JOIN sensors s ON s.id = d.sensor_id WHERE d.device_id = $1 ORDER BY d.sensor_id",
            )
            .bind(device.0)
            .fetch_all(pool)
            .await?
        });
        Ok(rows
            .into_iter()
            .map(|(id, name)| (SensorKey(id), name))
            .collect())
    }

    /// Every series the hub holds readings of, of devices not removed (of
    /// the device `only` names, if given): the device (key, id, tags) and
    /// the sensor's name, in device id order.
    pub async fn series_catalog(
        &self,
        only: Option<&str>,
    ) -> Result<Vec<CatalogSeries>, StoreError> {
        let rows: Vec<(i64, String, String, String)> = with_pool!(&self.read, pool, _Db => {
            sqlx::query_as(
                "SELECT d.id, d.external_id, d.tags, s.name FROM device_sensors ds \
                 JOIN devices d ON d.id = ds.device_id JOIN sensors s ON s.id = ds.sensor_id \
                 WHERE d.removed_ms IS NULL AND ($1 IS NULL OR d.external_id = $1) \
                 ORDER BY d.external_id, s.name",
            )
            .bind(only)
            .fetch_all(pool)
            .await?
        });
        Ok(rows
            .into_iter()
            .map(|(id, device_id, tags, sensor)| CatalogSeries {
                device: DeviceKey(id),
                device_id,
                tags: twins::decode_tags(&tags),
                sensor,
            })
            .collect())
    }

    /// Staged readings of a device (one sensor, or all) with
    /// since <= ts_ms < until, ordered by (sensor, ts_ms, seq). A scan, once
    /// per query, of the device's staging part (about storage.compact_rows /
    /// STAGING_PARTS rows).
    pub async fn staged_readings(
        &self,
        device: DeviceKey,
        sensor: Option<SensorKey>,
        since_ms: i64,
        until_ms: i64,
    ) -> Result<Vec<(SensorKey, codec::Point)>, StoreError> {
        let sql = format!(
            "SELECT sensor_id, seq, ts_ms, value FROM {} \
             WHERE device_id = $1 AND ($2 IS NULL OR sensor_id = $2) AND ts_ms >= $3 AND ts_ms < $4 \
             ORDER BY sensor_id, ts_ms, seq",
            write::staging_table(staging_part(device))
        );
        let rows: Vec<(i64, i64, i64, f64)> = with_pool!(&self.read, pool, _Db => {
            sqlx::query_as(&sql)
                .bind(device.0)
                .bind(sensor.map(|s| s.0))
                .bind(since_ms)
                .bind(until_ms)
                .fetch_all(pool)
                .await?
        });
        Ok(rows
            .into_iter()
            .map(|(sensor, seq, ts_ms, value)| {
                (
                    SensorKey(sensor),
                    codec::Point {
                        seq: seq as u64,
                        ts_ms,
                        value,
                    },
                )
            })
            .collect())
    }

    /// The (device, sensor) series that hold readings stamped before
    /// `cutoff_ms`: one index seek per series, inside SQLite.
    pub async fn series_older_than(
        &self,
        cutoff_ms: i64,
    ) -> Result<Vec<(DeviceKey, SensorKey)>, StoreError> {
        let rows: Vec<(i64, i64)> = with_pool!(&self.read, pool, _Db => {
            sqlx::query_as(SERIES_OLDER_THAN)
            .bind(cutoff_ms)
            .fetch_all(pool)
            .await?
        });
        Ok(rows
            .into_iter()
            .map(|(d, s)| (DeviceKey(d), SensorKey(s)))
            .collect())
    }

    /// The PostgreSQL database's size on disk (0 on SQLite, whose files
    /// the caller measures).
    pub async fn database_bytes(&self) -> Result<u64, StoreError> {
        let Pool::Postgres(pool) = &self.read else {
            return Ok(0);
        };
        let bytes: i64 = sqlx::query_scalar("SELECT pg_database_size(current_database())")
            .fetch_one(pool)
            .await?;
        Ok(bytes.max(0) as u64)
    }

    /// PostgreSQL: a listener of other hubs' device claims and command
    /// changes, on a connection of its own (not one of the read pool's).
    /// None on SQLite.
    pub async fn listen_cluster(&self) -> Result<Option<sqlx::postgres::PgListener>, StoreError> {
        let Pool::Postgres(pool) = &self.read else {
            return Ok(None);
        };
        let own = sqlx::postgres::PgPoolOptions::new()
            .max_connections(1)
            .connect_with((*pool.connect_options()).clone())
            .await?;
        let mut listener = sqlx::postgres::PgListener::connect_with(&own).await?;
        listener
            .listen_all([CLAIMS_CHANNEL, commands::COMMANDS_CHANNEL, TWINS_CHANNEL])
            .await?;
        Ok(Some(listener))
    }

    /// PostgreSQL: this hub is alive (its row in `hubs`, heartbeat now).
    pub async fn heartbeat(&self, hub: &str, now_ms: i64) -> Result<(), StoreError> {
        with_pool!(&self.read, pool, _Db => {
            sqlx::query(
                "INSERT INTO hubs (id, started_ms, heartbeat_ms) VALUES ($1, $2, $2) \
                 ON CONFLICT (id) DO UPDATE SET heartbeat_ms = excluded.heartbeat_ms",
            )
            .bind(hub)
            .bind(now_ms)
            .execute(pool)
            .await?
            .rows_affected()
        });
        Ok(())
    }

    /// Forgets hubs silent since before `cutoff_ms` (one row per process
    /// start would pile up otherwise).
    pub async fn forget_hubs_before(&self, cutoff_ms: i64) -> Result<(), StoreError> {
        with_pool!(&self.read, pool, _Db => {
            sqlx::query("DELETE FROM hubs WHERE heartbeat_ms < $1")
                .bind(cutoff_ms)
                .execute(pool)
                .await?
                .rows_affected()
        });
        Ok(())
    }

    /// The device's stream of session `epoch` to hub `hub` ended (unless a
    /// newer stream, on this hub or another, holds it by now).
    pub async fn went_offline(
        &self,
        hub: &str,
        device_id: &str,
        epoch: u64,
    ) -> Result<(), StoreError> {
        with_pool!(&self.read, pool, _Db => {
            sqlx::query(
                "UPDATE devices SET online_since_ms = NULL \
                 WHERE external_id = $1 AND hub = $2 AND epoch = $3",
            )
            .bind(device_id)
            .bind(hub)
            .bind(epoch as i64)
            .execute(pool)
            .await?
            .rows_affected()
        });
        Ok(())
    }

    /// Hub `hub` holds exactly the streams of `live`: every other device
    /// the database shows on it is offline (after missed presence events).
    pub async fn only_online(&self, hub: &str, live: &[String]) -> Result<(), StoreError> {
        let Pool::Postgres(pool) = &self.read else {
            return Ok(());
        };
        sqlx::query(
            "UPDATE devices SET online_since_ms = NULL WHERE hub = $1 \
             AND online_since_ms IS NOT NULL AND NOT (external_id = ANY($2))",
        )
        .bind(hub)
        .bind(live)
        .execute(pool)
        .await?;
        Ok(())
    }

    /// Readings stored in total, from the per-device counters.
    pub async fn total_readings(&self) -> Result<u64, StoreError> {
        let sql = match self.read.backend() {
            Backend::Postgres => TOTAL_READINGS[0],
            Backend::Sqlite => TOTAL_READINGS[1],
        };
        let total: i64 = with_pool!(&self.read, pool, _Db => {
            sqlx::query_scalar(sql)
                .fetch_one(pool)
                .await?
        });
        Ok(total as u64)
    }
}

/// [`Store::total_readings`]: PostgreSQL's counts, and SQLite's with what
/// its progress log adds (a scan of the view would join every device).
/// The views floor each device's count at 0; this sum floors the total
/// only: the two differ only where a count was already wrong.
const TOTAL_READINGS: [&str; 2] = [
    "SELECT CAST(COALESCE(SUM(reading_count), 0) AS BIGINT) FROM devices",
    "SELECT max(0, (SELECT COALESCE(SUM(reading_count), 0) FROM devices) \
     + (SELECT COALESCE(SUM(m.value ->> 2), 0) FROM progress_log l, json_each(l.marks) m))",
];

/// One series of [`Store::series_catalog`].
#[derive(Debug, Clone)]
pub struct CatalogSeries {
    pub device: DeviceKey,
    pub device_id: String,
    pub tags: std::collections::BTreeMap<String, String>,
    pub sensor: String,
}

/// The devices' columns, with `online_since_ms` only while the device's
/// hub has a heartbeat newer than parameter `$cutoff` (see [`lease_cutoff`]).
fn device_select(cutoff: usize) -> String {
    device_select_from(cutoff, "device_progress")
}

/// [`device_select`] with the devices' progress marks from `progress` (the
/// view, or [`device_progress_of`] one device).
fn device_select_from(cutoff: usize, progress: &str) -> String {
    format!(
        "SELECT d.id, d.external_id, d.firmware, d.tags, d.first_seen_ms, m.last_seen_ms, \
         m.acked_seq, m.reading_count, CASE WHEN d.online_since_ms IS NOT NULL AND EXISTS \
         (SELECT 1 FROM hubs h WHERE h.id = d.hub AND h.heartbeat_ms >= ${cutoff}) \
         THEN d.online_since_ms END AS online_since_ms, COALESCE(t.in_sync, 1) AS in_sync, \
         COALESCE(t.desired_version, 0) AS desired_version, \
         COALESCE(t.reported_version, 0) AS reported_version \
         FROM devices d JOIN {progress} m ON m.id = d.id \
         LEFT JOIN twins t ON t.device_id = d.id"
    )
}

/// The view `device_progress` for the one device whose key the SQL
/// expression `id` gives. SQLite: the view groups its whole progress log;
/// this reads the device's slice of it alone (a seek, see `log_slice`).
pub(crate) fn device_progress_of(backend: Backend, id: &str) -> String {
    match backend {
        Backend::Postgres => "device_progress".to_owned(),
        Backend::Sqlite => format!(
            "(SELECT d1.id AS id, max(d1.acked_seq, COALESCE(p.acked_seq, 0)) AS acked_seq, \
             max(0, d1.reading_count + COALESCE(p.added, 0)) AS reading_count, \
             max(d1.last_seen_ms, COALESCE(p.seen_ms, 0)) AS last_seen_ms, \
             COALESCE(p.reading_ms, d1.last_reading_ms) AS last_reading_ms \
             FROM devices d1 LEFT JOIN ({pending}) AS p \
             ON p.device_id = d1.id WHERE d1.id = {id})",
            pending = write::progress_pending(write::LogPick::Device(id))
        ),
    }
}

/// The view `sensor_progress` for the one device `id` gives (see
/// [`device_progress_of`]).
pub(crate) fn sensor_progress_of(backend: Backend, id: &str) -> String {
    match backend {
        Backend::Postgres => "sensor_progress".to_owned(),
        Backend::Sqlite => format!(
            "(SELECT ds1.device_id AS device_id, ds1.sensor_id AS sensor_id, \
             COALESCE(s.seen_ms, ds1.last_reading_ms) AS last_reading_ms \
             FROM device_sensors ds1 LEFT JOIN ({pending}) AS s \
             ON s.device_id = ds1.device_id AND s.sensor_id = ds1.sensor_id \
             WHERE ds1.device_id = {id})",
            pending = write::sensor_seen_pending(write::LogPick::Device(id))
        ),
    }
}

/// `log_slice` in SQL, of the device key `id` gives.
pub(crate) fn slice_sql(id: &str) -> String {
    format!("((({id}) >> 12) % {})", LOG_SLICES)
}

/// Heartbeats older than this (ms since the epoch) are of hubs presumed dead.
fn lease_cutoff() -> i64 {
    crate::domain::now_ms().saturating_sub(crate::domain::HUB_LEASE.as_millis() as i64)
}

row_struct! {
    /// A row of [`device_select`], decoded the same way from either backend.
    struct DeviceRow {
        id: i64,
        external_id: String,
        firmware: String,
        tags: String,
        first_seen_ms: i64,
        last_seen_ms: i64,
        acked_seq: i64,
        reading_count: i64,
        online_since_ms: Option<i64>,
        in_sync: i64,
        desired_version: i64,
        reported_version: i64,
    }
}

impl DeviceRow {
    fn into_record(self) -> DeviceRecord {
        DeviceRecord {
            key: DeviceKey(self.id),
            device_id: self.external_id,
            firmware: self.firmware,
            tags: twins::decode_tags(&self.tags),
            first_seen_ms: self.first_seen_ms,
            last_seen_ms: self.last_seen_ms,
            acked_seq: self.acked_seq as u64,
            readings: self.reading_count as u64,
            online_since_ms: self.online_since_ms,
            in_sync: self.in_sync != 0,
            desired_version: self.desired_version as u64,
            reported_version: self.reported_version as u64,
        }
    }
}
