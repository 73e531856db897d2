//! The work one hub does for the whole fleet: inactivity checks (on the
//! hub's clock), webhook deliveries from the outbox, and deleting old
//! alarm history. On SQLite the hub holding the file does it; on
//! PostgreSQL the hub holding the `alarms` lease (renewed every round,
//! taken over by another hub once it expires).

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::engine::{self, Quiet};
use super::rules::Watch;
use super::webhook::Sender;
use super::{AlarmHub, Rule};
use crate::config::AlarmSettings;
use crate::domain::now_ms;
use crate::ingest::IngestQueue;
use crate::ingest::alarms::{AlarmOp, AlarmOutcome};
use crate::store::Store;
use crate::store::alarms::Silent;

const LEASE: &str = "alarms";
/// Deliveries attempted at once.
const DELIVERY_BATCH: u32 = 64;
/// Alarms pruned per writer step.
const PRUNE_STEP: u32 = 1000;
/// History is pruned every six checks, at most every minute.
fn prune_every(check_interval: Duration) -> Duration {
    check_interval
        .saturating_mul(6)
        .min(Duration::from_secs(60))
}

pub struct Leader {
    pub store: Store,
    pub ingest: IngestQueue,
    pub hub: Arc<AlarmHub>,
    pub settings: AlarmSettings,
    pub hub_id: Arc<str>,
    /// The lease's time to live (ms), set by `run`.
    pub ttl_ms: std::sync::atomic::AtomicI64,
}

impl Leader {
    pub async fn run(self, stop: CancellationToken) {
        let sender = Sender::new(&self.settings.webhooks);
        let interval = self.settings.check_interval;
        // The lease outlives three missed rounds and a round of slow
        // webhook attempts (it is renewed before each batch too).
        let slowest = self
            .settings
            .webhooks
            .iter()
            .map(|w| w.timeout.as_millis() as i64)
            .max()
            .unwrap_or(0);
        let ttl = (interval.as_millis() as i64)
            .saturating_mul(3)
            .max(3_000)
            .max(slowest.saturating_mul(2) + 5_000);
        self.ttl_ms.store(ttl, std::sync::atomic::Ordering::Relaxed);
        let mut pruned_at: Option<tokio::time::Instant> = None;
        let mut leading = false;
        loop {
            let now = now_ms();
            let lease = self.store.lease(LEASE, &self.hub_id, now, ttl).await;
            match lease {
                Ok(held) => {
                    if held != leading {
                        tracing::info!(leading = held, "alarm leader lease");
                    }
                    leading = held;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot renew the alarm leader lease");
                    leading = false;
                }
            }
            if leading {
                if let Err(e) = self.check_inactivity().await {
                    tracing::warn!(error = %e, "inactivity check failed");
                }
                self.deliver(&sender, &stop).await;
                if self.settings.retention > Duration::ZERO
                    && pruned_at.is_none_or(|t| t.elapsed() >= prune_every(interval))
                {
                    pruned_at = Some(tokio::time::Instant::now());
                    self.prune().await;
                }
            }
            // A commit that queued deliveries wakes this at once.
            let next = self.next_wake(interval, leading).await;
            tokio::select! {
                _ = tokio::time::sleep(next) => {}
                _ = self.hub.outbox_filled() => {}
                _ = stop.cancelled() => break,
            }
        }
        if leading && let Err(e) = self.store.release(LEASE, &self.hub_id).await {
            tracing::warn!(error = %e, "cannot release the alarm leader lease");
        }
    }

    /// The check interval, or sooner when a delivery retry is due.
    async fn next_wake(&self, interval: Duration, leading: bool) -> Duration {
        if !leading || self.settings.webhooks.is_empty() {
            return interval;
        }
        match self.store.next_delivery_ms().await {
            Ok(Some(at)) => {
                let wait = (at - now_ms()).clamp(0, interval.as_millis() as i64);
                Duration::from_millis(wait as u64)
            }
            _ => interval,
        }
    }

    async fn check_inactivity(&self) -> Result<(), String> {
        let rules = self.store.alarm_rules().await.map_err(|e| e.to_string())?;
        for rule in rules {
            let Watch::Inactivity(i) = rule.spec.watch() else {
                continue;
            };
            let after = i.after.as_millis() as i64;
            let op = self
                .inactivity_step(&rule, i.sensor.as_deref(), after)
                .await
                .map_err(|e| e.to_string())?;
            for op in op.into_iter().flat_map(split_inactivity) {
                self.ingest.alarm(op).await.map_err(|e| e.to_string())?;
            }
        }
        Ok(())
    }

