//! Alarms: rules that watch committed readings (thresholds, rates) and
//! devices' silence (inactivity), the alarms they raise, and the
//! notifications owed to webhooks.
//!
//! - [`rules`] and [`engine`] are plain code: what a rule is, and how a
//!   series' readings move its alarm.
//! - Threshold and rate rules run in the ingest writer, on each group's
//!   stored readings, in the same commit (`ingest::alarms`): an alarm never
//!   comes from a reading that was not acked, and after a crash nothing
//!   committed is left unevaluated. With several hubs, the hub whose
//!   writer stores a device's readings evaluates it.
//! - Inactivity runs on the hub's clock, in one hub for the whole fleet
//!   ([`leader`]: always on SQLite; under a lease on PostgreSQL). The same
//!   task delivers webhooks from the outbox ([`webhook`]) and deletes old
//!   history.
//! - Every change of an alarm is an event, written in the commit that
//!   made it, with one outbox row per configured webhook; after the commit
//!   it is published to [`AlarmHub`] (SSE, MQTT, gRPC watches).

pub mod engine;
pub mod leader;
pub mod rules;
pub mod webhook;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, broadcast};

pub use rules::{Rule, RuleError, RuleSpec, Severity};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AlarmState {
    Active,
    Acknowledged,
    Cleared,
}

impl AlarmState {
    pub fn as_str(self) -> &'static str {
        match self {
            AlarmState::Active => "active",
            AlarmState::Acknowledged => "acknowledged",
            AlarmState::Cleared => "cleared",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "active" => AlarmState::Active,
            "acknowledged" => AlarmState::Acknowledged,
            "cleared" => AlarmState::Cleared,
            _ => return None,
        })
    }
}

/// An alarm as stored and shown.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Alarm {
    pub id: i64,
    pub rule_id: i64,
    pub rule_version: u64,
    pub rule: String,
    pub severity: Severity,
    /// The device's row (not shown).
    #[serde(skip)]
    pub device_key: i64,
    pub device: String,
    /// '' for a device-wide inactivity alarm.
    pub sensor: String,
    pub state: AlarmState,
    pub value: Option<f64>,
    pub last_value: Option<f64>,
    pub started_ms: i64,
    pub raised_ms: i64,
    pub changed_ms: i64,
    /// 1 + how often it was triggered again while open.
    pub count: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub acked_ms: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub acked_by: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ack_note: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cleared_ms: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cleared_by: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub clear_note: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    Raised,
    Retriggered,
    Acknowledged,
    Cleared,
}

impl EventKind {
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Raised => "raised",
            EventKind::Retriggered => "retriggered",
            EventKind::Acknowledged => "acknowledged",
            EventKind::Cleared => "cleared",
        }
    }
}

/// One change of an alarm: what SSE, MQTT, watchers and webhooks get.
/// `id` is unique and grows in commit order per database: a receiver
/// dedupes redeliveries by it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AlarmEvent {
    pub id: i64,
    pub kind: EventKind,
    pub at_ms: i64,
    pub alarm: Alarm,
}

impl AlarmEvent {
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }
}

/// Alarm events after their commit, and the signals between the writer,
/// the cluster listener and the leader task.
pub struct AlarmHub {
    events: broadcast::Sender<Arc<AlarmEvent>>,
    /// Bumped when rules or tags change: the writer reloads its rules.
    generation: AtomicU64,
    /// Woken when a commit queued webhook deliveries.
    outbox: Notify,
}

impl AlarmHub {
    pub fn new(capacity: usize) -> Arc<Self> {
        let (events, _) = broadcast::channel(capacity.max(1));
        Arc::new(Self {
            events,
            generation: AtomicU64::new(0),
            outbox: Notify::new(),
        })
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Arc<AlarmEvent>> {
        self.events.subscribe()
    }

    /// Committed events, in order (never waits: a slow receiver lags).
    pub fn committed(&self, events: Vec<AlarmEvent>, deliveries: bool) {
        for e in events {
            let _ = self.events.send(Arc::new(e));
        }
        if deliveries {
            self.outbox.notify_one();
        }
    }

    /// Rules or some device's tags changed.
    pub fn rules_changed(&self) {
        self.generation.fetch_add(1, Ordering::AcqRel);
    }

    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    pub async fn outbox_filled(&self) {
        self.outbox.notified().await
    }
}
