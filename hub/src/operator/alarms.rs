//! Alarms as operators see them: rules (create, replace, delete, list),
//! alarms (list, show, acknowledge, clear, watch) and webhook delivery
//! logs. Every door calls these.

use std::sync::Arc;

use tokio::sync::broadcast;
use tokio::sync::broadcast::error::RecvError;
use tokio_util::sync::CancellationToken;

use super::{OpError, Operations, WatchSlot};
use crate::alarms::{Alarm, AlarmEvent, Rule, RuleSpec, Severity};
use crate::ingest::alarms::{AlarmOp, AlarmOutcome};
use crate::store::alarms::{AlarmFilter, Delivery};

/// Longest acknowledgement or clear note.
pub const MAX_NOTE: usize = 1024;
/// Most alarms one list returns.
pub const MAX_ALARMS_PAGE: u32 = 1000;

/// An alarm with its history: (event id, kind, at_ms), oldest first.
#[derive(Debug, Clone, serde::Serialize)]
pub struct AlarmDetail {
    #[serde(flatten)]
    pub alarm: Alarm,
    pub history: Vec<AlarmHistoryItem>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct AlarmHistoryItem {
    pub event_id: i64,
    pub kind: String,
    pub at_ms: i64,
}

fn check_note(note: &str) -> Result<(), OpError> {
    if note.len() > MAX_NOTE {
        return Err(OpError::Invalid(format!(
            "a note is at most {MAX_NOTE} bytes"
        )));
    }
    if note.chars().any(|c| c.is_control() && c != '\n') {
        return Err(OpError::Invalid(
            "a note has no control characters but line breaks".into(),
        ));
    }
    Ok(())
}

impl Operations {
    /// Creates a rule, or replaces the rule of that name (its version goes
    /// up; it applies to alarms from its commit on).
    pub async fn put_alarm_rule(&self, spec: RuleSpec) -> Result<Rule, OpError> {
        spec.check().map_err(|e| OpError::Invalid(e.to_string()))?;
        super::twin::check_tags(&spec.target.tags)?;
        match self.alarm_op(AlarmOp::PutRule(Box::new(spec))).await? {
            AlarmOutcome::Rule(rule) => Ok(*rule),
            other => Err(unexpected(other)),
        }
    }

    /// [`Operations::put_alarm_rule`] from a rule's JSON.
    pub async fn put_alarm_rule_json(&self, json: &str) -> Result<Rule, OpError> {
        let spec = RuleSpec::from_json(json).map_err(|e| OpError::Invalid(e.to_string()))?;
        self.put_alarm_rule(spec).await
    }

    /// Deletes a rule; its open alarms are cleared ("rule deleted").
    pub async fn delete_alarm_rule(&self, name: &str) -> Result<Rule, OpError> {
        match self.alarm_op(AlarmOp::DeleteRule(name.to_owned())).await? {
            AlarmOutcome::Deleted(Some(rule)) => Ok(*rule),
            AlarmOutcome::Deleted(None) => {
                Err(OpError::NotFound(format!("no alarm rule {name:?}")))
            }
            other => Err(unexpected(other)),
        }
    }

    pub async fn alarm_rules(&self) -> Result<Vec<Rule>, OpError> {
        Ok(self.store.alarm_rules().await?)
    }

    /// Alarms, newest first; `limit` is 1 to [`MAX_ALARMS_PAGE`] (0: 100).
    pub async fn alarms(&self, mut filter: AlarmFilter) -> Result<Vec<Alarm>, OpError> {
        filter.limit = match filter.limit {
            0 => 100,
            n => n.min(MAX_ALARMS_PAGE),
        };
        Ok(self.store.alarms(&filter).await?)
    }

    pub async fn alarm(&self, id: i64) -> Result<AlarmDetail, OpError> {
        let alarm = self
            .store
            .alarm(id)
            .await?
            .ok_or_else(|| OpError::NotFound(format!("no alarm {id}")))?;
        let history = self
            .store
            .alarm_history(id)
            .await?
            .into_iter()
            .map(|(event_id, kind, at_ms)| AlarmHistoryItem {
                event_id,
                kind,
                at_ms,
            })
            .collect();
        Ok(AlarmDetail { alarm, history })
    }

