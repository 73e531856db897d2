//! Table, CSV and JSON-lines output of the client subcommands.

use std::io::{self, Write};

use clap::ValueEnum;
use serde_json::{Map, Value, json};
use telemetry_proto::v1 as pb;

use super::AggArg;

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
pub enum Format {
    Table,
    Csv,
    Json,
}

pub use crate::domain::rfc3339_ms;
use crate::domain::shown;

/// Which aggregate columns a bucketed query prints, in the order asked.
pub struct BucketColumns(Vec<AggArg>);

impl BucketColumns {
    pub fn new(aggs: &[AggArg]) -> Self {
        // count is always a column of its own.
        let mut cols: Vec<AggArg> = Vec::new();
        for a in aggs {
            if *a != AggArg::Count && !cols.contains(a) {
                cols.push(*a);
            }
        }
        Self(cols)
    }

    fn names(&self) -> impl Iterator<Item = &'static str> + '_ {
        self.0.iter().map(|a| match a {
            AggArg::Avg => "avg",
            AggArg::Min => "min",
            AggArg::Max => "max",
            AggArg::Count => "count",
            AggArg::Sum => "sum",
            AggArg::First => "first",
            AggArg::Last => "last",
        })
    }

    fn values<'b>(&'b self, b: &'b pb::BucketRow) -> impl Iterator<Item = Option<f64>> + 'b {
        self.0.iter().map(move |a| match a {
            AggArg::Avg => b.avg,
            AggArg::Min => b.min,
            AggArg::Max => b.max,
            AggArg::Count => Some(b.count as f64),
            AggArg::Sum => b.sum,
            AggArg::First => b.first,
            AggArg::Last => b.last,
        })
    }
}

pub struct QueryPrinter<'a> {
    format: Format,
    device: &'a str,
    bucketed: bool,
    columns: BucketColumns,
}

/// A CSV field for the terminal: control characters shown escaped, then
/// the hub's one CSV rule (quoting, the formula guard).
fn csv_field(s: &str) -> String {
    crate::domain::csv_field(&shown(s)).into_owned()
}

fn num(v: Option<f64>) -> String {
    v.map_or(String::new(), |v| v.to_string())
}

impl<'a> QueryPrinter<'a> {
    pub fn new(format: Format, device: &'a str, bucketed: bool, columns: BucketColumns) -> Self {
        Self {
            format,
            device,
            bucketed,
            columns,
        }
    }

    pub fn header(&self, out: &mut impl Write) -> io::Result<()> {
        let names: Vec<&str> = self.columns.names().collect();
        match (self.format, self.bucketed) {
            (Format::Json, _) => Ok(()),
            (Format::Csv, false) => writeln!(out, "device,sensor,seq,ts,value"),
            (Format::Csv, true) => {
                let mut line = String::from("device,sensor,bucket_start,count");
                for n in &names {
                    line.push(',');
                    line.push_str(n);
                }
                writeln!(out, "{line}")
            }
            (Format::Table, false) => writeln!(
                out,
                "{:<16} {:<14} {:>10} {:<24} {:>14}",
                "DEVICE", "SENSOR", "SEQ", "TS", "VALUE"
            ),
            (Format::Table, true) => {
                let mut line = format!(
                    "{:<16} {:<14} {:<24} {:>8}",
                    "DEVICE", "SENSOR", "BUCKET_START", "COUNT"
                );
                for n in &names {
                    line.push_str(&format!(" {:>12}", n.to_uppercase()));
                }
                writeln!(out, "{line}")
            }
        }
    }

    pub fn row(&self, out: &mut impl Write, r: &pb::ReadingRow) -> io::Result<()> {
        print_reading(
            self.format,
            self.device,
            &r.sensor,
            r.seq,
            r.ts_ms,
            r.value,
            out,
        )
    }

