//! A simulated device's twin: it takes the desired document the hub sends,
//! applies (after `--twin-apply-delay`) the keys it understands, and
//! reports what it applied, with its firmware and uptime.
//!
//! Understood keys: `sample_rate_hz` (readings per second, a number above
//! 0), `sensors` (an object of sensor name -> true/false: enabled or not)
//! and `report_interval` (seconds between uptime reports, a number; 0
//! stops them). Reported patches are numbered and kept until the hub acks
//! them, and resent after a reconnect, like readings.

use std::collections::VecDeque;
use std::time::Duration;

use serde_json::{Map, Value, json};
use telemetry_proto::v1 as pb;
use tokio::time::Instant;

/// What applying the desired document changes in the device.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Effects {
    pub rate_hz: Option<f64>,
    /// Sensors switched off (the rest are on).
    pub disabled: Option<Vec<String>>,
}

pub struct SimTwin {
    /// The desired document as received, and its version.
    desired: Map<String, Value>,
    held: u64,
    /// The version last applied (sent in Hello).
    applied: u64,
    apply_at: Option<Instant>,
    delay: Duration,
    next_seq: u64,
    /// Reported patches not acked yet, in seq order, and how many of them
    /// were sent on this stream.
    unacked: VecDeque<pb::ReportedPatch>,
    sent_on_stream: usize,
    report_every: Option<Duration>,
    next_report: Option<Instant>,
    started: Instant,
    firmware: String,
    /// Nothing was ever reported (the first Welcome queues a report).
    fresh: bool,
}

impl SimTwin {
    pub fn new(firmware: &str, delay: Duration) -> Self {
        Self {
            desired: Map::new(),
            held: 0,
            applied: 0,
            apply_at: None,
            delay,
            next_seq: 1,
            unacked: VecDeque::new(),
            sent_on_stream: 0,
            report_every: None,
            next_report: None,
            started: Instant::now(),
            firmware: firmware.to_owned(),
            fresh: true,
        }
    }

    /// The desired version to put in Hello.
    pub fn applied_version(&self) -> u64 {
        self.applied
    }

    /// A new stream: what the hub committed is forgotten, the rest is
    /// sent again.
    pub fn on_welcome(&mut self, welcome: &pb::Welcome) {
        self.release(welcome.reported_seq);
        self.next_seq = self.next_seq.max(welcome.reported_seq + 1);
        self.sent_on_stream = 0;
        if std::mem::take(&mut self.fresh) {
            let report = json!({"firmware": self.firmware, "uptime_s": self.uptime_s()});
            self.queue(report);
        }
    }

    /// A DesiredState: the whole document, or a patch on the version held
    /// (a patch on another version is ignored: the next Hello brings the
    /// whole document). Applied after the device's delay.
    pub fn on_desired(&mut self, msg: &pb::DesiredState, now: Instant) {
        let Ok(Value::Object(doc)) = serde_json::from_str::<Value>(&msg.json) else {
            tracing::warn!(
                version = msg.version,
                "desired state that is not a JSON object"
            );
            return;
        };
        if msg.full {
            self.desired = doc;
        } else if msg.version == self.held + 1 {
            merge(&mut self.desired, &doc);
        } else {
            return;
        }
        self.held = msg.version;
        self.apply_at.get_or_insert(now + self.delay);
    }

