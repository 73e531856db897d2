//! Live counters of the hub, shared by handle (no globals). `hub stats`
//! reads them, and so does the Prometheus endpoint ([`crate::prometheus`]).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};

/// The `state` label of command transitions.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabel {
    pub state: &'static str,
}

#[derive(Debug)]
pub struct HubMetrics {
    live_sessions: AtomicU64,
    pub readings_committed: AtomicU64,
    pub duplicates: AtomicU64,
    pub rejected: AtomicU64,
    pub commits: AtomicU64,
    pub compactions: AtomicU64,
    /// Device sessions admitted, and ended.
    pub connects: AtomicU64,
    pub disconnects: AtomicU64,
    /// Series whose blocks of one level were merged.
    pub merges: AtomicU64,
    pub commit_failures: AtomicU64,
    /// Batches not written because another hub (or a newer stream) had
    /// claimed their device (PostgreSQL's session fencing).
    pub fenced: AtomicU64,
    /// Device Hellos refused for their credentials.
    pub auth_failures: AtomicU64,
    /// Rows the writer holds for its next commit.
    pub uncommitted_rows: AtomicU64,
    pub compaction_failures: AtomicU64,
    /// False from a failed commit until the next one succeeds.
    pub storage_ok: AtomicBool,
    pub mqtt_dropped: AtomicU64,
    pub mqtt_published: AtomicU64,
    /// Failed connections to the broker, and connections lost.
    pub mqtt_connection_errors: AtomicU64,
    pub mqtt_bad_messages: AtomicU64,
    pub mqtt_connected: AtomicBool,
    /// Seconds one group takes to write and commit.
    pub commit_seconds: Histogram,
    /// Seconds from the hub reading a batch to the commit that acks it.
    pub ack_seconds: Histogram,
    pub rows_per_commit: Histogram,
    /// Committed command transitions, by the state reached.
    pub command_transitions: Family<StateLabel, Counter>,
}

impl HubMetrics {
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            live_sessions: AtomicU64::default(),
            readings_committed: AtomicU64::default(),
            duplicates: AtomicU64::default(),
            fenced: AtomicU64::default(),
            rejected: AtomicU64::default(),
            commits: AtomicU64::default(),
            compactions: AtomicU64::default(),
            connects: AtomicU64::default(),
            disconnects: AtomicU64::default(),
            merges: AtomicU64::default(),
            commit_failures: AtomicU64::default(),
            auth_failures: AtomicU64::default(),
            uncommitted_rows: AtomicU64::default(),
            compaction_failures: AtomicU64::default(),
            storage_ok: AtomicBool::new(true),
            mqtt_dropped: AtomicU64::default(),
            mqtt_published: AtomicU64::default(),
            mqtt_connection_errors: AtomicU64::default(),
            mqtt_bad_messages: AtomicU64::default(),
            mqtt_connected: AtomicBool::default(),
            // 1 ms to 16 s.
            commit_seconds: Histogram::new(exponential_buckets(0.001, 2.0, 15)),
            ack_seconds: Histogram::new(exponential_buckets(0.001, 2.0, 15)),
            // 1 to 262,144 rows.
            rows_per_commit: Histogram::new(exponential_buckets(1.0, 4.0, 10)),
            command_transitions: Family::default(),
        })
    }

    pub fn observe(histogram: &Histogram, elapsed: Duration) {
        histogram.observe(elapsed.as_secs_f64());
    }

    pub fn storage_ok(&self) -> bool {
        self.storage_ok.load(Ordering::Relaxed)
    }

    pub fn set_uncommitted_rows(&self, rows: usize) {
        self.uncommitted_rows.store(rows as u64, Ordering::Relaxed);
    }

    pub fn set_storage_ok(&self, ok: bool) {
        self.storage_ok.store(ok, Ordering::Relaxed);
    }

    /// Device streams whose tasks are still running.
    pub fn live_sessions(&self) -> u64 {
        self.live_sessions.load(Ordering::Relaxed)
    }

    /// Counts a session as live until the guard is dropped, after its last
    /// task ended.
    pub fn session_started(self: &Arc<Self>) -> LiveSessionGuard {
        self.live_sessions.fetch_add(1, Ordering::Relaxed);
        LiveSessionGuard(Arc::clone(self))
    }

    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }

    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }
}

pub struct LiveSessionGuard(Arc<HubMetrics>);

impl Drop for LiveSessionGuard {
    fn drop(&mut self) {
        self.0.live_sessions.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Logs one INFO line every `every` while anything is online or moving:
/// devices online, connects/s, disconnects/s and readings/s since the last.
pub async fn log_summary(
    metrics: Arc<HubMetrics>,
    every: std::time::Duration,
    stop: tokio_util::sync::CancellationToken,
) {
    if every.is_zero() {
        return;
    }
    let counters = |m: &HubMetrics| {
        [
            HubMetrics::get(&m.connects),
            HubMetrics::get(&m.disconnects),
            HubMetrics::get(&m.readings_committed),
        ]
    };
    let mut last = counters(&metrics);
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.cancelled() => return,
        }
        let now = counters(&metrics);
        let online = metrics.live_sessions();
        let secs = every.as_secs_f64();
        let rate = |i: usize| ((now[i] - last[i]) as f64 / secs).round() as u64;
        if online > 0 || now != last {
            tracing::info!(
                online,
                connects_per_s = rate(0),
                disconnects_per_s = rate(1),
                readings_per_s = rate(2),
                "fleet"
            );
        }
        last = now;
    }
}
