//! Alarm rules, alarms, series states and the webhook outbox: writes for
//! the ingest writer (in its group commit), reads for the operator core and
//! the leader task.

use std::collections::BTreeMap;

use serde::Serialize;

use super::db::{Conn, Val, with_conn, with_pool};
use super::twins::decode_tags;
use super::write::{Batched, WriteTx};
use super::{Store, StoreError};
use crate::alarms::engine::SeriesState;
use crate::alarms::{Alarm, AlarmState, EventKind, Rule, RuleSpec, Severity};
use crate::config::Backend;
use crate::domain::{DeviceKey, SensorKey};

const ALARM_COLS: &str = "id, rule_id, rule_version, rule_name, severity, device_id, device, \
     sensor, state, value, last_value, started_ms, raised_ms, changed_ms, count, acked_ms, \
     acked_by, ack_note, cleared_ms, cleared_by, clear_note";

row_struct! {
    struct AlarmRow {
        id: i64,
        rule_id: i64,
        rule_version: i64,
        rule_name: String,
        severity: String,
        device_id: i64,
        device: String,
        sensor: String,
        state: String,
        value: Option<f64>,
        last_value: Option<f64>,
        started_ms: i64,
        raised_ms: i64,
        changed_ms: i64,
        count: i64,
        acked_ms: Option<i64>,
        acked_by: Option<String>,
        ack_note: Option<String>,
        cleared_ms: Option<i64>,
        cleared_by: Option<String>,
        clear_note: Option<String>,
    }
}

impl AlarmRow {
    fn alarm(self) -> Alarm {
        Alarm {
            id: self.id,
            rule_id: self.rule_id,
            rule_version: self.rule_version as u64,
            rule: self.rule_name,
            severity: Severity::parse(&self.severity).unwrap_or(Severity::Warning),
            device_key: self.device_id,
            device: self.device,
            sensor: self.sensor,
            state: AlarmState::parse(&self.state).unwrap_or(AlarmState::Active),
            value: self.value,
            last_value: self.last_value,
            started_ms: self.started_ms,
            raised_ms: self.raised_ms,
            changed_ms: self.changed_ms,
            count: self.count as u64,
            acked_ms: self.acked_ms,
            acked_by: self.acked_by,
            ack_note: self.ack_note,
            cleared_ms: self.cleared_ms,
            cleared_by: self.cleared_by,
            clear_note: self.clear_note,
        }
    }
}

type RuleRow = (i64, i64, String, i64, i64);

fn decode_rule((id, version, spec, created_ms, updated_ms): RuleRow) -> Option<Rule> {
    // A stored rule was checked when written; one that no longer parses
    // (edited by hand) is skipped rather than failing every read.
    let spec: RuleSpec = serde_json::from_str(&spec).ok()?;
    Some(Rule {
        id,
        version: version as u64,
        created_ms,
        updated_ms,
        spec,
    })
}

/// What the alarm list shows.
#[derive(Debug, Clone, Default)]
pub struct AlarmFilter {
    /// Only these states (all when empty).
    pub states: Vec<AlarmState>,
    pub device: Option<String>,
    pub rule: Option<String>,
    pub severity: Option<Severity>,
    /// Alarms with a smaller id (paging back, newest first).
    pub before: Option<i64>,
    pub limit: u32,
}

row_struct! {
    /// One row of a webhook's delivery log.
    #[derive(Debug, Clone, PartialEq, Serialize)]
    pub struct Delivery {
        pub event_id: i64,
        pub webhook: String,
        pub attempts: i64,
        pub next_ms: i64,
        pub created_ms: i64,
        pub delivered_ms: Option<i64>,
        pub failed_ms: Option<i64>,
        pub last_status: Option<i64>,
        pub last_error: Option<String>,
    }
}

row_struct! {
    /// A delivery that is due, with its event.
    #[derive(Debug, Clone)]
    pub struct DueDelivery {
        pub event_id: i64,
        pub webhook: String,
        pub attempts: i64,
        pub created_ms: i64,
        pub kind: String,
        pub at_ms: i64,
        /// The alarm's JSON as of the event.
        pub body: String,
    }
}

impl DueDelivery {
    /// The notification sent: `{"id", "kind", "at_ms", "alarm"}`.
    pub fn payload(&self) -> String {
        format!(
            "{{\"id\":{},\"kind\":{},\"at_ms\":{},\"alarm\":{}}}",
            self.event_id,
            serde_json::Value::String(self.kind.clone()),
            self.at_ms,
            self.body
        )
    }
}

/// What one delivery attempt came to.
#[derive(Debug, Clone)]
pub struct Attempt {
    pub event_id: i64,
    pub webhook: String,
    pub status: Option<i64>,
    pub error: Option<String>,
    pub delivered: bool,
    /// Not delivered: the next try, or None to give up.
    pub next_ms: Option<i64>,
}

/// A device (or device sensor) an inactivity rule looks at.
#[derive(Debug, Clone)]
pub struct Silent {
    pub device: DeviceKey,
    pub device_id: String,
    pub last_ms: i64,
}

/// Locks the rows a SELECT reads until the commit, on PostgreSQL (a
/// SQLite writer is alone).
fn for_update(backend: Backend) -> &'static str {
    match backend {
        Backend::Sqlite => "",
        Backend::Postgres => " FOR UPDATE",
    }
}

/// `IN (...)` over ids: json_each on SQLite, `= ANY` on PostgreSQL.
fn in_ids(backend: Backend, column: &str, param: usize) -> String {
    match backend {
        Backend::Sqlite => format!("{column} IN (SELECT value FROM json_each(${param}))"),
        Backend::Postgres => format!("{column} = ANY(${param})"),
    }
}