    /// One rule's raises and clears, decided by `engine::inactivity`.
    async fn inactivity_step(
        &self,
        rule: &Rule,
        sensor: Option<&str>,
        after: i64,
    ) -> Result<Option<AlarmOp>, crate::store::StoreError> {
        let now = now_ms();
        let open = self.store.open_inactivity(rule.id, now).await?;
        let silent = self
            .store
            .silent_devices(&rule.spec, sensor, now - after)
            .await?;
        let is_open: std::collections::HashSet<_> = open.iter().map(|(d, _, _)| *d).collect();
        let raise: Vec<Silent> = silent
            .into_iter()
            .filter(|s| {
                let q = Quiet {
                    last_ms: s.last_ms,
                    open: is_open.contains(&s.device),
                };
                engine::inactivity(now, after, &q) == Some(true)
            })
            .collect();
        let clear: Vec<_> = open
            .into_iter()
            .filter(|(_, _, last_ms)| {
                let q = Quiet {
                    last_ms: *last_ms,
                    open: true,
                };
                engine::inactivity(now, after, &q) == Some(false)
            })
            .map(|(d, s, _)| (d, s))
            .collect();
        if raise.is_empty() && clear.is_empty() {
            return Ok(None);
        }
        Ok(Some(AlarmOp::Inactivity {
            rule: rule.id,
            version: rule.version,
            raise,
            clear,
        }))
    }

    /// Sends what is due, a batch at a time, until nothing is due.
    async fn deliver(&self, sender: &Sender, stop: &CancellationToken) {
        if self.settings.webhooks.is_empty() {
            return;
        }
        loop {
            let now = now_ms();
            // Still the leader? (A long round must not outlive the lease.)
            let ttl = self.ttl_ms.load(std::sync::atomic::Ordering::Relaxed);
            if !matches!(
                self.store.lease(LEASE, &self.hub_id, now, ttl).await,
                Ok(true)
            ) {
                return;
            }
            let due = match self.store.due_deliveries(now, DELIVERY_BATCH).await {
                Ok(due) => due,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read the webhook outbox");
                    return;
                }
            };
            if due.is_empty() {
                return;
            }
            let full = due.len() as u32 == DELIVERY_BATCH;
            let attempts = tokio::select! {
                a = futures_util::future::join_all(due.iter().map(|d| sender.attempt(d, now))) => a,
                _ = stop.cancelled() => return,
            };
            for a in attempts.iter().filter(|a| !a.delivered) {
                tracing::warn!(webhook = %a.webhook, event = a.event_id,
                    error = a.error.as_deref().unwrap_or(""), gave_up = a.next_ms.is_none(),
                    "webhook delivery failed");
            }
            if let Err(e) = self.ingest.alarm(AlarmOp::Attempts(attempts)).await {
                tracing::warn!(error = %e, "cannot record webhook attempts");
                return;
            }
            if !full {
                return;
            }
        }
    }

    async fn prune(&self) {
        let cutoff = now_ms() - self.settings.retention.as_millis() as i64;
        loop {
            match self
                .ingest
                .alarm(AlarmOp::Prune {
                    cutoff_ms: cutoff,
                    limit: PRUNE_STEP,
                })
                .await
            {
                Ok(AlarmOutcome::Count(n)) if u64::from(PRUNE_STEP) == n => continue,
                Ok(_) => return,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot prune alarm history");
                    return;
                }
            }
        }
    }
}

/// Alarms one inactivity op changes at most: a fleet going quiet at once
/// is written in several short group commits, not one long one.
const INACTIVITY_CHUNK: usize = 500;

fn split_inactivity(op: AlarmOp) -> Vec<AlarmOp> {
    let AlarmOp::Inactivity {
        rule,
        version,
        raise,
        clear,
    } = op
    else {
        return vec![op];
    };
    let mut ops = Vec::new();
    for chunk in raise.chunks(INACTIVITY_CHUNK) {
        ops.push(AlarmOp::Inactivity {
            rule,
            version,
            raise: chunk.to_vec(),
            clear: Vec::new(),
        });
    }
    for chunk in clear.chunks(INACTIVITY_CHUNK) {
        ops.push(AlarmOp::Inactivity {
            rule,
            version,
            raise: Vec::new(),
            clear: chunk.to_vec(),
        });
    }
    ops
}
