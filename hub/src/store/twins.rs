//! Twins and tags: reads for the operator core, writes for the ingest
//! writer, and fleet filters as SQL.
//!
//! Documents are TEXT on SQLite and jsonb on PostgreSQL (so a filter reads
//! a path without parsing text per row); both hold the compact JSON text
//! `twin::doc::encode` makes.

use std::collections::BTreeMap;

use super::db::{Conn, Val, bind_vals, with_conn, with_pool};
use super::write::{Batched, WriteTx, chunks};
use super::{Store, StoreError};
use crate::config::Backend;
use crate::domain::DeviceKey;
use crate::twin::filter::{Clause, Field, Filter, Literal, Op, Test};
use crate::twin::{Twin, TwinPart, TwinView, doc};

/// The channel on which PostgreSQL hubs announce twin changes:
/// `{hub} {part} {device_id}`.
pub const TWINS_CHANNEL: &str = "hub_twins";

/// A twin change another hub announced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TwinNotice {
    pub hub: String,
    pub part: TwinPart,
    pub device_id: String,
}

impl TwinNotice {
    pub fn payload(&self) -> String {
        format!("{} {} {}", self.hub, self.part.as_str(), self.device_id)
    }

    pub fn parse(payload: &str) -> Option<Self> {
        let mut parts = payload.splitn(3, ' ');
        Some(Self {
            hub: parts.next()?.to_owned(),
            part: TwinPart::parse(parts.next()?)?,
            device_id: parts.next()?.to_owned(),
        })
    }
}

/// The twin columns, read as text on both backends, after `d.external_id,
/// d.tags`; `t` is the twins row (NULLs when it has none yet).
pub(super) fn twin_columns(backend: Backend) -> &'static str {
    match backend {
        Backend::Sqlite => {
            "t.desired, t.desired_meta, t.desired_version, t.reported, t.reported_meta, \
             t.reported_version, t.reported_seq"
        }
        Backend::Postgres => {
            "t.desired::text, t.desired_meta::text, t.desired_version, t.reported::text, \
             t.reported_meta::text, t.reported_version, t.reported_seq"
        }
    }
}

type TwinRow = (
    i64,
    String,
    String,
    Option<String>,
    Option<String>,
    Option<i64>,
    Option<String>,
    Option<String>,
    Option<i64>,
    Option<i64>,
);

fn decode_row(row: TwinRow) -> (DeviceKey, TwinView) {
    let (id, external_id, tags, desired, desired_meta, dv, reported, reported_meta, rv, rseq) = row;
    let text = |t: Option<String>| t.as_deref().map(doc::decode).unwrap_or_default();
    let twin = Twin {
        desired: text(desired),
        desired_meta: text(desired_meta),
        desired_version: dv.unwrap_or(0) as u64,
        reported: text(reported),
        reported_meta: text(reported_meta),
        reported_version: rv.unwrap_or(0) as u64,
        reported_seq: rseq.unwrap_or(0) as u64,
    };
    (
        DeviceKey(id),
        TwinView {
            device_id: external_id,
            tags: decode_tags(&tags),
            twin,
        },
    )
}

/// Tags are written by the hub as a JSON object of strings; a hand-edited
/// bad value shows as no tags rather than failing the read.
pub(super) fn decode_tags(text: &str) -> BTreeMap<String, String> {
    serde_json::from_str(text).unwrap_or_default()
}

pub(super) fn encode_tags(tags: &BTreeMap<String, String>) -> String {
    serde_json::to_string(tags).unwrap_or_else(|_| "{}".into())
}

impl Store {
    /// A device's twin (an empty one at version 0 before its first
    /// change); None for an unknown or removed device.
    pub async fn twin(&self, external_id: &str) -> Result<Option<TwinView>, StoreError> {
        let sql = format!(
            "SELECT d.id, d.external_id, d.tags, {} FROM devices d \
             LEFT JOIN twins t ON t.device_id = d.id \
             WHERE d.external_id = $1 AND d.removed_ms IS NULL",
            twin_columns(self.backend())
        );
        let row: Option<TwinRow> = with_pool!(&self.read, pool, _Db => {
            sqlx::query_as(&sql).bind(external_id).fetch_optional(pool).await?
        });
        Ok(row.map(|r| decode_row(r).1))
    }

    /// Devices (not removed) whose twin's delta is not empty.
    pub async fn out_of_sync_count(&self) -> Result<u64, StoreError> {
        let n: i64 = with_pool!(&self.read, pool, _Db => {
            sqlx::query_scalar(
                "SELECT count(*) FROM twins t JOIN devices d ON d.id = t.device_id \
                 WHERE t.in_sync = 0 AND d.removed_ms IS NULL",
            )
            .fetch_one(pool)
            .await?
        });
        Ok(n as u64)
    }
}