/// [`WriteTx::latest_ts`]'s statement: the newest ts per series of the
/// devices `$1` (which stage into `parts`, and are in `index_parts` of the
/// blocks index, [`super::blocks::index_part`]), from those staging parts
/// and the blocks, one part at a time (the blocks index leads with the
/// part: see [`super::blocks::MERGE_SELECT`]).
pub(super) fn latest_ts_sql(backend: Backend, parts: &[usize], index_parts: &[i64]) -> String {
    let devices = in_ids(backend, "device_id", 1);
    let staged = parts.iter().map(|p| {
        format!(
            "SELECT device_id, sensor_id, max(ts_ms) AS t FROM {} WHERE {devices} \
             GROUP BY device_id, sensor_id",
            super::write::staging_table(*p),
        )
    });
    let blocks = index_parts.iter().map(|p| {
        format!(
            "SELECT device_id, sensor_id, max(last_ts) AS t FROM blocks \
             WHERE device_id % 8 = {p} AND {devices} GROUP BY device_id, sensor_id"
        )
    });
    let selects: Vec<String> = staged.chain(blocks).collect();
    format!(
        "SELECT device_id, sensor_id, max(t) FROM ({}) x GROUP BY device_id, sensor_id",
        selects.join(" UNION ALL ")
    )
}

/// Tags as SQL conditions on `d.tags`, from parameter `first` on: pairs
/// of (key path, value) to bind.
fn tags_sql(
    backend: Backend,
    tags: &BTreeMap<String, String>,
    first: usize,
) -> (String, Vec<String>) {
    let mut sql = String::new();
    let mut vals = Vec::new();
    for (k, v) in tags {
        let (kp, vp) = (first + vals.len(), first + vals.len() + 1);
        match backend {
            Backend::Sqlite => {
                sql.push_str(&format!(" AND json_extract(d.tags, ${kp}) = ${vp}"));
                vals.push(format!(
                    "$.\"{}\"",
                    k.replace('\\', "\\\\").replace('"', "\\\"")
                ));
            }
            Backend::Postgres => {
                sql.push_str(&format!(" AND (d.tags::jsonb ->> ${kp}) = ${vp}"));
                vals.push(k.clone());
            }
        }
        vals.push(v.clone());
    }
    (sql, vals)
}