    /// Acknowledges an active alarm (an acknowledged one is returned as it
    /// is; a cleared one cannot be).
    pub async fn ack_alarm(&self, id: i64, by: &str, note: &str) -> Result<Alarm, OpError> {
        check_note(note)?;
        let op = AlarmOp::Ack {
            id,
            by: by.to_owned(),
            note: note.to_owned(),
        };
        match self.alarm_op(op).await? {
            AlarmOutcome::Changed(alarm) => Ok(*alarm),
            AlarmOutcome::Unchanged(Some(alarm))
                if alarm.state == crate::alarms::AlarmState::Acknowledged =>
            {
                Ok(*alarm)
            }
            AlarmOutcome::Unchanged(Some(_)) => Err(OpError::Precondition(format!(
                "alarm {id} is cleared: there is nothing to acknowledge"
            ))),
            AlarmOutcome::Unchanged(None) => Err(OpError::NotFound(format!("no alarm {id}"))),
            other => Err(unexpected(other)),
        }
    }

    /// Clears an open alarm (a cleared one is returned as it is). The
    /// rule's condition must hold for its time again to raise another.
    pub async fn clear_alarm(&self, id: i64, by: &str, note: &str) -> Result<Alarm, OpError> {
        check_note(note)?;
        let op = AlarmOp::Clear {
            id,
            by: by.to_owned(),
            note: note.to_owned(),
        };
        match self.alarm_op(op).await? {
            AlarmOutcome::Changed(alarm) | AlarmOutcome::Unchanged(Some(alarm)) => Ok(*alarm),
            AlarmOutcome::Unchanged(None) => Err(OpError::NotFound(format!("no alarm {id}"))),
            other => Err(unexpected(other)),
        }
    }

    /// Open alarms per device: (device, count, most severe).
    pub async fn open_alarm_counts(&self) -> Result<Vec<(String, u64, Severity)>, OpError> {
        Ok(self.store.open_alarm_counts().await?)
    }

    /// A webhook's delivery log, newest first.
    pub async fn webhook_deliveries(
        &self,
        webhook: &str,
        limit: u32,
    ) -> Result<Vec<Delivery>, OpError> {
        Ok(self
            .store
            .deliveries(webhook, limit.clamp(1, MAX_ALARMS_PAGE))
            .await?)
    }

    /// Alarm events from now on (this hub's commits: with several hubs,
    /// each publishes the alarms its writer changed), of one device or all.
    pub fn watch_alarms(&self, _slot: &WatchSlot, device: Option<&str>) -> AlarmWatch {
        AlarmWatch {
            events: self.alarms.subscribe(),
            shutdown: self.shutdown.clone(),
            device: device.map(str::to_owned),
        }
    }

    async fn alarm_op(&self, op: AlarmOp) -> Result<AlarmOutcome, OpError> {
        self.ingest.alarm(op).await.map_err(|e| {
            tracing::warn!(error = %e, "an alarm change failed");
            OpError::Unavailable(format!("the change was not stored: {e}; try again"))
        })
    }
}

fn unexpected(outcome: AlarmOutcome) -> OpError {
    tracing::error!(
        ?outcome,
        "the writer answered an alarm change with something else"
    );
    OpError::Internal("the hub failed while answering; see its log".into())
}

/// What an alarm watcher is told next.
#[derive(Debug, Clone)]
pub enum AlarmWatchEvent {
    Event(Arc<AlarmEvent>),
    /// Events it missed by falling behind.
    Missed(u64),
}

pub struct AlarmWatch {
    events: broadcast::Receiver<Arc<AlarmEvent>>,
    shutdown: CancellationToken,
    device: Option<String>,
}

impl AlarmWatch {
    /// The next event; None once the hub shuts down.
    pub async fn next(&mut self) -> Option<AlarmWatchEvent> {
        loop {
            let received = tokio::select! {
                received = self.events.recv() => received,
                _ = self.shutdown.cancelled() => return None,
            };
            match received {
                Ok(event) => {
                    if self
                        .device
                        .as_deref()
                        .is_none_or(|d| d == event.alarm.device)
                    {
                        return Some(AlarmWatchEvent::Event(event));
                    }
                }
                Err(RecvError::Lagged(n)) => return Some(AlarmWatchEvent::Missed(n)),
                Err(RecvError::Closed) => return None,
            }
        }
    }
}
