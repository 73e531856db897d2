//! Live counters of the hub, shared by handle (no globals).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

#[derive(Debug, Default)]
pub struct HubMetrics {
    live_sessions: AtomicU64,
    pub readings_committed: AtomicU64,
    pub duplicates: AtomicU64,
    pub rejected: AtomicU64,
    pub commits: AtomicU64,
    pub compactions: AtomicU64,
    pub commit_failures: AtomicU64,
    /// Device Hellos refused for their credentials.
    pub auth_failures: AtomicU64,
    /// Rows the writer holds for its next commit.
    pub uncommitted_rows: AtomicU64,
    pub compaction_failures: AtomicU64,
    /// False from a failed commit until the next one succeeds.
    pub storage_ok: AtomicBool,
    pub mqtt_dropped: AtomicU64,
    pub mqtt_bad_messages: AtomicU64,
    pub mqtt_connected: AtomicBool,
}

impl HubMetrics {
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            storage_ok: AtomicBool::new(true),
            ..Self::default()
        })
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