impl WriteTx<'_> {
    pub async fn load_rules(&mut self) -> Result<Vec<Rule>, StoreError> {
        let rows: Vec<RuleRow> = with_conn!(self.conn.conn(), c => sqlx::query_as(
            "SELECT id, version, spec, created_ms, updated_ms FROM alarm_rules \
             WHERE deleted_ms IS NULL ORDER BY id",
        )
        .fetch_all(c)
        .await?);
        Ok(rows.into_iter().filter_map(decode_rule).collect())
    }

    /// Creates the rule, or replaces the live rule of that name (its
    /// version goes up by one). Pending conditions of a replaced rule start
    /// over; its open alarms stay open and follow the new version.
    /// When what a rule watches changes (its kind, sensor or target), its
    /// open alarms are cleared ("rule changed") and returned: nothing would
    /// ever clear them.
    pub async fn put_rule(
        &mut self,
        spec: &RuleSpec,
        now: i64,
    ) -> Result<(Rule, Vec<Alarm>), StoreError> {
        let text = spec.to_json();
        // Another hub may create or change the same rule at once
        // (PostgreSQL): the row is locked before anything else (the lock
        // order everywhere is rule, series states, alarms), and a
        // concurrent create makes this one an update rather than a
        // failed group.
        let mut old = None;
        // Each pass either finds the live rule or creates it, unless
        // another hub created and deleted it in between.
        for _ in 0..8 {
            old = self.rule_for_update(&spec.name).await?;
            if old.is_some() {
                break;
            }
            let id: Option<i64> = with_conn!(self.conn.conn(), c => sqlx::query_scalar(
                "INSERT INTO alarm_rules (name, version, spec, created_ms, updated_ms) \
                 VALUES ($1, 1, $2, $3, $3) \
                 ON CONFLICT (name) WHERE deleted_ms IS NULL DO NOTHING RETURNING id",
            )
            .bind(&spec.name)
            .bind(&text)
            .bind(now)
            .fetch_optional(c)
            .await?);
            if let Some(id) = id {
                let rule = Rule {
                    id,
                    version: 1,
                    created_ms: now,
                    updated_ms: now,
                    spec: spec.clone(),
                };
                return Ok((rule, Vec::new()));
            }
        }
        let Some((id, version, created_ms, old_spec)) = old else {
            return Err(StoreError::Sqlx(sqlx::Error::RowNotFound));
        };
        let watched = |s: &RuleSpec| {
            (
                s.target.clone(),
                s.sensor().to_owned(),
                s.threshold.is_some(),
                s.rate.is_some(),
                s.inactivity.is_some(),
            )
        };
        let moved = serde_json::from_str::<RuleSpec>(&old_spec)
            .map_or(true, |old| watched(&old) != watched(spec));
        let cleared = if moved {
            self.end_rule(id, "rule changed", now).await?
        } else {
            // Pending conditions start over; series with an open alarm
            // keep their state (it clears the alarm).
            with_conn!(self.conn.conn(), c => sqlx::query(
                "DELETE FROM alarm_series WHERE rule_id = $1 AND NOT EXISTS (SELECT 1 FROM \
                 alarms a WHERE a.rule_id = alarm_series.rule_id \
                 AND a.device_id = alarm_series.device_id AND a.state <> 'cleared')",
            )
            .bind(id)
            .execute(c)
            .await
            .map(|_| ())?);
            Vec::new()
        };
        let version = version + 1;
        with_conn!(self.conn.conn(), c => sqlx::query(
            "UPDATE alarm_rules SET version = $2, spec = $3, updated_ms = $4 WHERE id = $1",
        )
        .bind(id)
        .bind(version)
        .bind(&text)
        .bind(now)
        .execute(c)
        .await
        .map(|_| ())?);
        let rule = Rule {
            id,
            version: version as u64,
            created_ms,
            updated_ms: now,
            spec: spec.clone(),
        };
        Ok((rule, cleared))
    }

    /// When the device (or its sensor) last stored a reading, by the hub's
    /// clock (its first sighting when it never did).
    pub async fn last_reading_ms(
        &mut self,
        device: DeviceKey,
        sensor: &str,
    ) -> Result<Option<i64>, StoreError> {
        // The device's slice of SQLite's progress logs alone: this runs in
        // the writer's transaction, once per device an inactivity op raises.
        let backend = self.conn.backend();
        let sql = format!(
            "SELECT CASE WHEN $2 = '' THEN COALESCE(m.last_reading_ms, d.first_seen_ms) \
             ELSE COALESCE((SELECT ds.last_reading_ms FROM {sensors} ds \
               JOIN sensors n ON n.id = ds.sensor_id WHERE ds.device_id = d.id AND n.name = $2), \
               m.last_reading_ms, d.first_seen_ms) END \
             FROM devices d JOIN {devices} m ON m.id = d.id WHERE d.id = $1",
            sensors = super::sensor_progress_of(backend, "$1"),
            devices = super::device_progress_of(backend, "$1"),
        );
        Ok(with_conn!(self.conn.conn(), c => sqlx::query_scalar(&sql)
        .bind(device.0)
        .bind(sensor)
        .fetch_optional(c)
        .await?))
    }

    /// Deletes a live rule: its open alarms are cleared (by "rule
    /// deleted") and returned, its series states dropped. None when there
    /// is no such rule.
    pub async fn delete_rule(
        &mut self,
        name: &str,
        now: i64,
    ) -> Result<Option<(Rule, Vec<Alarm>)>, StoreError> {
        let row: Option<RuleRow> = with_conn!(self.conn.conn(), c => sqlx::query_as(
            "UPDATE alarm_rules SET deleted_ms = $2 WHERE name = $1 AND deleted_ms IS NULL \
             RETURNING id, version, spec, created_ms, updated_ms",
        )
        .bind(name)
        .bind(now)
        .fetch_optional(c)
        .await?);
        let Some(rule) = row.and_then(decode_rule) else {
            return Ok(None);
        };
        let cleared = self.end_rule(rule.id, "rule deleted", now).await?;
        Ok(Some((rule, cleared)))
    }

    /// The live rule of that name (id, version, created_ms, spec), locked
    /// on PostgreSQL until the commit.
    async fn rule_for_update(
        &mut self,
        name: &str,
    ) -> Result<Option<(i64, i64, i64, String)>, StoreError> {
        let sql = format!(
            "SELECT id, version, created_ms, spec FROM alarm_rules \
             WHERE name = $1 AND deleted_ms IS NULL{}",
            for_update(self.conn.backend())
        );
        Ok(with_conn!(self.conn.conn(), c => sqlx::query_as(&sql)
            .bind(name)
            .fetch_optional(c)
            .await?))
    }

    /// A rule's series states are dropped and its open alarms cleared
    /// (`by`), in that order (the lock order of the evaluator, which
    /// writes states before alarms: no deadlock with another hub's
    /// group); the cleared alarms.
    async fn end_rule(&mut self, rule: i64, by: &str, now: i64) -> Result<Vec<Alarm>, StoreError> {
        with_conn!(self.conn.conn(), c => sqlx::query("DELETE FROM alarm_series WHERE rule_id = $1")
            .bind(rule)
            .execute(c)
            .await
            .map(|_| ())?);
        let sql = format!(
            "UPDATE alarms SET state = 'cleared', cleared_ms = $2, cleared_by = $3, \
             changed_ms = $2 WHERE rule_id = $1 AND state <> 'cleared' RETURNING {ALARM_COLS}"
        );
        let rows: Vec<AlarmRow> = with_conn!(self.conn.conn(), c => sqlx::query_as(&sql)
            .bind(rule)
            .bind(now)
            .bind(by)
            .fetch_all(c)
            .await?);
        Ok(rows.into_iter().map(AlarmRow::alarm).collect())
    }

    /// Devices' external ids and tags.
    pub async fn device_tags(
        &mut self,
        devices: &[DeviceKey],
    ) -> Result<Vec<(DeviceKey, String, BTreeMap<String, String>)>, StoreError> {
        if devices.is_empty() {
            return Ok(Vec::new());
        }
        let sql = format!(
            "SELECT id, external_id, tags FROM devices WHERE {}",
            in_ids(self.conn.backend(), "id", 1)
        );
        let keys: Vec<i64> = devices.iter().map(|d| d.0).collect();
        let rows: Vec<(i64, String, String)> = match self.conn.conn() {
            Conn::Postgres(c) => sqlx::query_as(&sql).bind(&keys).fetch_all(c).await?,
            Conn::Sqlite(c) => {
                sqlx::query_as(&sql)
                    .bind(serde_json::to_string(&keys).unwrap_or_default())
                    .fetch_all(c)
                    .await?
            }
        };
        Ok(rows
            .into_iter()
            .map(|(id, ext, tags)| (DeviceKey(id), ext, decode_tags(&tags)))
            .collect())
    }

    /// The newest stored reading's ts of each series of these devices.
    pub async fn latest_ts(
        &mut self,
        devices: &[DeviceKey],
    ) -> Result<Vec<(DeviceKey, SensorKey, i64)>, StoreError> {
        if devices.is_empty() {
            return Ok(Vec::new());
        }
        let backend = self.conn.backend();
        // Only the staging parts these devices stage into (they have no
        // index: each is scanned), and the blocks of those parts.
        let mut parts: Vec<usize> = devices
            .iter()
            .map(|d| super::write::staging_part(*d))
            .collect();
        parts.sort_unstable();
        parts.dedup();
        let mut index_parts: Vec<i64> = devices
            .iter()
            .map(|d| super::blocks::index_part(d.0))
            .collect();
        index_parts.sort_unstable();
        index_parts.dedup();
        let sql = latest_ts_sql(backend, &parts, &index_parts);
        let keys: Vec<i64> = devices.iter().map(|d| d.0).collect();
        let rows: Vec<(i64, i64, Option<i64>)> = match self.conn.conn() {
            Conn::Postgres(c) => sqlx::query_as(&sql).bind(&keys).fetch_all(c).await?,
            Conn::Sqlite(c) => {
                sqlx::query_as(&sql)
                    .bind(serde_json::to_string(&keys).unwrap_or_default())
                    .fetch_all(c)
                    .await?
            }
        };
        Ok(rows
            .into_iter()
            .filter_map(|(d, s, t)| Some((DeviceKey(d), SensorKey(s), t?)))
            .collect())
    }

    /// The stored series states of these devices.
    pub async fn load_series(
        &mut self,
        devices: &[DeviceKey],
    ) -> Result<Vec<(i64, DeviceKey, SensorKey, SeriesState)>, StoreError> {
        if devices.is_empty() {
            return Ok(Vec::new());
        }
        let sql = format!(
            "SELECT rule_id, device_id, sensor_id, state FROM alarm_series WHERE {}",
            in_ids(self.conn.backend(), "device_id", 1)
        );
        let keys: Vec<i64> = devices.iter().map(|d| d.0).collect();
        let rows: Vec<(i64, i64, i64, String)> = match self.conn.conn() {
            Conn::Postgres(c) => sqlx::query_as(&sql).bind(&keys).fetch_all(c).await?,
            Conn::Sqlite(c) => {
                sqlx::query_as(&sql)
                    .bind(serde_json::to_string(&keys).unwrap_or_default())
                    .fetch_all(c)
                    .await?
            }
        };
        Ok(rows
            .into_iter()
            .map(|(r, d, s, state)| {
                (
                    r,
                    DeviceKey(d),
                    SensorKey(s),
                    serde_json::from_str(&state).unwrap_or_default(),
                )
            })
            .collect())
    }

    /// Writes series states (Some: the state's JSON) and deletes idle
    /// ones (None), many to a statement.
    pub async fn write_series(
        &mut self,
        writes: &[(i64, DeviceKey, SensorKey, Option<String>)],
    ) -> Result<(), StoreError> {
        let upserts: Vec<(i64, i64, i64, &str)> = writes
            .iter()
            .filter_map(|(r, d, s, t)| Some((*r, d.0, s.0, t.as_deref()?)))
            .collect();
        let deletes: Vec<(i64, i64, i64)> = writes
            .iter()
            .filter(|w| w.3.is_none())
            .map(|(r, d, s, _)| (*r, d.0, s.0))
            .collect();
        self.execute_batched(Batched::SeriesUpsert, &upserts, |(r, d, s, t), out| {
            out.extend([Val::I(*r), Val::I(*d), Val::I(*s), Val::T(t)]);
        })
        .await?;
        self.execute_batched(Batched::SeriesDelete, &deletes, |(r, d, s), out| {
            out.extend([Val::I(*r), Val::I(*d), Val::I(*s)]);
        })
        .await
    }

    /// Writes a series state, or deletes it when idle.
    pub async fn save_series(
        &mut self,
        rule: i64,
        device: DeviceKey,
        sensor: SensorKey,
        state: &SeriesState,
    ) -> Result<(), StoreError> {
        if state.idle() {
            with_conn!(self.conn.conn(), c => sqlx::query(
                "DELETE FROM alarm_series WHERE device_id = $1 AND rule_id = $2 AND sensor_id = $3",
            )
            .bind(device.0)
            .bind(rule)
            .bind(sensor.0)
            .execute(c)
            .await
            .map(|_| ())?);
        } else {
            let text = serde_json::to_string(state).unwrap_or_default();
            with_conn!(self.conn.conn(), c => sqlx::query(
                "INSERT INTO alarm_series (rule_id, device_id, sensor_id, state) VALUES ($1, $2, $3, $4) \
                 ON CONFLICT (device_id, rule_id, sensor_id) DO UPDATE SET state = excluded.state",
            )
            .bind(rule)
            .bind(device.0)
            .bind(sensor.0)
            .bind(text)
            .execute(c)
            .await
            .map(|_| ())?);
        }
        Ok(())
    }

    /// Raises an alarm, or, when one of the series is open already, counts
    /// a re-trigger on it (`only_new`: leaves it alone and returns None).
    /// None too when `rule` is not the live version of the rule.
    #[allow(clippy::too_many_arguments)]
    pub async fn raise_alarm(
        &mut self,
        rule: &Rule,
        device: DeviceKey,
        device_id: &str,
        sensor: &str,
        value: Option<f64>,
        since: i64,
        at: i64,
        only_new: bool,
    ) -> Result<Option<Alarm>, StoreError> {
        let on_conflict = if only_new {
            "DO NOTHING"
        } else {
            "DO UPDATE SET count = alarms.count + 1, last_value = excluded.last_value, \
             changed_ms = excluded.changed_ms"
        };
        // Only under the rule's live version: a writer whose rules are up
        // to 2 s old (PostgreSQL, another hub changed or deleted the rule)
        // raises nothing for what the rule no longer is.
        let sql = format!(
            "INSERT INTO alarms (rule_id, rule_version, rule_name, severity, device_id, device, \
             sensor, state, value, last_value, started_ms, raised_ms, changed_ms, count) \
             SELECT $1, $2, $3, $4, $5, $6, $7, 'active', $8, $8, $9, $10, $10, 1 \
             WHERE EXISTS (SELECT 1 FROM alarm_rules r WHERE r.id = $1 AND r.version = $2 \
             AND r.deleted_ms IS NULL) \
             ON CONFLICT (rule_id, device_id, sensor) WHERE state <> 'cleared' {on_conflict} \
             RETURNING {ALARM_COLS}"
        );
        let row: Option<AlarmRow> = with_conn!(self.conn.conn(), c => sqlx::query_as(&sql)
            .bind(rule.id)
            .bind(rule.version as i64)
            .bind(&rule.spec.name)
            .bind(rule.spec.severity.as_str())
            .bind(device.0)
            .bind(device_id)
            .bind(sensor)
            .bind(value)
            .bind(since)
            .bind(at)
            .fetch_optional(c)
            .await?);
        Ok(row.map(AlarmRow::alarm))
    }

    /// Counts a re-trigger of the series' open alarm.
    pub async fn retrigger_alarm(
        &mut self,
        rule: i64,
        device: DeviceKey,
        sensor: &str,
        value: f64,
        at: i64,
    ) -> Result<Option<Alarm>, StoreError> {
        let sql = format!(
            "UPDATE alarms SET count = count + 1, last_value = $4, changed_ms = $5 \
             WHERE rule_id = $1 AND device_id = $2 AND sensor = $3 AND state <> 'cleared' \
             RETURNING {ALARM_COLS}"
        );
        let row: Option<AlarmRow> = with_conn!(self.conn.conn(), c => sqlx::query_as(&sql)
            .bind(rule)
            .bind(device.0)
            .bind(sensor)
            .bind(value)
            .bind(at)
            .fetch_optional(c)
            .await?);
        Ok(row.map(AlarmRow::alarm))
    }

    /// Clears the series' open alarm because its rule says so.
    pub async fn clear_alarm_by_rule(
        &mut self,
        rule: i64,
        device: DeviceKey,
        sensor: &str,
        value: Option<f64>,
        at: i64,
    ) -> Result<Option<Alarm>, StoreError> {
        let sql = format!(
            "UPDATE alarms SET state = 'cleared', last_value = COALESCE($4, last_value), \
             changed_ms = $5, cleared_ms = $5, cleared_by = 'rule' \
             WHERE rule_id = $1 AND device_id = $2 AND sensor = $3 AND state <> 'cleared' \
             RETURNING {ALARM_COLS}"
        );
        let row: Option<AlarmRow> = with_conn!(self.conn.conn(), c => sqlx::query_as(&sql)
            .bind(rule)
            .bind(device.0)
            .bind(sensor)
            .bind(value)
            .bind(at)
            .fetch_optional(c)
            .await?);
        Ok(row.map(AlarmRow::alarm))
    }

    pub async fn alarm(&mut self, id: i64) -> Result<Option<Alarm>, StoreError> {
        let sql = format!("SELECT {ALARM_COLS} FROM alarms WHERE id = $1");
        let row: Option<AlarmRow> = with_conn!(self.conn.conn(), c => sqlx::query_as(&sql)
            .bind(id)
            .fetch_optional(c)
            .await?);
        Ok(row.map(AlarmRow::alarm))
    }

    /// An operator acknowledges an active alarm; None when it is not
    /// active (any more).
    pub async fn ack_alarm(
        &mut self,
        id: i64,
        by: &str,
        note: &str,
        now: i64,
    ) -> Result<Option<Alarm>, StoreError> {
        self.operator_change(
            id,
            "state = 'acknowledged', acked_ms = $2, acked_by = $3, ack_note = $4",
            "state = 'active'",
            by,
            note,
            now,
        )
        .await
    }

    /// An operator's change of one alarm (`set` and `only_if` take the
    /// time as $2, the operator as $3, the note as $4); None when
    /// `only_if` does not hold.
    async fn operator_change(
        &mut self,
        id: i64,
        set: &str,
        only_if: &str,
        by: &str,
        note: &str,
        now: i64,
    ) -> Result<Option<Alarm>, StoreError> {
        let sql = format!(
            "UPDATE alarms SET {set}, changed_ms = $2 WHERE id = $1 AND {only_if} \
             RETURNING {ALARM_COLS}"
        );
        let row: Option<AlarmRow> = with_conn!(self.conn.conn(), c => sqlx::query_as(&sql)
            .bind(id)
            .bind(now)
            .bind(by)
            .bind(note)
            .fetch_optional(c)
            .await?);
        Ok(row.map(AlarmRow::alarm))
    }

    /// An operator clears an open alarm; its series starts over (the
    /// condition must hold for its time again to raise another). None when
    /// it is cleared already.
    pub async fn clear_alarm_by_operator(
        &mut self,
        id: i64,
        by: &str,
        note: &str,
        now: i64,
    ) -> Result<Option<Alarm>, StoreError> {
        // The series state is locked before the alarm, the evaluator's
        // order (it may be running on another hub, PostgreSQL).
        let Some(open) = self.alarm(id).await? else {
            return Ok(None);
        };
        if open.state == AlarmState::Cleared {
            return Ok(None);
        }
        let sql = format!(
            "SELECT s.sensor_id, s.state FROM alarm_series s JOIN sensors n ON n.id = s.sensor_id \
             WHERE s.device_id = $1 AND s.rule_id = $2 AND n.name = $3{}",
            match self.conn.backend() {
                Backend::Sqlite => "",
                Backend::Postgres => " FOR UPDATE OF s",
            }
        );
        let state: Option<(i64, String)> = with_conn!(self.conn.conn(), c => sqlx::query_as(&sql)
            .bind(open.device_key)
            .bind(open.rule_id)
            .bind(&open.sensor)
            .fetch_optional(c)
            .await?);
        let cleared = self
            .operator_change(
                id,
                "state = 'cleared', cleared_ms = $2, cleared_by = $3, clear_note = $4",
                "state <> 'cleared'",
                by,
                note,
                now,
            )
            .await?;
        let Some(alarm) = cleared else {
            return Ok(None);
        };
        if let Some((sensor, text)) = state {
            let mut s: SeriesState = serde_json::from_str(&text).unwrap_or_default();
            s.operator_cleared();
            self.save_series(
                alarm.rule_id,
                DeviceKey(alarm.device_key),
                SensorKey(sensor),
                &s,
            )
            .await?;
        }
        Ok(Some(alarm))
    }

    /// Records an alarm's change and queues it for every webhook; the
    /// event's id.
    pub async fn add_event(
        &mut self,
        alarm: &Alarm,
        kind: EventKind,
        at_ms: i64,
        webhooks: &[std::sync::Arc<str>],
        now: i64,
    ) -> Result<i64, StoreError> {
        let body = serde_json::to_string(alarm).unwrap_or_default();
        let id: i64 = with_conn!(self.conn.conn(), c => sqlx::query_scalar(
            "INSERT INTO alarm_events (alarm_id, kind, at_ms, body) VALUES ($1, $2, $3, $4) RETURNING id",
        )
        .bind(alarm.id)
        .bind(kind.as_str())
        .bind(at_ms)
        .bind(body)
        .fetch_one(c)
        .await?);
        for hook in webhooks {
            with_conn!(self.conn.conn(), c => sqlx::query(
                "INSERT INTO webhook_deliveries (event_id, webhook, next_ms, created_ms) \
                 VALUES ($1, $2, $3, $3)",
            )
            .bind(id)
            .bind(&**hook)
            .bind(now)
            .execute(c)
            .await
            .map(|_| ())?);
        }
        Ok(id)
    }

    /// Records delivery attempts.
    pub async fn record_attempts(
        &mut self,
        attempts: &[Attempt],
        now: i64,
    ) -> Result<(), StoreError> {
        for a in attempts {
            let (delivered, failed) = match (a.delivered, a.next_ms) {
                (true, _) => (Some(now), None),
                (false, None) => (None, Some(now)),
                (false, Some(_)) => (None, None),
            };
            with_conn!(self.conn.conn(), c => sqlx::query(
                "UPDATE webhook_deliveries SET attempts = attempts + 1, last_status = $3, \
                 last_error = $4, delivered_ms = $5, failed_ms = $6, next_ms = $7 \
                 WHERE event_id = $1 AND webhook = $2 AND delivered_ms IS NULL",
            )
            .bind(a.event_id)
            .bind(&a.webhook)
            .bind(a.status)
            .bind(a.error.as_deref())
            .bind(delivered)
            .bind(failed)
            .bind(a.next_ms.unwrap_or(now))
            .execute(c)
            .await
            .map(|_| ())?);
        }
        Ok(())
    }

    /// Deletes alarms cleared before `cutoff` with their events, and
    /// delivery rows finished before it; how many alarms.
    pub async fn prune_alarms(&mut self, cutoff: i64, limit: u32) -> Result<u64, StoreError> {
        let ids: Vec<i64> = with_conn!(self.conn.conn(), c => sqlx::query_scalar(
            "SELECT id FROM alarms WHERE cleared_ms IS NOT NULL AND cleared_ms < $1 \
             AND state = 'cleared' AND NOT EXISTS (SELECT 1 FROM alarm_events e \
             JOIN webhook_deliveries w ON w.event_id = e.id WHERE e.alarm_id = alarms.id \
             AND w.delivered_ms IS NULL AND w.failed_ms IS NULL) \
             ORDER BY cleared_ms LIMIT $2",
        )
        .bind(cutoff)
        .bind(i64::from(limit))
        .fetch_all(c)
        .await?);
        let backend = self.conn.backend();
        let json = serde_json::to_string(&ids).unwrap_or_default();
        for (table, column) in [("alarm_events", "alarm_id"), ("alarms", "id")] {
            let sql = format!("DELETE FROM {table} WHERE {}", in_ids(backend, column, 1));
            match self.conn.conn() {
                Conn::Postgres(c) => {
                    sqlx::query(&sql).bind(&ids).execute(c).await?;
                }
                Conn::Sqlite(c) => {
                    sqlx::query(&sql).bind(&json).execute(c).await?;
                }
            }
        }
        with_conn!(self.conn.conn(), c => sqlx::query(
            "DELETE FROM webhook_deliveries WHERE COALESCE(delivered_ms, failed_ms) < $1",
        )
        .bind(cutoff)
        .execute(c)
        .await
        .map(|_| ())?);
        Ok(ids.len() as u64)
    }
}