    pub fn bucket(&self, out: &mut impl Write, b: &pb::BucketRow) -> io::Result<()> {
        let start = rfc3339_ms(b.bucket_start_ms);
        match self.format {
            Format::Json => {
                let mut obj = Map::new();
                obj.insert("device".into(), json!(self.device));
                obj.insert("sensor".into(), json!(b.sensor));
                obj.insert("bucket_start".into(), json!(start));
                obj.insert("count".into(), json!(b.count));
                for (name, v) in self.columns.names().zip(self.columns.values(b)) {
                    obj.insert(name.into(), v.map_or(Value::Null, |v| json!(v)));
                }
                writeln!(out, "{}", Value::Object(obj))
            }
            Format::Csv => {
                let mut line = format!(
                    "{},{},{},{}",
                    csv_field(self.device),
                    csv_field(&b.sensor),
                    start,
                    b.count
                );
                for v in self.columns.values(b) {
                    line.push(',');
                    line.push_str(&num(v));
                }
                writeln!(out, "{line}")
            }
            Format::Table => {
                let mut line = format!(
                    "{:<16} {:<14} {:<24} {:>8}",
                    self.device,
                    shown(&b.sensor),
                    start,
                    b.count
                );
                for v in self.columns.values(b) {
                    line.push_str(&format!(
                        " {:>12}",
                        v.map_or(String::new(), |v| format!("{v:.4}"))
                    ));
                }
                writeln!(out, "{line}")
            }
        }
    }
}

pub fn print_devices(
    format: Format,
    devices: &[pb::DeviceInfo],
    out: &mut impl Write,
) -> io::Result<()> {
    match format {
        Format::Json => {
            for d in devices {
                writeln!(
                    out,
                    "{}",
                    json!({
                        "device_id": d.device_id,
                        "online": d.online,
                        "connected_since": d.connected_since_ms.map(rfc3339_ms),
                        "last_seen": rfc3339_ms(d.last_seen_ms),
                        "acked_seq": d.acked_seq,
                        "readings": d.readings,
                        "firmware": d.firmware,
                        "tags": d.labels.iter().collect::<std::collections::BTreeMap<_, _>>(),
                        "in_sync": d.in_sync,
                        "desired_version": d.desired_version,
                        "reported_version": d.reported_version,
                    })
                )?;
            }
        }
        Format::Csv => {
            writeln!(
                out,
                "device_id,online,connected_since,last_seen,acked_seq,readings,firmware"
            )?;
            for d in devices {
                writeln!(
                    out,
                    "{},{},{},{},{},{},{}",
                    csv_field(&d.device_id),
                    d.online,
                    d.connected_since_ms.map(rfc3339_ms).unwrap_or_default(),
                    rfc3339_ms(d.last_seen_ms),
                    d.acked_seq,
                    d.readings,
                    csv_field(&d.firmware)
                )?;
            }
        }
        Format::Table => {
            writeln!(
                out,
                "{:<20} {:<7} {:<26} {:>12} {:>12}  FIRMWARE",
                "DEVICE_ID", "ONLINE", "CONNECTED_SINCE/LAST_SEEN", "ACKED_SEQ", "READINGS",
            )?;
            for d in devices {
                let when = match d.connected_since_ms {
                    Some(since) => rfc3339_ms(since),
                    None => rfc3339_ms(d.last_seen_ms),
                };
                writeln!(
                    out,
                    "{:<20} {:<7} {:<26} {:>12} {:>12}  {}",
                    d.device_id,
                    if d.online { "yes" } else { "no" },
                    when,
                    d.acked_seq,
                    d.readings,
                    shown(&d.firmware)
                )?;
            }
        }
    }
    Ok(())
}

/// A device's new token: shown this once.
pub fn print_credentials(
    format: Format,
    creds: &pb::DeviceCredentials,
    out: &mut impl Write,
) -> io::Result<()> {
    match format {
        Format::Json => writeln!(
            out,
            "{}",
            json!({"device_id": creds.device_id, "token": creds.token})
        ),
        Format::Csv => writeln!(out, "device_id,token\n{},{}", creds.device_id, creds.token),
        Format::Table => writeln!(
            out,
            "device  {}\ntoken   {}\n(shown once: the hub keeps only its SHA-256)",
            creds.device_id, creds.token
        ),
    }
}

