//! The command log: on SQLite its own database file next to the readings
//! database, so a command's transitions commit in milliseconds even while
//! readings commit in large groups (SQLite has one writer per file). On
//! PostgreSQL two tables of the one database, written through a connection
//! of their own.

use std::path::{Path, PathBuf};

use sqlx::QueryBuilder;

use super::db::{Connector, Pool, with_conn, with_pool};
use super::migrations::Schema;
use super::{StoreError, WriteConn, connect_options};
use crate::config::{Backend, StorageSettings};
use crate::domain::{CommandRecord, CommandState, CommandTransition};

/// `data/hub.db` -> `data/hub-commands.db`.
pub fn commands_path(readings_path: &Path) -> PathBuf {
    let stem = readings_path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "hub".into());
    readings_path.with_file_name(format!("{stem}-commands.db"))
}

/// Read side of the command log; cheap to clone.
#[derive(Clone)]
pub struct CommandStore {
    read: Pool,
}

/// The command log's only writer (owned by the commands task).
pub struct CommandWriter {
    conn: WriteConn,
}

pub async fn open(settings: &StorageSettings) -> Result<(CommandStore, CommandWriter), StoreError> {
    let options = match settings.backend {
        Backend::Sqlite => {
            Connector::Sqlite(connect_options(&commands_path(&settings.path), settings)?)
        }
        Backend::Postgres => {
            Connector::Postgres(super::db::postgres_options(settings.url.as_str())?)
        }
    };
    let mut conn = WriteConn::open(options.clone()).await?;
    match conn.conn() {
        super::db::Conn::Sqlite(c) => Schema::Commands.migrator().await?.run(c).await?,
        // The commands' tables are part of the one schema (store::open).
        super::db::Conn::Postgres(c) => Schema::Postgres.migrator().await?.run(c).await?,
    }
    let read = options.pool(2).await?;
    Ok((CommandStore { read }, CommandWriter { conn }))
}

/// Which commands to list.
#[derive(Debug, Clone, Default)]
pub struct CommandFilter {
    pub device_id: Option<String>,
    pub state: Option<CommandState>,
    pub since_ms: Option<i64>,
    pub until_ms: Option<i64>,
    pub limit: u32,
}

const COMMAND_COLUMNS: &str = "command_id, device_id, name, params, state, detail, result, \
     attempts, created_at_ms, updated_at_ms, expires_at_ms";

row_struct! {
    /// A row of [`COMMAND_COLUMNS`], decoded the same way from either backend.
    struct CommandRow {
        command_id: String,
        device_id: String,
        name: String,
        params: String,
        state: String,
        detail: String,
        result: String,
        attempts: i64,
        created_at_ms: i64,
        updated_at_ms: i64,
        expires_at_ms: i64,
    }
}

impl CommandRow {
    fn into_record(self) -> Result<CommandRecord, StoreError> {
        Ok(CommandRecord {
            state: parse_state(&self.state)?,
            command_id: self.command_id,
            device_id: self.device_id,
            name: self.name,
            params: self.params,
            detail: self.detail,
            result: self.result,
            attempts: self.attempts as u32,
            created_at_ms: self.created_at_ms,
            updated_at_ms: self.updated_at_ms,
            expires_at_ms: self.expires_at_ms,
        })
    }
}

fn parse_state(raw: &str) -> Result<CommandState, StoreError> {
    CommandState::parse(raw).ok_or_else(|| {
        StoreError::Sqlx(sqlx::Error::Decode(
            format!("unknown command state {raw:?}").into(),
        ))
    })
}

impl CommandStore {
    pub async fn close(&self) {
        self.read.close().await;
    }

    /// A consistent copy of the command log at `path`.
    pub async fn vacuum_into(&self, path: &Path) -> Result<(), StoreError> {
        super::vacuum_into(&self.read, path).await
    }

    pub async fn get(
        &self,
        command_id: &str,
    ) -> Result<Option<(CommandRecord, Vec<CommandTransition>)>, StoreError> {
        let sql = format!("SELECT {COMMAND_COLUMNS} FROM commands WHERE command_id = $1");
        let Some(row): Option<CommandRow> = with_pool!(&self.read, pool, _Db => {
            sqlx::query_as(&sql).bind(command_id).fetch_optional(pool).await?
        }) else {
            return Ok(None);
        };
        // In the order they were written: SQLite's rowid, PostgreSQL's id.
        let order = match self.read.backend() {
            Backend::Sqlite => "h.rowid",
            Backend::Postgres => "h.id",
        };
        let sql = format!(
            "SELECT h.state, h.at_ms, h.detail FROM command_history h \
             JOIN commands c ON c.seq = h.command_seq WHERE c.command_id = $1 ORDER BY {order}"
        );
        let rows: Vec<(String, i64, String)> = with_pool!(&self.read, pool, _Db => {
            sqlx::query_as(&sql).bind(command_id).fetch_all(pool).await?
        });
        let history = rows
            .into_iter()
            .map(|(state, at_ms, detail)| {
                Ok(CommandTransition {
                    state: parse_state(&state)?,
                    at_ms,
                    detail,
                })
            })
            .collect::<Result<Vec<_>, StoreError>>()?;
        Ok(Some((row.into_record()?, history)))
    }