impl Store {
    pub async fn alarm_rules(&self) -> Result<Vec<Rule>, StoreError> {
        let rows: Vec<RuleRow> = with_pool!(&self.read, pool, _Db => sqlx::query_as(
            "SELECT id, version, spec, created_ms, updated_ms FROM alarm_rules \
             WHERE deleted_ms IS NULL ORDER BY name",
        )
        .fetch_all(pool)
        .await?);
        Ok(rows.into_iter().filter_map(decode_rule).collect())
    }

    pub async fn alarms(&self, f: &AlarmFilter) -> Result<Vec<Alarm>, StoreError> {
        let mut sql = format!("SELECT {ALARM_COLS} FROM alarms WHERE 1 = 1");
        let mut texts: Vec<String> = Vec::new();
        let mut n = 0;
        let mut p = |sql: &mut String, cond: &str| {
            n += 1;
            sql.push_str(&cond.replace('?', &format!("${n}")));
        };
        if !f.states.is_empty() {
            let list: Vec<String> = f
                .states
                .iter()
                .map(|s| format!("'{}'", s.as_str()))
                .collect();
            sql.push_str(&format!(" AND state IN ({})", list.join(", ")));
        }
        if let Some(d) = &f.device {
            p(&mut sql, " AND device = ?");
            texts.push(d.clone());
        }
        if let Some(r) = &f.rule {
            p(&mut sql, " AND rule_name = ?");
            texts.push(r.clone());
        }
        if let Some(s) = f.severity {
            p(&mut sql, " AND severity = ?");
            texts.push(s.as_str().to_owned());
        }
        let before = f.before.unwrap_or(i64::MAX);
        p(&mut sql, " AND id < ?");
        p(&mut sql, " ORDER BY id DESC LIMIT ?");
        let rows: Vec<AlarmRow> = with_pool!(&self.read, pool, _Db => {
            let mut q = sqlx::query_as(&sql);
            for t in &texts {
                q = q.bind(t);
            }
            q.bind(before).bind(i64::from(f.limit)).fetch_all(pool).await?
        });
        Ok(rows.into_iter().map(AlarmRow::alarm).collect())
    }

