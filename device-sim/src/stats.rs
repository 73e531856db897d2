//! Counters shared by every device of a fleet, readable while it runs.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;

#[derive(Debug)]
pub struct FleetStats {
    /// Devices with a live stream (after Welcome).
    pub online: AtomicU64,
    /// Readings sent at least once.
    pub sent: AtomicU64,
    /// Readings the hub acknowledged (stored, rejected or duplicate).
    pub acked: AtomicU64,
    pub duplicates: AtomicU64,
    pub rejected: AtomicU64,
    /// Samples not taken because the unacked buffer was full.
    pub dropped_at_source: AtomicU64,
    pub reconnects: AtomicU64,
    pub commands_received: AtomicU64,
    /// Commands run (duplicates of a command already run are not).
    pub commands_executed: AtomicU64,
    /// Acks for a seq beyond any this device sent (the stream is dropped).
    pub bad_acks: AtomicU64,
    /// Connections that failed in the TLS handshake.
    pub tls_failures: AtomicU64,
    /// Seqs the hub acknowledged and later, in a Welcome, no longer had: an
    /// acked reading lost. Must stay 0.
    pub lost_acks: AtomicU64,
    /// Desired versions applied by devices' twins.
    pub twin_applied: AtomicU64,
    /// Reported patches the hub acknowledged.
    pub reports_acked: AtomicU64,
    /// Batch sent -> covering Ack received, in microseconds.
    ack_latency_us: Mutex<Histogram<u64>>,
    /// When the fleet was steady: every device online for a while (see
    /// `fleet::run`). Batches sent from then on are also counted in...
    steady_since: std::sync::OnceLock<std::time::Instant>,
    /// ...this: the ack latency without the connection ramp, of acks
    /// received before the fleet was told to stop (from then on its own
    /// drain, every device waking at once, would be measured too).
    steady_latency_us: Mutex<Histogram<u64>>,
    stopping_since: std::sync::OnceLock<std::time::Instant>,
    /// Acks received since the last progress line (`take_recent_ms`).
    recent_latency_us: Mutex<Histogram<u64>>,
}

impl Default for FleetStats {
    fn default() -> Self {
        Self {
            online: AtomicU64::new(0),
            sent: AtomicU64::new(0),
            acked: AtomicU64::new(0),
            duplicates: AtomicU64::new(0),
            rejected: AtomicU64::new(0),
            dropped_at_source: AtomicU64::new(0),
            reconnects: AtomicU64::new(0),
            commands_received: AtomicU64::new(0),
            commands_executed: AtomicU64::new(0),
            bad_acks: AtomicU64::new(0),
            tls_failures: AtomicU64::new(0),
            lost_acks: AtomicU64::new(0),
            twin_applied: AtomicU64::new(0),
            reports_acked: AtomicU64::new(0),
            // Three significant digits, auto-resizing: cannot fail.
            ack_latency_us: Mutex::new(Histogram::new(3).expect("3 significant figures is valid")),
            steady_since: std::sync::OnceLock::new(),
            stopping_since: std::sync::OnceLock::new(),
            steady_latency_us: Mutex::new(
                Histogram::new(3).expect("3 significant figures is valid"),
            ),
            recent_latency_us: Mutex::new(
                Histogram::new(3).expect("3 significant figures is valid"),
            ),
        }
    }
}

impl FleetStats {
    pub fn inc(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }

    /// A batch sent at `sent_at` was acked `latency` later.
    pub fn record_ack_latency(&self, sent_at: std::time::Instant, latency: Duration) {
        let us = latency.as_micros().min(u128::from(u64::MAX)) as u64;
        let record = |h: &Mutex<Histogram<u64>>| {
            let _ = h
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .record(us.max(1));
        };
        record(&self.ack_latency_us);
        record(&self.recent_latency_us);
        if self
            .steady_since
            .get()
            .is_some_and(|since| sent_at >= *since)
            && self.stopping_since.get().is_none()
        {
            record(&self.steady_latency_us);
        }
    }

    /// The fleet was told to stop: acks from now on are not steady.
    pub fn mark_stopping(&self) {
        let _ = self.stopping_since.set(std::time::Instant::now());
    }

    /// From now on batches sent count as steady too (once).
    pub fn mark_steady(&self) {
        let _ = self.steady_since.set(std::time::Instant::now());
    }

    /// Ack latency quantile in milliseconds (0 when nothing was recorded).
    pub fn ack_latency_ms(&self, quantile: f64) -> f64 {
        Self::quantile_ms(&self.ack_latency_us, quantile)
    }

    /// The ack latency quantile of the acks received since the last call
    /// (a progress line's window), and starts a new window.
    pub fn take_recent_ms(&self, quantile: f64) -> f64 {
        let q = Self::quantile_ms(&self.recent_latency_us, quantile);
        self.recent_latency_us
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .reset();
        q
    }

    fn quantile_ms(h: &Mutex<Histogram<u64>>, quantile: f64) -> f64 {
        let h = h.lock().unwrap_or_else(|e| e.into_inner());
        if h.is_empty() {
            0.0
        } else {
            h.value_at_quantile(quantile) as f64 / 1000.0
        }
    }

    pub fn summary(&self, devices: usize, clean_devices: usize, elapsed: Duration) -> FleetSummary {
        FleetSummary {
            devices,
            sent: Self::get(&self.sent),
            acked: Self::get(&self.acked),
            duplicates: Self::get(&self.duplicates),
            rejected: Self::get(&self.rejected),
            dropped_at_source: Self::get(&self.dropped_at_source),
            reconnects: Self::get(&self.reconnects),
            commands_received: Self::get(&self.commands_received),
            commands_executed: Self::get(&self.commands_executed),
            bad_acks: Self::get(&self.bad_acks),
            lost_acks: Self::get(&self.lost_acks),
            elapsed_s: (elapsed.as_secs_f64() * 1000.0).round() / 1000.0,
            clean_devices,
            ack_p50_ms: self.ack_latency_ms(0.50),
            ack_p99_ms: self.ack_latency_ms(0.99),
            steady_p50_ms: Self::quantile_ms(&self.steady_latency_us, 0.50),
            steady_p99_ms: Self::quantile_ms(&self.steady_latency_us, 0.99),
        }
    }
}

/// What a fleet run came to; printed as one JSON line by `--summary json`.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct FleetSummary {
    pub devices: usize,
    pub sent: u64,
    pub acked: u64,
    pub duplicates: u64,
    pub rejected: u64,
    pub dropped_at_source: u64,
    pub reconnects: u64,
    pub commands_received: u64,
    pub commands_executed: u64,
    pub bad_acks: u64,
    pub lost_acks: u64,
    pub elapsed_s: f64,
    /// Devices that ended with everything acked and the hub's OK.
    pub clean_devices: usize,
    pub ack_p50_ms: f64,
    pub ack_p99_ms: f64,
    /// The same for batches sent once every device had been online for
    /// [`crate::fleet::steady_after`] and acked before the fleet was told
    /// to stop (0 when the run never got there): the connection ramp and
    /// the simulator's own drain left out.
    pub steady_p50_ms: f64,
    pub steady_p99_ms: f64,
}

impl FleetSummary {
    pub fn all_clean(&self) -> bool {
        self.clean_devices == self.devices
    }
}