    /// Newest first.
    pub async fn list(&self, filter: &CommandFilter) -> Result<Vec<CommandRecord>, StoreError> {
        let rows: Vec<CommandRow> = with_pool!(&self.read, pool, Db => {
            let mut q: QueryBuilder<Db> = QueryBuilder::new(format!(
                "SELECT {COMMAND_COLUMNS} FROM commands WHERE 1 = 1"
            ));
            if let Some(device) = &filter.device_id {
                q.push(" AND device_id = ").push_bind(device.clone());
            }
            if let Some(state) = filter.state {
                q.push(" AND state = ").push_bind(state.as_str());
            }
            if let Some(since) = filter.since_ms {
                q.push(" AND created_at_ms >= ").push_bind(since);
            }
            if let Some(until) = filter.until_ms {
                q.push(" AND created_at_ms < ").push_bind(until);
            }
            q.push(" ORDER BY seq DESC LIMIT ")
                .push_bind(i64::from(filter.limit));
            q.build_query_as().fetch_all(pool).await?
        });
        rows.into_iter().map(CommandRow::into_record).collect()
    }
}

/// What an update expects to find: the command as this hub last knew it.
/// Another hub on the same PostgreSQL database may have changed it since
/// (every change moves `updated_at_ms`); then the update is not applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Expected {
    pub state: CommandState,
    pub attempts: u32,
    pub updated_at_ms: i64,
}

impl Expected {
    pub fn of(rec: &CommandRecord) -> Self {
        Self {
            state: rec.state,
            attempts: rec.attempts,
            updated_at_ms: rec.updated_at_ms,
        }
    }
}

/// The channel on which PostgreSQL hubs announce command changes.
pub const COMMANDS_CHANNEL: &str = "hub_commands";

impl CommandWriter {
    pub fn backend(&self) -> Backend {
        self.conn.backend()
    }

    /// The open commands of one device, oldest first.
    pub async fn load_open_for(
        &mut self,
        device_id: &str,
    ) -> Result<Vec<CommandRecord>, StoreError> {
        let sql = format!(
            "SELECT {COMMAND_COLUMNS} FROM commands WHERE device_id = $1 \
             AND state IN ('QUEUED', 'SENT', 'RECEIVED') ORDER BY seq"
        );
        let rows: Vec<CommandRow> = with_conn!(self.conn.conn(), c => {
            sqlx::query_as(&sql).bind(device_id).fetch_all(c).await?
        });
        rows.into_iter().map(CommandRow::into_record).collect()
    }

    /// Every command that is not final, oldest first.
    pub async fn load_open(&mut self) -> Result<Vec<CommandRecord>, StoreError> {
        let sql = format!(
            "SELECT {COMMAND_COLUMNS} FROM commands \
             WHERE state IN ('QUEUED', 'SENT', 'RECEIVED') ORDER BY seq"
        );
        let rows: Vec<CommandRow> = with_conn!(self.conn.conn(), c => {
            sqlx::query_as(&sql).fetch_all(c).await?
        });
        rows.into_iter().map(CommandRow::into_record).collect()
    }