    pub async fn alarm(&self, id: i64) -> Result<Option<Alarm>, StoreError> {
        let sql = format!("SELECT {ALARM_COLS} FROM alarms WHERE id = $1");
        let row: Option<AlarmRow> = with_pool!(&self.read, pool, _Db => sqlx::query_as(&sql)
            .bind(id)
            .fetch_optional(pool)
            .await?);
        Ok(row.map(AlarmRow::alarm))
    }

    /// An alarm's history: (event id, kind, at_ms), oldest first.
    pub async fn alarm_history(&self, id: i64) -> Result<Vec<(i64, String, i64)>, StoreError> {
        Ok(with_pool!(&self.read, pool, _Db => sqlx::query_as(
            "SELECT id, kind, at_ms FROM alarm_events WHERE alarm_id = $1 ORDER BY id",
        )
        .bind(id)
        .fetch_all(pool)
        .await?))
    }

    /// Open alarms per device: (device, count, most severe).
    pub async fn open_alarm_counts(&self) -> Result<Vec<(String, u64, Severity)>, StoreError> {
        let rows: Vec<(String, String, i64)> = with_pool!(&self.read, pool, _Db => sqlx::query_as(
            "SELECT device, severity, count(*) FROM alarms WHERE state <> 'cleared' \
             GROUP BY device, severity",
        )
        .fetch_all(pool)
        .await?);
        let mut out: BTreeMap<String, (u64, Severity)> = BTreeMap::new();
        for (device, sev, n) in rows {
            let sev = Severity::parse(&sev).unwrap_or(Severity::Warning);
            let e = out.entry(device).or_insert((0, sev));
            e.0 += n as u64;
            e.1 = e.1.min(sev);
        }
        Ok(out.into_iter().map(|(d, (n, s))| (d, n, s)).collect())
    }