pub fn print_stats(format: Format, s: &pb::HubStats, out: &mut impl Write) -> io::Result<()> {
    let fields: [(&str, Value); 18] = [
        ("live_sessions", json!(s.live_sessions)),
        ("live_tasks", json!(s.live_tasks)),
        ("readings_committed", json!(s.readings_committed)),
        ("readings_stored", json!(s.readings_stored)),
        ("duplicates", json!(s.duplicates)),
        ("rejected", json!(s.rejected)),
        ("commits", json!(s.commits)),
        ("compactions", json!(s.compactions)),
        ("storage_ok", json!(s.storage_ok)),
        ("commit_failures", json!(s.commit_failures)),
        ("compaction_failures", json!(s.compaction_failures)),
        ("auth_failures", json!(s.auth_failures)),
        ("mqtt_connection_errors", json!(s.mqtt_connection_errors)),
        ("ingest_queue_depth", json!(s.ingest_queue_depth)),
        ("ingest_uncommitted", json!(s.ingest_uncommitted)),
        ("mqtt_dropped", json!(s.mqtt_dropped)),
        ("mqtt_bad_messages", json!(s.mqtt_bad_messages)),
        ("mqtt_connected", json!(s.mqtt_connected)),
    ];
    match format {
        Format::Json => {
            let obj: Map<String, Value> = fields
                .iter()
                .map(|(k, v)| ((*k).to_owned(), v.clone()))
                .collect();
            writeln!(out, "{}", Value::Object(obj))
        }
        Format::Csv => {
            let (keys, values): (Vec<&str>, Vec<String>) =
                fields.iter().map(|(k, v)| (*k, v.to_string())).unzip();
            writeln!(out, "{}\n{}", keys.join(","), values.join(","))
        }
        Format::Table => {
            for (k, v) in fields {
                writeln!(out, "{k:<20} {v:>14}")?;
            }
            Ok(())
        }
    }
}

fn state_name(raw: i32) -> &'static str {
    pb::CommandState::try_from(raw)
        .map(|s| s.as_str_name().trim_start_matches("COMMAND_STATE_"))
        .unwrap_or("UNSPECIFIED")
}

fn json_or_null(raw: &str) -> Value {
    if raw.is_empty() {
        Value::Null
    } else {
        serde_json::from_str(raw).unwrap_or_else(|_| Value::String(raw.to_owned()))
    }
}

fn command_json(c: &pb::CommandInfo) -> Map<String, Value> {
    let mut obj = Map::new();
    obj.insert("command_id".into(), json!(c.command_id));
    obj.insert("device_id".into(), json!(c.device_id));
    obj.insert("name".into(), json!(c.name));
    obj.insert("params".into(), json_or_null(&c.params_json));
    obj.insert("state".into(), json!(state_name(c.state)));
    obj.insert("detail".into(), json!(c.detail));
    obj.insert("result".into(), json_or_null(&c.result_json));
    obj.insert("attempts".into(), json!(c.attempts));
    obj.insert("created_at".into(), json!(rfc3339_ms(c.created_at_ms)));
    obj.insert("updated_at".into(), json!(rfc3339_ms(c.updated_at_ms)));
    obj.insert("expires_at".into(), json!(rfc3339_ms(c.expires_at_ms)));
    obj
}

pub fn print_commands(
    format: Format,
    commands: &[pb::CommandInfo],
    out: &mut impl Write,
) -> io::Result<()> {
    match format {
        Format::Json => {
            for c in commands {
                writeln!(out, "{}", Value::Object(command_json(c)))?;
            }
        }
        Format::Csv => {
            writeln!(
                out,
                "command_id,device_id,name,state,detail,result,created_at,updated_at"
            )?;
            for c in commands {
                writeln!(
                    out,
                    "{},{},{},{},{},{},{},{}",
                    c.command_id,
                    csv_field(&c.device_id),
                    csv_field(&c.name),
                    state_name(c.state),
                    csv_field(&c.detail),
                    csv_field(&c.result_json),
                    rfc3339_ms(c.created_at_ms),
                    rfc3339_ms(c.updated_at_ms)
                )?;
            }
        }
        Format::Table => {
            writeln!(
                out,
                "{:<36}  {:<16} {:<12} {:<10} {:<24}  RESULT",
                "COMMAND_ID", "DEVICE_ID", "NAME", "STATE", "UPDATED_AT"
            )?;
            for c in commands {
                let mut line = format!(
                    "{:<36}  {:<16} {:<12} {:<10} {:<24}  {}",
                    c.command_id,
                    shown(&c.device_id),
                    shown(&c.name),
                    state_name(c.state),
                    rfc3339_ms(c.updated_at_ms),
                    shown(&c.result_json)
                );
                if !c.detail.is_empty() {
                    line.push_str(&format!("  ({})", shown(&c.detail)));
                }
                writeln!(out, "{}", line.trim_end())?;
            }
        }
    }
    Ok(())
}

