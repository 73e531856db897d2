//! The Prometheus endpoint (`metrics.enabled`): `GET /metrics` on
//! `metrics.listen`, in the OpenMetrics text format (prometheus-client).
//! Counters and gauges are read from [`HubMetrics`] at each scrape, so
//! `hub stats` and Prometheus never disagree.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::header::CONTENT_TYPE;
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::ingest::IngestQueue;
use crate::metrics::HubMetrics;

/// What a scrape reads besides the counters.
#[derive(Debug)]
struct Sources {
    metrics: Arc<HubMetrics>,
    tracker: TaskTracker,
    ingest: IngestQueue,
    db_size: DbSize,
}

/// Where `hub_db_bytes` comes from.
#[derive(Debug, Clone)]
pub enum DbSize {
    /// SQLite: the database files and their WAL.
    Files(Vec<PathBuf>),
    /// PostgreSQL: `pg_database_size`, read by each scrape before encoding
    /// (a collector cannot wait on a query).
    Postgres(Arc<AtomicU64>),
}

impl Collector for Sources {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let m = &self.metrics;
        let load = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed);
        let counters: [(&str, &str, u64); 13] = [
            (
                "hub_readings_committed",
                "Readings stored (committed).",
                load(&m.readings_committed),
            ),
            (
                "hub_readings_duplicate",
                "Readings dropped as duplicates.",
                load(&m.duplicates),
            ),
            (
                "hub_batches_fenced",
                "Batches not written: another hub had claimed their device.",
                load(&m.fenced),
            ),
            (
                "hub_readings_rejected",
                "Readings rejected as invalid or over a limit.",
                load(&m.rejected),
            ),
            (
                "hub_commits",
                "Write transactions of readings committed.",
                load(&m.commits),
            ),
            (
                "hub_commit_failures",
                "Write transactions of readings that failed.",
                load(&m.commit_failures),
            ),
            (
                "hub_compactions",
                "Runs of staged readings encoded into compressed blocks.",
                load(&m.compactions),
            ),
            (
                "hub_block_merges",
                "Series whose blocks of one level were merged into one.",
                load(&m.merges),
            ),
            (
                "hub_auth_failures",
                "Device Hellos refused for their credentials.",
                load(&m.auth_failures),
            ),
            (
                "hub_mqtt_published",
                "Messages handed to the MQTT broker.",
                load(&m.mqtt_published),
            ),
            (
                "hub_mqtt_dropped",
                "MQTT messages dropped while the broker was away.",
                load(&m.mqtt_dropped),
            ),
            (
                "hub_mqtt_bad_messages",
                "Bad messages received on the MQTT commands topic.",
                load(&m.mqtt_bad_messages),
            ),
            (
                "hub_mqtt_connection_errors",
                "Failed or lost connections to the MQTT broker.",
                load(&m.mqtt_connection_errors),
            ),
        ];
        for (name, help, value) in counters {
            let counter = ConstCounter::new(value);
            counter.encode(encoder.encode_descriptor(
                name,
                help,
                None,
                counter.metric_type(),
            )?)?;
        }
        let db_bytes: u64 = match &self.db_size {
            DbSize::Files(files) => files
                .iter()
                .filter_map(|f| std::fs::metadata(f).ok())
                .map(|meta| meta.len())
                .sum(),
            DbSize::Postgres(bytes) => bytes.load(Ordering::Relaxed),
        };
        let gauges: [(&str, &str, i64); 7] = [
            (
                "hub_live_sessions",
                "Device streams open now.",
                m.live_sessions() as i64,
            ),
            (
                "hub_live_tasks",
                "Tasks running for streams and queries.",
                self.tracker.len() as i64,
            ),
            (
                "hub_ingest_queue_depth",
                "Batches waiting for the writer.",
                self.ingest.depth() as i64,
            ),
            (
                "hub_ingest_uncommitted",
                "Readings the writer holds for its next commit.",
                load(&m.uncommitted_rows) as i64,
            ),
            (
                "hub_storage_ok",
                "1 unless the last commit failed.",
                i64::from(m.storage_ok()),
            ),
            (
                "hub_mqtt_connected",
                "1 while the MQTT bridge is connected.",
                i64::from(m.mqtt_connected.load(Ordering::Relaxed)),
            ),
            (
                "hub_db_bytes",
                "Size of the database: SQLite's files with their WAL, or the PostgreSQL database.",
                db_bytes as i64,
            ),
        ];
        for (name, help, value) in gauges {
            let gauge = ConstGauge::new(value);
            gauge.encode(encoder.encode_descriptor(name, help, None, gauge.metric_type())?)?;
        }
        Ok(())
    }
}

/// Every metric of the hub, ready to encode.
pub fn registry(
    metrics: Arc<HubMetrics>,
    tracker: TaskTracker,
    ingest: IngestQueue,
    db_size: DbSize,
) -> Registry {
    let mut registry = Registry::default();
    registry.register(
        "hub_commit_seconds",
        "Time to write and commit one group of readings.",
        metrics.commit_seconds.clone(),
    );
    registry.register(
        "hub_ack_seconds",
        "Time from the hub reading a batch to the commit that acks it.",
        metrics.ack_seconds.clone(),
    );
    registry.register(
        "hub_rows_per_commit",
        "Readings in one commit.",
        metrics.rows_per_commit.clone(),
    );
    registry.register(
        "hub_command_transitions",
        "Command state changes committed, by state.",
        metrics.command_transitions.clone(),
    );
    registry.register_collector(Box::new(Sources {
        metrics,
        tracker,
        ingest,
        db_size,
    }));
    registry
}

/// Serves `/metrics` until `stop`.
/// What a scrape needs: the registry and, on PostgreSQL, the store to size.
struct Scrape {
    registry: Registry,
    db_size: Option<(crate::store::Store, Arc<AtomicU64>)>,
}

/// Serves `/metrics` until `stop`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    registry: Registry,
    db_size: Option<(crate::store::Store, Arc<AtomicU64>)>,
    stop: CancellationToken,
) -> std::io::Result<()> {
    let app = Router::new()
        .route("/metrics", get(scrape))
        .with_state(Arc::new(Scrape { registry, db_size }));
    axum::serve(listener, app)
        .with_graceful_shutdown(stop.cancelled_owned())
        .await
}

async fn scrape(State(scrape): State<Arc<Scrape>>) -> impl IntoResponse {
    if let Some((store, bytes)) = &scrape.db_size {
        match store.database_bytes().await {
            Ok(n) => bytes.store(n, Ordering::Relaxed),
            Err(e) => tracing::warn!(error = %e, "cannot read the database's size"),
        }
    }
    let mut body = String::new();
    if prometheus_client::encoding::text::encode(&mut body, &scrape.registry).is_err() {
        return (
            axum::http::StatusCode::INTERNAL_SERVER_ERROR,
            [(CONTENT_TYPE, "text/plain")],
            "cannot encode the metrics".to_owned(),
        );
    }
    (
        axum::http::StatusCode::OK,
        [(
            CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        body,
    )
}
