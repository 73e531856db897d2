//! The two backends behind the store's one set of functions: the embedded
//! SQLite file (the default) and PostgreSQL.
//!
//! Each store function is written once. Its statement text is shared where
//! the two dialects agree (numbered `$1` parameters work on both; sqlx's
//! SQLite driver reads `$NNN` as `?NNN`), and [`with_pool!`] or
//! [`with_conn!`] expand its body once per backend, so every query is typed
//! by its own driver: no `Any` driver between the hub and either database,
//! nothing lost of PostgreSQL's types. Where the dialects differ the
//! function asks [`Pool::backend`] / [`Conn::backend`].

use sqlx::postgres::{PgConnectOptions, PgConnection, PgPool, PgPoolOptions};
use sqlx::sqlite::{SqliteConnectOptions, SqliteConnection, SqlitePool, SqlitePoolOptions};
use sqlx::{ConnectOptions, Connection, Database, Encode, Type};

use super::StoreError;
use crate::config::Backend;

/// A pool of reader connections.
#[derive(Clone)]
pub(crate) enum Pool {
    Sqlite(SqlitePool),
    Postgres(PgPool),
}

/// One connection (a writer's).
pub(crate) enum Conn {
    Sqlite(SqliteConnection),
    Postgres(PgConnection),
}

/// How to open a connection.
#[derive(Clone)]
pub(crate) enum Connector {
    Sqlite(SqliteConnectOptions),
    Postgres(PgConnectOptions),
}

/// `match` on a [`Pool`] with the same body for both backends: `$p` is the
/// backend's pool and `$db` its `sqlx::Database`.
macro_rules! with_pool {
    ($pool:expr, $p:ident, $db:ident => $body:expr) => {
        match $pool {
            $crate::store::db::Pool::Sqlite($p) => {
                #[allow(dead_code)]
                type $db = sqlx::Sqlite;
                $body
            }
            $crate::store::db::Pool::Postgres($p) => {
                #[allow(dead_code)]
                type $db = sqlx::Postgres;
                $body
            }
        }
    };
}

/// `match` on a `&mut` [`Conn`] with the same body for both backends: `$c`
/// is the backend's `&mut` connection.
macro_rules! with_conn {
    ($conn:expr, $c:ident => $body:expr) => {
        match $conn {
            $crate::store::db::Conn::Sqlite($c) => $body,
            $crate::store::db::Conn::Postgres($c) => $body,
        }
    };
}

pub(crate) use {with_conn, with_pool};

impl Pool {
    pub fn backend(&self) -> Backend {
        match self {
            Pool::Sqlite(_) => Backend::Sqlite,
            Pool::Postgres(_) => Backend::Postgres,
        }
    }

    pub async fn close(&self) {
        with_pool!(self, p, _Db => p.close().await)
    }
}

impl Conn {
    pub fn backend(&self) -> Backend {
        match self {
            Conn::Sqlite(_) => Backend::Sqlite,
            Conn::Postgres(_) => Backend::Postgres,
        }
    }

    /// The SQLite connection (for SQLite-only work: PRAGMAs, the legacy
    /// table, tests); None on PostgreSQL.
    pub fn sqlite(&mut self) -> Option<&mut SqliteConnection> {
        match self {
            Conn::Sqlite(c) => Some(c),
            Conn::Postgres(_) => None,
        }
    }

    pub async fn close(self) -> Result<(), StoreError> {
        with_conn!(self, c => c.close().await?);
        Ok(())
    }
}

impl Connector {
    pub async fn connect(&self) -> Result<Conn, StoreError> {
        Ok(match self {
            Connector::Sqlite(o) => Conn::Sqlite(o.connect().await?),
            Connector::Postgres(o) => Conn::Postgres(o.connect().await?),
        })
    }

    pub async fn pool(&self, connections: u32) -> Result<Pool, StoreError> {
        Ok(match self {
            Connector::Sqlite(o) => Pool::Sqlite(
                SqlitePoolOptions::new()
                    .max_connections(connections)
                    .connect_with(o.clone())
                    .await?,
            ),
            Connector::Postgres(o) => Pool::Postgres(
                PgPoolOptions::new()
                    .max_connections(connections)
                    .connect_with(o.clone())
                    .await?,
            ),
        })
    }
}

/// A value bound into a multi-row statement.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Val<'a> {
    I(i64),
    F(f64),
    B(&'a [u8]),
    T(&'a str),
}

/// Binds `vals` in order.
pub(crate) fn bind_vals<'q, DB>(
    mut query: sqlx::query::Query<'q, DB, <DB as Database>::Arguments<'q>>,
    vals: &[Val<'q>],
) -> sqlx::query::Query<'q, DB, <DB as Database>::Arguments<'q>>
where
    DB: Database,
    i64: Encode<'q, DB> + Type<DB>,
    f64: Encode<'q, DB> + Type<DB>,
    &'q [u8]: Encode<'q, DB> + Type<DB>,
    &'q str: Encode<'q, DB> + Type<DB>,
{
    for v in vals {
        query = match *v {
            Val::I(i) => query.bind(i),
            Val::F(f) => query.bind(f),
            Val::B(b) => query.bind(b),
            Val::T(t) => query.bind(t),
        };
    }
    query
}

/// PostgreSQL connection settings from `storage.url`. A statement waits
/// at most 5 s for a row lock (a group that cannot get one fails like any
/// failed commit: nothing acked, devices resend), and the server ends a
/// transaction left idle for 30 s, so a hub that dies or is cut off
/// mid-transaction does not hold the rows of its devices for the others.
pub(crate) fn postgres_options(url: &str) -> Result<PgConnectOptions, StoreError> {
    use std::str::FromStr;
    Ok(PgConnectOptions::from_str(url)?
        .options([
            ("lock_timeout", "5s"),
            ("idle_in_transaction_session_timeout", "30s"),
        ])
        .application_name("telemetry-hub")
        .statement_cache_capacity(256)
        .disable_statement_logging())
}
