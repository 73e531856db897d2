//! The schemas' migrations, embedded in the binary and read the way sqlx's
//! `migrate!` reads them (version and description from the file name, a
//! SHA-384 of the text as the checksum), so databases migrated by earlier
//! builds check out. `build.rs` lists the files. Not `migrate!` itself: it
//! is a proc macro, and its dependencies (sqlx with both drivers, SQLite's
//! C source, tokio) were compiled a second time, for the host, in every
//! clean build.

use std::borrow::Cow;

use futures_util::future::BoxFuture;
use sqlx::error::BoxDynError;
use sqlx::migrate::{MigrateError, Migration, MigrationSource, MigrationType, Migrator};

mod files {
    include!(concat!(env!("OUT_DIR"), "/migrations.rs"));
}

/// One of the hub's schemas.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Schema {
    /// SQLite's readings database.
    Sqlite,
    /// PostgreSQL's one database: readings and the command log.
    Postgres,
    /// SQLite's command log (a file of its own).
    Commands,
}

impl Schema {
    /// Its migrations, oldest first.
    pub fn migrations(self) -> Vec<Migration> {
        let files = match self {
            Schema::Sqlite => files::SQLITE,
            Schema::Postgres => files::POSTGRES,
            Schema::Commands => files::COMMANDS,
        };
        files
            .iter()
            // `rest`: the file name after `<version>_` (build.rs checked it).
            .map(|&(version, rest, sql)| {
                let kind = MigrationType::from_filename(rest);
                let description = rest.trim_end_matches(kind.suffix()).replace('_', " ");
                let no_tx = sql.starts_with("-- no-transaction");
                Migration::new(version, description.into(), kind, Cow::Borrowed(sql), no_tx)
            })
            .collect()
    }

    /// A migrator of all of them.
    pub async fn migrator(self) -> Result<Migrator, MigrateError> {
        Migrator::new(self).await
    }
}

impl MigrationSource<'static> for Schema {
    fn resolve(self) -> BoxFuture<'static, Result<Vec<Migration>, BoxDynError>> {
        Box::pin(std::future::ready(Ok(self.migrations())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The checksum is what a database migrated by `migrate!` holds: the
    /// SHA-384 of the file's text. And every file is there, in order.
    #[tokio::test]
    async fn migrations_read_as_sqlx_reads_a_directory() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../migrations");
        for (schema, dir) in [
            (Schema::Sqlite, root.clone()),
            (Schema::Postgres, root.join("postgres")),
            (Schema::Commands, root.join("commands")),
        ] {
            let from_disk = Migrator::new(dir.as_path()).await.unwrap();
            let embedded = schema.migrator().await.unwrap();
            assert!(embedded.iter().count() > 0);
            assert_eq!(
                embedded.iter().count(),
                from_disk.iter().count(),
                "{schema:?}"
            );
            for (a, b) in embedded.iter().zip(from_disk.iter()) {
                assert_eq!(
                    (
                        a.version,
                        &a.description,
                        a.migration_type,
                        &a.sql,
                        &a.checksum,
                        a.no_tx
                    ),
                    (
                        b.version,
                        &b.description,
                        b.migration_type,
                        &b.sql,
                        &b.checksum,
                        b.no_tx
                    ),
                );
            }
        }
    }
}