    /// A webhook's delivery log, newest first.
    pub async fn deliveries(&self, webhook: &str, limit: u32) -> Result<Vec<Delivery>, StoreError> {
        Ok(with_pool!(&self.read, pool, _Db => sqlx::query_as(
            "SELECT event_id, webhook, attempts, next_ms, created_ms, delivered_ms, failed_ms, \
             last_status, last_error FROM webhook_deliveries WHERE webhook = $1 \
             ORDER BY event_id DESC LIMIT $2",
        )
        .bind(webhook)
        .bind(i64::from(limit))
        .fetch_all(pool)
        .await?))
    }

    /// Deliveries due by `now`, oldest event first.
    pub async fn due_deliveries(
        &self,
        now: i64,
        limit: u32,
    ) -> Result<Vec<DueDelivery>, StoreError> {
        Ok(with_pool!(&self.read, pool, _Db => sqlx::query_as(
            "SELECT w.event_id, w.webhook, w.attempts, w.created_ms, e.kind, e.at_ms, e.body \
             FROM webhook_deliveries w JOIN alarm_events e ON e.id = w.event_id \
             WHERE w.delivered_ms IS NULL AND w.failed_ms IS NULL AND w.next_ms <= $1 \
             ORDER BY w.event_id LIMIT $2",
        )
        .bind(now)
        .bind(i64::from(limit))
        .fetch_all(pool)
        .await?))
    }