    /// Dropped without [`CommandTx::commit`], the transaction is rolled back
    /// before the next one begins.
    pub async fn begin(&mut self) -> Result<CommandTx<'_>, StoreError> {
        self.conn.begin().await?;
        Ok(CommandTx {
            conn: &mut self.conn,
        })
    }

    /// After a failed write: rolls back at once (see [`WriteConn::abort`]).
    pub async fn abort(&mut self) {
        self.conn.abort().await;
    }

    /// Deletes up to `limit` final commands created before `cutoff_ms`,
    /// with their history, in one transaction. Returns how many went.
    pub async fn delete_final_before(
        &mut self,
        cutoff_ms: i64,
        limit: u32,
    ) -> Result<u64, StoreError> {
        const DOOMED: &str = "SELECT seq FROM commands WHERE created_at_ms < $1 \
             AND state IN ('SUCCEEDED', 'FAILED', 'REJECTED', 'EXPIRED', 'CANCELLED') \
             ORDER BY created_at_ms LIMIT $2";
        self.conn.begin().await?;
        // The commands first, then the history of exactly those (another
        // hub's retention may pick a different set meanwhile).
        let commands = format!("DELETE FROM commands WHERE seq IN ({DOOMED}) RETURNING seq");
        let seqs: Vec<i64> = with_conn!(self.conn.conn(), c => {
            sqlx::query_scalar(&commands)
                .bind(cutoff_ms)
                .bind(i64::from(limit))
                .fetch_all(c)
                .await?
        });
        for chunk in seqs.chunks(500) {
            let list = chunk
                .iter()
                .map(i64::to_string)
                .collect::<Vec<_>>()
                .join(",");
            let history = format!("DELETE FROM command_history WHERE command_seq IN ({list})");
            with_conn!(self.conn.conn(), c => {
                sqlx::query(&history).execute(c).await?.rows_affected()
            });
        }
        let deleted = seqs.len() as u64;
        self.conn.commit().await?;
        Ok(deleted)
    }

    pub async fn close(self) -> Result<(), StoreError> {
        self.conn.close().await?;
        Ok(())
    }
}

pub struct CommandTx<'c> {
    conn: &'c mut WriteConn,
}

impl CommandTx<'_> {
    pub async fn insert(&mut self, rec: &CommandRecord) -> Result<(), StoreError> {
        let sql = format!(
            "INSERT INTO commands ({COMMAND_COLUMNS}) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)"
        );
        with_conn!(self.conn.conn(), c => sqlx::query(&sql)
            .bind(&rec.command_id)
            .bind(&rec.device_id)
            .bind(&rec.name)
            .bind(&rec.params)
            .bind(rec.state.as_str())
            .bind(&rec.detail)
            .bind(&rec.result)
            .bind(i64::from(rec.attempts))
            .bind(rec.created_at_ms)
            .bind(rec.updated_at_ms)
            .bind(rec.expires_at_ms)
            .execute(c)
            .await?
            .rows_affected());
        Ok(())
    }

    /// Stores the command's current fields and appends its transitions, if
    /// the stored command is still as `expected`; whether it was.
    pub async fn update(
        &mut self,
        rec: &CommandRecord,
        transitions: &[CommandTransition],
        expected: Expected,
    ) -> Result<bool, StoreError> {
        let updated = with_conn!(self.conn.conn(), c => sqlx::query(
            "UPDATE commands SET state = $1, detail = $2, result = $3, attempts = $4, \
             updated_at_ms = $5 WHERE command_id = $6 \
             AND state = $7 AND attempts = $8 AND updated_at_ms = $9",
        )
        .bind(rec.state.as_str())
        .bind(&rec.detail)
        .bind(&rec.result)
        .bind(i64::from(rec.attempts))
        .bind(rec.updated_at_ms)
        .bind(&rec.command_id)
        .bind(expected.state.as_str())
        .bind(i64::from(expected.attempts))
        .bind(expected.updated_at_ms)
        .execute(c)
        .await?
        .rows_affected());
        if updated == 0 {
            return Ok(false);
        }
        self.history(&rec.command_id, transitions).await?;
        Ok(true)
    }

    /// PostgreSQL: tells the other hubs, when this transaction commits,
    /// that hub `hub` changed the command. Nothing on SQLite.
    pub async fn notify(&mut self, hub: &str, command_id: &str) -> Result<(), StoreError> {
        if let super::db::Conn::Postgres(c) = self.conn.conn() {
            sqlx::query("SELECT pg_notify($1, $2)")
                .bind(COMMANDS_CHANNEL)
                .bind(format!("{hub} {command_id}"))
                .execute(c)
                .await?;
        }
        Ok(())
    }

    pub async fn history(
        &mut self,
        command_id: &str,
        transitions: &[CommandTransition],
    ) -> Result<(), StoreError> {
        for t in transitions {
            with_conn!(self.conn.conn(), c => sqlx::query(
                "INSERT INTO command_history (command_seq, at_ms, state, detail) \
                 SELECT seq, $1, $2, $3 FROM commands WHERE command_id = $4",
            )
            .bind(t.at_ms)
            .bind(t.state.as_str())
            .bind(&t.detail)
            .bind(command_id)
            .execute(c)
            .await?
            .rows_affected());
        }
        Ok(())
    }

    pub async fn commit(self) -> Result<(), StoreError> {
        self.conn.commit().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_command_log_sits_next_to_the_readings() {
        assert_eq!(
            commands_path(Path::new("data/hub.db")),
            PathBuf::from("data/hub-commands.db")
        );
        assert_eq!(
            commands_path(Path::new("/tmp/x/store")),
            PathBuf::from("/tmp/x/store-commands.db")
        );
    }
}