impl WriteTx<'_> {
    /// A device's tags and twin, for a change in this transaction (its
    /// devices row is locked already on PostgreSQL: the writer locks every
    /// device it changes, in key order, when the group begins). None for an
    /// unknown device.
    pub async fn load_twin(&mut self, device: DeviceKey) -> Result<Option<TwinView>, StoreError> {
        Ok(self
            .load_twins(&[device])
            .await?
            .pop()
            .map(|(_, view)| view))
    }

    /// Many devices' tags and twins, as [`WriteTx::load_twin`] (a
    /// statement per 256): those of unknown devices are left out.
    pub async fn load_twins(
        &mut self,
        devices: &[DeviceKey],
    ) -> Result<Vec<(DeviceKey, TwinView)>, StoreError> {
        let mut out = Vec::with_capacity(devices.len());
        for part in chunks(devices, Batched::TwinsOf.max()) {
            let sql = self.statement(Batched::TwinsOf, part.len());
            let vals: Vec<Val<'_>> = part.iter().map(|d| Val::I(d.0)).collect();
            let rows: Vec<TwinRow> = with_conn!(self.conn.conn(), c => {
                let rows = bind_vals(sqlx::query(&sql), &vals).fetch_all(c).await?;
                rows.iter()
                    .map(<TwinRow as sqlx::FromRow<_>>::from_row)
                    .collect::<Result<Vec<_>, _>>()?
            });
            out.extend(rows.into_iter().map(decode_row));
        }
        Ok(out)
    }

    /// Writes devices' twins (inserting their rows the first time), a
    /// statement per 256.
    pub async fn save_twins(&mut self, twins: &[(DeviceKey, &Twin)]) -> Result<(), StoreError> {
        let encoded: Vec<(i64, [String; 4], [i64; 4])> = twins
            .iter()
            .map(|(device, t)| {
                (
                    device.0,
                    [&t.desired, &t.desired_meta, &t.reported, &t.reported_meta].map(doc::encode),
                    [
                        t.desired_version as i64,
                        t.reported_version as i64,
                        t.reported_seq as i64,
                        i64::from(t.in_sync()),
                    ],
                )
            })
            .collect();
        self.execute_batched(Batched::Twins, &encoded, |(device, docs, n), out| {
            out.extend([
                Val::I(*device),
                Val::T(&docs[0]),
                Val::T(&docs[1]),
                Val::I(n[0]),
                Val::T(&docs[2]),
                Val::T(&docs[3]),
                Val::I(n[1]),
                Val::I(n[2]),
                Val::I(n[3]),
            ]);
        })
        .await
    }

    /// Replaces a device's tags.
    pub async fn set_tags(
        &mut self,
        device: DeviceKey,
        tags: &BTreeMap<String, String>,
    ) -> Result<(), StoreError> {
        with_conn!(self.conn.conn(), c => sqlx::query("UPDATE devices SET tags = $1 WHERE id = $2")
            .bind(encode_tags(tags))
            .bind(device.0)
            .execute(c)
            .await
            .map(|_| ())?);
        Ok(())
    }

    /// PostgreSQL: tells the other hubs, when this transaction commits,
    /// that a device's twin changed (nothing on SQLite).
    pub async fn announce_twin(
        &mut self,
        hub: &str,
        part: TwinPart,
        device_id: &str,
    ) -> Result<(), StoreError> {
        if let Conn::Postgres(c) = self.conn.conn() {
            let notice = TwinNotice {
                hub: hub.to_owned(),
                part,
                device_id: device_id.to_owned(),
            };
            sqlx::query("SELECT pg_notify($1, $2)")
                .bind(TWINS_CHANNEL)
                .bind(notice.payload())
                .execute(c)
                .await?;
        }
        Ok(())
    }
}

/// A fleet filter (but its `online` clauses, which only the registry
/// answers) as a SQL condition on `devices` joined with `twins t`, with
/// its values to bind from parameter `$first` on.
pub(crate) fn filter_sql(filter: &Filter, backend: Backend, first: usize) -> (String, Vec<Text>) {
    let mut sql = Vec::new();
    let mut vals = Vec::new();
    for clause in &filter.clauses {
        if let Some(cond) = clause_sql(clause, backend, first, &mut vals) {
            sql.push(cond);
        }
    }
    if sql.is_empty() {
        return ("1 = 1".into(), vals);
    }
    (sql.join(" AND "), vals)
}

/// A value a filter binds.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Text {
    S(String),
    F(f64),
}

impl Text {
    pub(crate) fn val(&self) -> Val<'_> {
        match self {
            Text::S(s) => Val::T(s),
            Text::F(f) => Val::F(*f),
        }
    }
}