    /// When the device next has something to do on its own (apply, report).
    pub fn next_wake(&self) -> Option<Instant> {
        match (self.apply_at, self.next_report) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Does what is due at `now`: applies the desired document (its
    /// effects returned) and queues the reports.
    pub fn wake(&mut self, now: Instant) -> Effects {
        let mut effects = Effects::default();
        if self.apply_at.is_some_and(|t| t <= now) {
            self.apply_at = None;
            effects = self.apply(now);
        }
        if self.next_report.is_some_and(|t| t <= now) {
            self.next_report = self.report_every.map(|every| now + every);
            let report = json!({"uptime_s": self.uptime_s()});
            self.queue(report);
        }
        effects
    }

    fn apply(&mut self, now: Instant) -> Effects {
        let mut effects = Effects::default();
        let mut report = Map::new();
        if let Some(v) = self.desired.get("sample_rate_hz")
            && let Some(hz) = v.as_f64().filter(|hz| *hz > 0.0 && *hz <= 100_000.0)
        {
            effects.rate_hz = Some(hz);
            report.insert("sample_rate_hz".into(), v.clone());
        }
        if let Some(Value::Object(sensors)) = self.desired.get("sensors") {
            let disabled = sensors
                .iter()
                .filter(|(_, on)| on.as_bool() == Some(false))
                .map(|(name, _)| name.clone())
                .collect();
            effects.disabled = Some(disabled);
            report.insert("sensors".into(), Value::Object(sensors.clone()));
        }
        if let Some(v) = self.desired.get("report_interval")
            && let Some(secs) = v.as_f64().filter(|s| (0.0..=86_400.0).contains(s))
        {
            self.report_every = (secs > 0.0).then(|| Duration::from_secs_f64(secs));
            self.next_report = self.report_every.map(|every| now + every);
            report.insert("report_interval".into(), v.clone());
        }
        report.insert("firmware".into(), Value::from(self.firmware.clone()));
        report.insert("uptime_s".into(), Value::from(self.uptime_s()));
        self.applied = self.held;
        self.queue(Value::Object(report));
        effects
    }

    fn uptime_s(&self) -> u64 {
        self.started.elapsed().as_secs()
    }

    fn queue(&mut self, patch: Value) {
        self.unacked.push_back(pb::ReportedPatch {
            seq: self.next_seq,
            patch_json: patch.to_string(),
        });
        self.next_seq += 1;
    }

    /// A ReportedAck: how many patches it released, and whether any was
    /// rejected.
    pub fn on_ack(&mut self, ack: &pb::ReportedAck) -> usize {
        if ack.rejected > 0 {
            tracing::warn!(error = ack.error, "the hub rejected a reported patch");
        }
        self.release(ack.seq)
    }

    fn release(&mut self, seq: u64) -> usize {
        let mut n = 0;
        while self.unacked.front().is_some_and(|p| p.seq <= seq) {
            self.unacked.pop_front();
            n += 1;
        }
        self.sent_on_stream = self.sent_on_stream.saturating_sub(n);
        n
    }

    /// The patches to send now (not yet sent on this stream).
    pub fn unsent(&mut self) -> Vec<pb::ReportedPatch> {
        let out: Vec<_> = self
            .unacked
            .iter()
            .skip(self.sent_on_stream)
            .cloned()
            .collect();
        self.sent_on_stream = self.unacked.len();
        out
    }

    /// Patches the hub has not acked.
    pub fn pending(&self) -> usize {
        self.unacked.len()
    }
}

/// RFC 7386, for the device's copy of its desired document.
fn merge(target: &mut Map<String, Value>, patch: &Map<String, Value>) {
    for (key, value) in patch {
        match value {
            Value::Null => {
                target.remove(key);
            }
            Value::Object(inner) => {
                let slot = target.entry(key.clone()).or_insert_with(|| json!({}));
                if !slot.is_object() {
                    *slot = json!({});
                }
                if let Value::Object(existing) = slot {
                    merge(existing, inner);
                }
            }
            other => {
                target.insert(key.clone(), other.clone());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn desired(version: u64, full: bool, json: Value) -> pb::DesiredState {
        pb::DesiredState {
            version,
            full,
            json: json.to_string(),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn applies_what_it_understands_after_its_delay_and_reports_it() {
        let mut twin = SimTwin::new("1.4", Duration::from_secs(2));
        twin.on_welcome(&pb::Welcome::default());
        assert_eq!(twin.unsent().len(), 1, "the first report");
        let now = Instant::now();
        twin.on_desired(
            &desired(
                3,
                true,
                json!({"sample_rate_hz": 2, "sensors": {"humidity": false}, "color": "red"}),
            ),
            now,
        );
        assert_eq!(twin.wake(now), Effects::default(), "not before the delay");
        assert_eq!(twin.applied_version(), 0);
        twin.on_desired(&desired(4, false, json!({"report_interval": 60})), now);
        // A patch on a version the device does not hold is ignored.
        twin.on_desired(&desired(9, false, json!({"sample_rate_hz": 9})), now);
        let effects = twin.wake(now + Duration::from_secs(2));
        assert_eq!(effects.rate_hz, Some(2.0));
        assert_eq!(effects.disabled, Some(vec!["humidity".to_owned()]));
        assert_eq!(twin.applied_version(), 4);
        let sent = twin.unsent();
        assert_eq!(sent.len(), 1);
        let report: Value = serde_json::from_str(&sent[0].patch_json).unwrap();
        assert_eq!(report["sample_rate_hz"], json!(2));
        assert_eq!(report["report_interval"], json!(60));
        assert!(report.get("color").is_none(), "{report}");
        // Unacked patches go again on the next stream; acked ones do not.
        twin.on_ack(&pb::ReportedAck {
            seq: 1,
            ..Default::default()
        });
        twin.on_welcome(&pb::Welcome {
            reported_seq: 1,
            ..Default::default()
        });
        assert_eq!(
            twin.unsent().iter().map(|p| p.seq).collect::<Vec<_>>(),
            vec![2]
        );
        assert_eq!(twin.next_wake(), Some(now + Duration::from_secs(62)));
    }
}
