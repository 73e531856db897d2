//! `hub alarm ...`: alarm rules and alarms through the Operator API. Every
//! answer is printed as JSON lines (control characters escaped).

use std::io::Write;

use clap::Subcommand;
use serde_json::{Value, json};
use telemetry_proto::v1 as pb;

use super::{HubAddr, connect, status_error};
use crate::domain::shown;

#[derive(Subcommand, Debug)]
pub enum AlarmAction {
    /// Every alarm rule, one JSON line each.
    Rules {
        #[command(flatten)]
        addr: HubAddr,
    },
    /// Create or replace a rule from its JSON (README "Alarms"):
    /// `hub alarm rule-set '{"name": "hot", "severity": "major",
    /// "threshold": {"sensor": "temp", "raise": "> 30", "raise_for": "1m"}}'`.
    /// `@file.json` reads it from a file.
    RuleSet {
        #[command(flatten)]
        addr: HubAddr,
        rule: String,
    },
    /// Delete a rule (its open alarms are cleared).
    RuleRm {
        #[command(flatten)]
        addr: HubAddr,
        name: String,
    },
    /// Alarms, newest first, one JSON line each.
    List {
        #[command(flatten)]
        addr: HubAddr,
        /// active, acknowledged, cleared or open (repeatable).
        #[arg(long)]
        state: Vec<String>,
        #[arg(long)]
        device: Option<String>,
        #[arg(long)]
        rule: Option<String>,
        /// critical, major, minor or warning.
        #[arg(long)]
        severity: Option<String>,
        /// 1 to 1000.
        #[arg(long, default_value_t = 100)]
        limit: u32,
    },
    /// Acknowledge an active alarm.
    Ack {
        #[command(flatten)]
        addr: HubAddr,
        id: i64,
        #[arg(long, default_value = "")]
        note: String,
    },
    /// Clear an open alarm.
    Clear {
        #[command(flatten)]
        addr: HubAddr,
        id: i64,
        #[arg(long, default_value = "")]
        note: String,
    },
    /// Print every alarm change from now on (of one device, or all).
    Watch {
        #[command(flatten)]
        addr: HubAddr,
        #[arg(long)]
        device: Option<String>,
    },
}

fn alarm_json(a: &pb::Alarm) -> Value {
    json!({
        "id": a.id, "rule": a.rule, "rule_version": a.rule_version, "severity": a.severity,
        "device_id": a.device_id, "sensor": a.sensor, "state": a.state, "value": a.value,
        "last_value": a.last_value, "started_ms": a.started_ms, "raised_ms": a.raised_ms,
        "changed_ms": a.changed_ms, "count": a.count, "acked_ms": a.acked_ms,
        "acked_by": a.acked_by, "ack_note": a.ack_note, "cleared_ms": a.cleared_ms,
        "cleared_by": a.cleared_by, "clear_note": a.clear_note,
    })
}

fn rule_json(r: &pb::AlarmRule) -> Value {
    let mut rule: Value = serde_json::from_str(&r.rule_json).unwrap_or(Value::Null);
    if let Some(fields) = rule.as_object_mut() {
        fields.insert("id".into(), json!(r.id));
        fields.insert("version".into(), json!(r.version));
        fields.insert("updated_ms".into(), json!(r.updated_ms));
    }
    rule
}

fn line(out: &mut impl Write, v: &Value) -> std::io::Result<()> {
    writeln!(out, "{}", shown(&v.to_string()))
}

pub async fn run(action: &AlarmAction, out: &mut impl Write) -> anyhow::Result<()> {
    match action {
        AlarmAction::Rules { addr } => {
            let rules = connect(addr)
                .await?
                .list_alarm_rules(pb::ListAlarmRulesRequest {})
                .await
                .map_err(status_error)?
                .into_inner();
            for r in &rules.rules {
                line(out, &rule_json(r))?;
            }
        }
        AlarmAction::RuleSet { addr, rule } => {
            let text = match rule.strip_prefix('@') {
                Some(path) => std::fs::read_to_string(path)
                    .map_err(|e| anyhow::anyhow!("cannot read {path}: {e}"))?,
                None => rule.clone(),
            };
            let r = connect(addr)
                .await?
                .put_alarm_rule(pb::PutAlarmRuleRequest { rule_json: text })
                .await
                .map_err(status_error)?
                .into_inner();
            line(out, &rule_json(&r))?;
        }
        AlarmAction::RuleRm { addr, name } => {
            let r = connect(addr)
                .await?
                .delete_alarm_rule(pb::DeleteAlarmRuleRequest { name: name.clone() })
                .await
                .map_err(status_error)?
                .into_inner();
            line(out, &rule_json(&r))?;
        }
        AlarmAction::List {
            addr,
            state,
            device,
            rule,
            severity,
            limit,
        } => {
            let alarms = connect(addr)
                .await?
                .list_alarms(pb::ListAlarmsRequest {
                    states: state.clone(),
                    device_id: device.clone().unwrap_or_default(),
                    rule: rule.clone().unwrap_or_default(),
                    severity: severity.clone().unwrap_or_default(),
                    before: None,
                    limit: *limit,
                })
                .await
                .map_err(status_error)?
                .into_inner();
            for a in &alarms.alarms {
                line(out, &alarm_json(a))?;
            }
        }
        AlarmAction::Ack { addr, id, note } | AlarmAction::Clear { addr, id, note } => {
            let request = pb::AlarmActionRequest {
                id: *id,
                note: note.clone(),
            };
            let mut client = connect(addr).await?;
            let alarm = match action {
                AlarmAction::Ack { .. } => client.ack_alarm(request).await,
                _ => client.clear_alarm(request).await,
            }
            .map_err(status_error)?
            .into_inner();
            line(out, &alarm_json(&alarm))?;
        }
        AlarmAction::Watch { addr, device } => {
            let mut stream = connect(addr)
                .await?
                .watch_alarms(pb::WatchAlarmsRequest {
                    device_id: device.clone().unwrap_or_default(),
                })
                .await
                .map_err(status_error)?
                .into_inner();
            while let Some(e) = stream.message().await.map_err(status_error)? {
                if e.skipped > 0 {
                    eprintln!("(too slow: skipped {} events)", e.skipped);
                }
                let alarm = e.alarm.as_ref().map(alarm_json).unwrap_or(Value::Null);
                line(
                    out,
                    &json!({"id": e.id, "kind": e.kind, "at_ms": e.at_ms, "alarm": alarm}),
                )?;
                out.flush()?;
            }
        }
    }
    out.flush()?;
    Ok(())
}
