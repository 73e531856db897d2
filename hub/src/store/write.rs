//! The write side: only the ingest writer task holds a [`StoreWriter`].

use std::collections::HashMap;

use sqlx::sqlite::{Sqlite, SqliteConnection};
use sqlx::{Connection, Transaction};

use super::StoreError;
use crate::domain::{DeviceHello, DeviceKey, SensorKey};

/// One row of the readings table.
#[derive(Debug, Clone, Copy)]
pub struct RowToInsert {
    pub device: DeviceKey,
    pub sensor: SensorKey,
    pub ts_ms: i64,
    pub seq: i64,
    pub value: f64,
}

/// Rows per INSERT statement. Smaller remainders are split into powers of
/// two so only a handful of distinct statements are ever prepared (and they
/// stay in sqlx's statement cache).
const INSERT_CHUNK: usize = 256;

pub struct StoreWriter {
    conn: SqliteConnection,
    insert_sql: HashMap<usize, String>,
}

/// A write transaction of the writer.
pub struct WriteTx<'c> {
    tx: Transaction<'c, Sqlite>,
    insert_sql: &'c mut HashMap<usize, String>,
}

impl StoreWriter {
    pub(super) fn new(conn: SqliteConnection) -> Self {
        Self {
            conn,
            insert_sql: HashMap::new(),
        }
    }

    pub async fn begin(&mut self) -> Result<WriteTx<'_>, StoreError> {
        Ok(WriteTx {
            tx: self.conn.begin().await?,
            insert_sql: &mut self.insert_sql,
        })
    }

    pub async fn load_sensors(&mut self) -> Result<Vec<(String, SensorKey)>, StoreError> {
        let rows: Vec<(i64, String)> = sqlx::query_as("SELECT id, name FROM sensors")
            .fetch_all(&mut self.conn)
            .await?;
        Ok(rows
            .into_iter()
            .map(|(id, name)| (name, SensorKey(id)))
            .collect())
    }

    pub async fn close(self) -> Result<(), StoreError> {
        self.conn.close().await?;
        Ok(())
    }
}

impl WriteTx<'_> {
    pub async fn commit(self) -> Result<(), StoreError> {
        self.tx.commit().await?;
        Ok(())
    }

    /// Registers the device or refreshes what it says about itself; returns
    /// its key and committed high-water mark.
    pub async fn upsert_device(
        &mut self,
        hello: &DeviceHello,
        now_ms: i64,
    ) -> Result<(DeviceKey, u64), StoreError> {
        let labels = serde_json::to_string(&hello.labels).unwrap_or_else(|_| "{}".into());
        let (id, acked): (i64, i64) = sqlx::query_as(
            "INSERT INTO devices (external_id, firmware, labels, first_seen_ms, last_seen_ms) \
             VALUES (?1, ?2, ?3, ?4, ?4) \
             ON CONFLICT (external_id) DO UPDATE SET firmware = excluded.firmware, \
             labels = excluded.labels, last_seen_ms = excluded.last_seen_ms \
             RETURNING id, acked_seq",
        )
        .bind(hello.device_id.as_str())
        .bind(&hello.firmware)
        .bind(labels)
        .bind(now_ms)
        .fetch_one(&mut *self.tx)
        .await?;
        Ok((DeviceKey(id), acked as u64))
    }

    pub async fn device_acked_seq(&mut self, device: DeviceKey) -> Result<u64, StoreError> {
        let acked: i64 = sqlx::query_scalar("SELECT acked_seq FROM devices WHERE id = ?")
            .bind(device.0)
            .fetch_one(&mut *self.tx)
            .await?;
        Ok(acked as u64)
    }

    /// The sensor's key, adding it to the dictionary if new.
    pub async fn sensor_key(&mut self, name: &str) -> Result<SensorKey, StoreError> {
        let existing: Option<i64> = sqlx::query_scalar("SELECT id FROM sensors WHERE name = ?")
            .bind(name)
            .fetch_optional(&mut *self.tx)
            .await?;
        if let Some(id) = existing {
            return Ok(SensorKey(id));
        }
        let id: i64 = sqlx::query_scalar("INSERT INTO sensors (name) VALUES (?) RETURNING id")
            .bind(name)
            .fetch_one(&mut *self.tx)
            .await?;
        Ok(SensorKey(id))
    }

    pub async fn insert_readings(&mut self, rows: &[RowToInsert]) -> Result<(), StoreError> {
        let mut rest = rows;
        while !rest.is_empty() {
            let n = if rest.len() >= INSERT_CHUNK {
                INSERT_CHUNK
            } else {
                1 << (usize::BITS - 1 - rest.len().leading_zeros())
            };
            let (chunk, tail) = rest.split_at(n);
            let sql = self.insert_sql.entry(n).or_insert_with(|| insert_sql(n));
            let mut query = sqlx::query(sql.as_str());
            for r in chunk {
                query = query
                    .bind(r.device.0)
                    .bind(r.sensor.0)
                    .bind(r.ts_ms)
                    .bind(r.seq)
                    .bind(r.value);
            }
            query.execute(&mut *self.tx).await?;
            rest = tail;
        }
        Ok(())
    }

    /// Moves a device's high-water mark and stored count after its readings.
    pub async fn record_progress(
        &mut self,
        device: DeviceKey,
        acked_seq: u64,
        added: u64,
        now_ms: i64,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE devices SET acked_seq = ?2, reading_count = reading_count + ?3, \
             last_seen_ms = ?4 WHERE id = ?1",
        )
        .bind(device.0)
        .bind(acked_seq as i64)
        .bind(added as i64)
        .bind(now_ms)
        .execute(&mut *self.tx)
        .await?;
        Ok(())
    }
}

fn insert_sql(rows: usize) -> String {
    let mut sql =
        String::from("INSERT INTO readings (device_id, sensor_id, ts_ms, seq, value) VALUES ");
    for i in 0..rows {
        if i > 0 {
            sql.push(',');
        }
        sql.push_str("(?,?,?,?,?)");
    }
    sql
}