    /// The next time a pending delivery is due, if any.
    pub async fn next_delivery_ms(&self) -> Result<Option<i64>, StoreError> {
        Ok(with_pool!(&self.read, pool, _Db => sqlx::query_scalar(
            "SELECT min(w.next_ms) FROM webhook_deliveries w \
             JOIN alarm_events e ON e.id = w.event_id \
             WHERE w.delivered_ms IS NULL AND w.failed_ms IS NULL",
        )
        .fetch_one(pool)
        .await?))
    }

    /// Devices an inactivity rule targets that stored no reading (of
    /// `sensor`, when given) since `cutoff` (a device that never sent one
    /// counts from when it was first seen).
    pub async fn silent_devices(
        &self,
        rule: &RuleSpec,
        sensor: Option<&str>,
        cutoff: i64,
    ) -> Result<Vec<Silent>, StoreError> {
        let backend = self.backend();
        let (from, last) = match sensor {
            Some(_) => (
                "devices d JOIN device_progress m ON m.id = d.id \
                 JOIN sensor_progress ds ON ds.device_id = d.id \
                 JOIN sensors n ON n.id = ds.sensor_id AND n.name = $2",
                "COALESCE(ds.last_reading_ms, m.last_reading_ms, d.first_seen_ms)",
            ),
            None => (
                "devices d JOIN device_progress m ON m.id = d.id",
                "COALESCE(m.last_reading_ms, d.first_seen_ms)",
            ),
        };
        let mut sql = format!(
            "SELECT d.id, d.external_id, {last} FROM {from} \
             WHERE d.removed_ms IS NULL AND {last} <= $1"
        );
        let mut texts: Vec<String> = vec![sensor.unwrap_or("").to_owned()];
        if let Some(dev) = &rule.target.device {
            sql.push_str(&format!(" AND d.external_id = ${}", texts.len() + 2));
            texts.push(dev.clone());
        }
        let (tag_sql, tag_vals) = tags_sql(backend, &rule.target.tags, texts.len() + 2);
        sql.push_str(&tag_sql);
        texts.extend(tag_vals);
        if sensor.is_none() {
            // $2 is bound either way; keep it used.
            sql.push_str(" AND $2 = ''");
        }
        let rows: Vec<(i64, String, i64)> = with_pool!(&self.read, pool, _Db => {
            let mut q = sqlx::query_as(&sql).bind(cutoff);
            for t in &texts {
                q = q.bind(t);
            }
            q.fetch_all(pool).await?
        });
        Ok(rows
            .into_iter()
            .map(|(id, ext, last_ms)| Silent {
                device: DeviceKey(id),
                device_id: ext,
                last_ms,
            })
            .collect())
    }