fn clause_sql(
    clause: &Clause,
    backend: Backend,
    first: usize,
    vals: &mut Vec<Text>,
) -> Option<String> {
    let mut bind = |v: Text| {
        vals.push(v);
        format!("${}", first + vals.len() - 1)
    };
    let flag = |column: &str, clause: &Clause| -> String {
        let (op, lit) = match &clause.test {
            Test::Compare(op, lit) => (*op, lit.boolean().unwrap_or(false)),
            Test::Exists => (Op::Eq, true),
        };
        let want = if op == Op::Ne { !lit } else { lit };
        format!("{column} = {}", i64::from(want))
    };
    let (column, path): (&str, Vec<String>) = match &clause.field {
        Field::Online => return None,
        Field::InSync => return Some(flag("COALESCE(t.in_sync, 1)", clause)),
        Field::Tag(key) => ("d.tags", vec![key.clone()]),
        Field::Reported(path) => ("t.reported", path.clone()),
        Field::Desired(path) => ("t.desired", path.clone()),
    };
    let tags = column == "d.tags";
    // Per backend: the JSON type at the path ('text' / 'string', numbers,
    // true / false) and its value as SQL text / number.
    let (kind, as_text, as_num, is_text, is_num, is_true, is_false);
    match backend {
        Backend::Sqlite => {
            let p = bind(Text::S(sqlite_path(&path)));
            kind = format!("json_type({column}, {p})");
            as_text = format!("json_extract({column}, {p})");
            as_num = as_text.clone();
            is_text = "'text'";
            is_num = "('integer', 'real')";
            is_true = "'true'";
            is_false = "'false'";
        }
        Backend::Postgres => {
            let p = bind(Text::S(pg_path(&path)));
            let doc = if tags {
                format!("({column})::jsonb")
            } else {
                column.to_owned()
            };
            kind = format!("jsonb_typeof({doc} #> {p}::text[])");
            as_text = format!("({doc} #>> {p}::text[])");
            as_num = format!(
                "(CASE WHEN jsonb_typeof({doc} #> {p}::text[]) = 'number' \
                 THEN ({doc} #>> {p}::text[])::float8 END)"
            );
            is_text = "'string'";
            is_num = "('number')";
            is_true = "'boolean'";
            is_false = "'boolean'";
        }
    }
    let eq = |lit: &Literal, bind: &mut dyn FnMut(Text) -> String| -> String {
        let mut any = vec![format!(
            "({kind} = {is_text} AND {as_text} = {})",
            bind(Text::S(lit.string().to_owned()))
        )];
        if let Some(n) = lit.number() {
            any.push(format!(
                "({kind} IN {is_num} AND {as_num} = {})",
                bind(Text::F(n))
            ));
        }
        if let Some(b) = lit.boolean() {
            any.push(match backend {
                Backend::Sqlite => format!("{kind} = {}", if b { is_true } else { is_false }),
                Backend::Postgres => format!("({kind} = {is_true} AND {as_text} = '{b}')"),
            });
        }
        format!("COALESCE(({}), FALSE)", any.join(" OR "))
    };
    let cond = match &clause.test {
        Test::Exists => format!("{kind} IS NOT NULL"),
        Test::Compare(Op::Eq, lit) => eq(lit, &mut bind),
        Test::Compare(Op::Ne, lit) => format!("NOT {}", eq(lit, &mut bind)),
        Test::Compare(op, lit) => {
            let n = lit.number().unwrap_or(f64::NAN);
            format!(
                "COALESCE(({kind} IN {is_num} AND {as_num} {op} {}), FALSE)",
                bind(Text::F(n))
            )
        }
    };
    Some(cond)
}

/// `$."a"."b"`: SQLite's JSON path, each key quoted.
fn sqlite_path(path: &[String]) -> String {
    let mut out = String::from("$");
    for key in path {
        out.push_str(".\"");
        out.push_str(&key.replace('\\', "\\\\").replace('"', "\\\""));
        out.push('"');
    }
    out
}

/// `{a,b}`: a PostgreSQL text[] literal, each key quoted.
fn pg_path(path: &[String]) -> String {
    let keys: Vec<String> = path
        .iter()
        .map(|k| format!("\"{}\"", k.replace('\\', "\\\\").replace('"', "\\\"")))
        .collect();
    format!("{{{}}}", keys.join(","))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notices_round_trip() {
        let n = TwinNotice {
            hub: "h1".into(),
            part: TwinPart::Reported,
            device_id: "dev:1".into(),
        };
        assert_eq!(TwinNotice::parse(&n.payload()), Some(n));
        assert_eq!(TwinNotice::parse("h1 bogus d"), None);
    }

    #[test]
    fn paths_quote_their_keys() {
        let path = vec!["a\"b".to_owned(), "c".to_owned()];
        assert_eq!(sqlite_path(&path), "$.\"a\\\"b\".\"c\"");
        assert_eq!(pg_path(&path), "{\"a\\\"b\",\"c\"}");
    }
}
