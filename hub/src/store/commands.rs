//! The command log: its own database file next to the readings database, so
//! a command's transitions commit in milliseconds even while readings commit
//! in large groups (SQLite has one writer per file).

use std::path::{Path, PathBuf};

use sqlx::sqlite::{SqlitePool, SqlitePoolOptions, SqliteRow};
use sqlx::{QueryBuilder, Row, Sqlite};

use super::{StoreError, WriteConn, connect_options};
use crate::config::StorageSettings;
use crate::domain::{CommandRecord, CommandState, CommandTransition};

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../migrations/commands");

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
    read: SqlitePool,
}

/// The command log's only writer (owned by the commands task).
pub struct CommandWriter {
    conn: WriteConn,
}

pub async fn open(settings: &StorageSettings) -> Result<(CommandStore, CommandWriter), StoreError> {
    let options = connect_options(&commands_path(&settings.path), settings)?;
    let mut conn = WriteConn::open(options.clone()).await?;
    MIGRATOR.run(conn.conn()).await?;
    let read = SqlitePoolOptions::new()
        .max_connections(2)
        .connect_with(options)
        .await?;
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

fn record_from_row(row: &SqliteRow) -> Result<CommandRecord, StoreError> {
    let state: String = row.try_get("state")?;
    Ok(CommandRecord {
        command_id: row.try_get("command_id")?,
        device_id: row.try_get("device_id")?,
        name: row.try_get("name")?,
        params: row.try_get("params")?,
        state: parse_state(&state)?,
        detail: row.try_get("detail")?,
        result: row.try_get("result")?,
        attempts: row.try_get::<i64, _>("attempts")? as u32,
        created_at_ms: row.try_get("created_at_ms")?,
        updated_at_ms: row.try_get("updated_at_ms")?,
        expires_at_ms: row.try_get("expires_at_ms")?,
    })
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
        let Some(row) = sqlx::query(&format!(
            "SELECT seq, {COMMAND_COLUMNS} FROM commands WHERE command_id = ?"
        ))
        .bind(command_id)
        .fetch_optional(&self.read)
        .await?
        else {
            return Ok(None);
        };
        let record = record_from_row(&row)?;
        let seq: i64 = row.try_get("seq")?;
        let history = sqlx::query(
            "SELECT state, at_ms, detail FROM command_history WHERE command_seq = ? ORDER BY rowid",
        )
        .bind(seq)
        .fetch_all(&self.read)
        .await?
        .iter()
        .map(|r| {
            let state: String = r.try_get("state")?;
            Ok(CommandTransition {
                state: parse_state(&state)?,
                at_ms: r.try_get("at_ms")?,
                detail: r.try_get("detail")?,
            })
        })
        .collect::<Result<Vec<_>, StoreError>>()?;
        Ok(Some((record, history)))
    }

    /// Newest first.
    pub async fn list(&self, filter: &CommandFilter) -> Result<Vec<CommandRecord>, StoreError> {
        let mut q: QueryBuilder<Sqlite> = QueryBuilder::new(format!(
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
        let rows = q.build().fetch_all(&self.read).await?;
        rows.iter().map(record_from_row).collect()
    }
}

impl CommandWriter {
    /// Every command that is not final, oldest first.
    pub async fn load_open(&mut self) -> Result<Vec<CommandRecord>, StoreError> {
        let rows = sqlx::query(&format!(
            "SELECT {COMMAND_COLUMNS} FROM commands \
             WHERE state IN ('QUEUED', 'SENT', 'RECEIVED') ORDER BY seq"
        ))
        .fetch_all(self.conn.conn())
        .await?;
        rows.iter().map(record_from_row).collect()
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
        const DOOMED: &str = "SELECT seq FROM commands WHERE created_at_ms < ?1 \
             AND state IN ('SUCCEEDED', 'FAILED', 'REJECTED', 'EXPIRED', 'CANCELLED') \
             ORDER BY created_at_ms LIMIT ?2";
        self.conn.begin().await?;
        sqlx::query(&format!(
            "DELETE FROM command_history WHERE command_seq IN ({DOOMED})"
        ))
        .bind(cutoff_ms)
        .bind(limit)
        .execute(self.conn.conn())
        .await?;
        let deleted = sqlx::query(&format!("DELETE FROM commands WHERE seq IN ({DOOMED})"))
            .bind(cutoff_ms)
            .bind(limit)
            .execute(self.conn.conn())
            .await?
            .rows_affected();
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
        sqlx::query(&format!(
            "INSERT INTO commands ({COMMAND_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
        ))
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
        .execute(self.conn.conn())
        .await?;
        Ok(())
    }

    /// Stores the command's current fields and appends its transitions.
    pub async fn update(
        &mut self,
        rec: &CommandRecord,
        transitions: &[CommandTransition],
    ) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE commands SET state = ?, detail = ?, result = ?, attempts = ?, updated_at_ms = ? \
             WHERE command_id = ?",
        )
        .bind(rec.state.as_str())
        .bind(&rec.detail)
        .bind(&rec.result)
        .bind(i64::from(rec.attempts))
        .bind(rec.updated_at_ms)
        .bind(&rec.command_id)
        .execute(self.conn.conn())
        .await?;
        self.history(&rec.command_id, transitions).await
    }

    pub async fn history(
        &mut self,
        command_id: &str,
        transitions: &[CommandTransition],
    ) -> Result<(), StoreError> {
        for t in transitions {
            sqlx::query(
                "INSERT INTO command_history (command_seq, at_ms, state, detail) \
                 SELECT seq, ?, ?, ? FROM commands WHERE command_id = ?",
            )
            .bind(t.at_ms)
            .bind(t.state.as_str())
            .bind(&t.detail)
            .bind(command_id)
            .execute(self.conn.conn())
            .await?;
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