    /// An inactivity rule's open alarms, with when their device (sensor)
    /// last stored a reading; a removed device's shows as now.
    pub async fn open_inactivity(
        &self,
        rule_id: i64,
        now: i64,
    ) -> Result<Vec<(DeviceKey, String, i64)>, StoreError> {
        Ok(
            with_pool!(&self.read, pool, _Db => sqlx::query_as::<_, (i64, String, i64)>(
            "SELECT a.device_id, a.sensor, CASE WHEN d.removed_ms IS NOT NULL THEN $2 \
             WHEN a.sensor = '' THEN COALESCE(m.last_reading_ms, d.first_seen_ms) \
             ELSE COALESCE((SELECT ds.last_reading_ms FROM sensor_progress ds \
               JOIN sensors n ON n.id = ds.sensor_id \
               WHERE ds.device_id = a.device_id AND n.name = a.sensor), \
               m.last_reading_ms, d.first_seen_ms) END \
             FROM alarms a JOIN devices d ON d.id = a.device_id \
             JOIN device_progress m ON m.id = d.id \
             WHERE a.rule_id = $1 AND a.state <> 'cleared'",
        )
        .bind(rule_id)
        .bind(now)
        .fetch_all(pool)
        .await?)
            .into_iter()
            .map(|(d, s, t)| (DeviceKey(d), s, t))
            .collect(),
        )
    }

    /// PostgreSQL: takes or renews the lease `name` for `holder` until
    /// `now + ttl_ms`; whether `holder` has it. SQLite: always (one
    /// process holds the file).
    pub async fn lease(
        &self,
        name: &str,
        holder: &str,
        now: i64,
        ttl_ms: i64,
    ) -> Result<bool, StoreError> {
        let super::db::Pool::Postgres(pool) = &self.read else {
            return Ok(true);
        };
        // The database's clock, not each hub's: hubs whose clocks differ
        // still agree on when a lease ran out.
        let _ = now;
        let got: Option<String> = sqlx::query_scalar(
            "WITH t AS (SELECT (extract(epoch FROM clock_timestamp()) * 1000)::bigint AS now) \
             INSERT INTO leases (name, holder, expires_ms) SELECT $1, $2, t.now + $3 FROM t \
             ON CONFLICT (name) DO UPDATE SET holder = excluded.holder, expires_ms = excluded.expires_ms \
             WHERE leases.holder = excluded.holder \
             OR leases.expires_ms < (extract(epoch FROM clock_timestamp()) * 1000)::bigint \
             RETURNING holder",
        )
        .bind(name)
        .bind(holder)
        .bind(ttl_ms)
        .fetch_optional(pool)
        .await?;
        Ok(got.as_deref() == Some(holder))
    }

    /// PostgreSQL: gives the lease up (a stopping hub), so another takes it
    /// at once.
    pub async fn release(&self, name: &str, holder: &str) -> Result<(), StoreError> {
        if let super::db::Pool::Postgres(pool) = &self.read {
            sqlx::query("DELETE FROM leases WHERE name = $1 AND holder = $2")
                .bind(name)
                .bind(holder)
                .execute(pool)
                .await?;
        }
        Ok(())
    }
}