pub fn print_command_detail(
    format: Format,
    c: &pb::CommandInfo,
    out: &mut impl Write,
) -> io::Result<()> {
    let history: Vec<Value> = c
        .history
        .iter()
        .map(|t| json!({"state": state_name(t.state), "at": rfc3339_ms(t.at_ms), "detail": t.detail}))
        .collect();
    match format {
        Format::Json => {
            let mut obj = command_json(c);
            obj.insert("history".into(), Value::Array(history));
            writeln!(out, "{}", Value::Object(obj))
        }
        Format::Csv => print_commands(format, std::slice::from_ref(c), out),
        Format::Table => {
            for (k, v) in command_json(c) {
                let v = match v {
                    Value::String(s) => s,
                    other => other.to_string(),
                };
                writeln!(out, "{k:<12} {}", shown(&v))?;
            }
            writeln!(out, "history")?;
            for t in &c.history {
                writeln!(
                    out,
                    "  {:<24} {:<10} {}",
                    rfc3339_ms(t.at_ms),
                    state_name(t.state),
                    shown(&t.detail)
                )?;
            }
            Ok(())
        }
    }
}

pub fn print_live_header(format: Format, out: &mut impl Write) -> io::Result<()> {
    match format {
        Format::Json => Ok(()),
        Format::Csv => writeln!(out, "device,sensor,seq,ts,value"),
        Format::Table => writeln!(
            out,
            "{:<16} {:<14} {:>10} {:<24} {:>14}",
            "DEVICE", "SENSOR", "SEQ", "TS", "VALUE"
        ),
    }
}

pub fn print_live(format: Format, r: &pb::LiveReading, out: &mut impl Write) -> io::Result<()> {
    print_reading(
        format,
        &r.device_id,
        &r.sensor,
        r.seq,
        r.ts_ms,
        r.value,
        out,
    )
}

/// One raw reading, the same way for `query` and `watch`.
fn print_reading(
    format: Format,
    device: &str,
    sensor: &str,
    seq: u64,
    ts_ms: i64,
    value: f64,
    out: &mut impl Write,
) -> io::Result<()> {
    let ts = rfc3339_ms(ts_ms);
    match format {
        Format::Json => writeln!(
            out,
            "{}",
            json!({"device": device, "sensor": sensor, "seq": seq, "ts": ts, "value": value})
        ),
        Format::Csv => writeln!(
            out,
            "{},{},{},{},{}",
            csv_field(device),
            csv_field(sensor),
            seq,
            ts,
            value
        ),
        Format::Table => writeln!(
            out,
            "{:<16} {:<14} {:>10} {:<24} {:>14.4}",
            device,
            shown(sensor),
            seq,
            ts,
            value
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_strings_cannot_drive_the_terminal() {
        assert_eq!(shown("temperature"), "temperature");
        assert_eq!(shown("t\u{1b}[2J"), "t\\u{1b}[2J");
        assert_eq!(csv_field("a,b"), "\"a,b\"");
        assert_eq!(csv_field("x\ny"), "x\\ny");
        // Spreadsheets: a formula anywhere a locale may start a cell.
        assert_eq!(
            csv_field("=HYPERLINK(\"http://x\")"),
            "\"'=HYPERLINK(\"\"http://x\"\")\""
        );
        assert_eq!(
            csv_field("x;=cmd|' /C calc'!A0"),
            "\"x;=cmd|' /C calc'!A0\""
        );
        assert_eq!(csv_field("-2+3"), "\"'-2+3\"");
        assert_eq!(csv_field("temperature"), "temperature");
    }
}
