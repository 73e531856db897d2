//! Builds the hub, spawns its tasks and owns shutdown. The only place that
//! wires components together.
//!
//! The writer and the commands task are critical: if either ends before
//! shutdown (a panic, say), the hub turns NOT_SERVING in gRPC health at once
//! and [`Hub::run_until_signal`] shuts down and returns the error, so the
//! process exits non-zero instead of taking readings it can never store.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use telemetry_proto::v1::{
    device_gateway_server::DeviceGatewayServer, operator_server::OperatorServer,
};
use tokio::task::{AbortHandle, JoinHandle};
use tokio::time::{Instant, timeout_at};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::transport::Server;
use tonic::transport::server::TcpIncoming;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

use crate::auth::{AuthPolicy, FailureLimiter};
use crate::commands::{self, CommandSettings, Commands};
use crate::config::Settings;
use crate::config::TlsSettings;
use crate::grpc::OperatorAuth;
use crate::grpc::session::SessionContext;
use crate::grpc::{DeviceGatewayService, OperatorService};
use crate::ingest::{self, IngestQueue, Writer, WriterSettings};
use crate::metrics::HubMetrics;
use crate::operator::{Backups, Operations, OperationsParts};
use crate::registry::SessionRegistry;
use crate::store::commands::CommandStore;
use crate::store::{self, Store};

/// The tasks the hub cannot run without.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CriticalTask {
    Writer,
    Commands,
}

impl CriticalTask {
    fn name(self) -> &'static str {
        match self {
            CriticalTask::Writer => "the ingest writer",
            CriticalTask::Commands => "the commands task",
        }
    }
}

/// Set once, when a critical task ends before shutdown.
#[derive(Default)]
struct Failure {
    happened: CancellationToken,
    reason: Mutex<Option<String>>,
}

impl Failure {
    fn record(&self, reason: String) {
        let mut slot = self.reason.lock().unwrap_or_else(|e| e.into_inner());
        slot.get_or_insert(reason);
        self.happened.cancel();
    }

    fn reason(&self) -> String {
        self.reason
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .unwrap_or_default()
    }
}

/// Watches a critical task: if it ends while the hub is not stopping, the
/// failure is recorded (health turns NOT_SERVING from it).
fn supervise(
    task: CriticalTask,
    handle: JoinHandle<()>,
    stopping: CancellationToken,
    failure: Arc<Failure>,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let result = handle.await;
        if stopping.is_cancelled() {
            return;
        }
        let how = match result {
            Ok(()) => "stopped".to_owned(),
            Err(e) if e.is_panic() => format!("panicked: {e}"),
            Err(_) => "was cancelled".to_owned(),
        };
        let reason = format!("{} {how}; the hub cannot go on", task.name());
        tracing::error!("{reason}");
        failure.record(reason);
    })
}

/// Keeps gRPC health true: NOT_SERVING everywhere after a critical task
/// failed; the device gateway NOT_SERVING while storage fails.
async fn report_health(
    reporter: HealthReporter,
    metrics: Arc<HubMetrics>,
    failure: Arc<Failure>,
    stop: CancellationToken,
) {
    let mut shown: Option<(bool, bool)> = None;
    loop {
        let failed = failure.happened.is_cancelled();
        let storage_ok = metrics.storage_ok();
        if shown != Some((failed, storage_ok)) {
            show_health(&reporter, !failed, !failed && storage_ok).await;
            shown = Some((failed, storage_ok));
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(100)) => {}
            _ = failure.happened.cancelled(), if !failed => {}
            _ = stop.cancelled() => {
                show_health(&reporter, false, false).await;
                return;
            }
        }
    }
}

/// The hub as a whole ("") and the Operator API serve while `hub` is
/// true; the device gateway while `gateway` is.
async fn show_health(reporter: &HealthReporter, hub: bool, gateway: bool) {
    let status = |ok: bool| {
        if ok {
            ServingStatus::Serving
        } else {
            ServingStatus::NotServing
        }
    };
    reporter.set_service_status("", status(hub)).await;
    reporter
        .set_service_status("telemetry.v1.Operator", status(hub))
        .await;
    reporter
        .set_service_status("telemetry.v1.DeviceGateway", status(gateway))
        .await;
}

/// A running hub. Dropping it without [`Hub::shutdown`] aborts nothing
/// cleanly; call `shutdown`.
pub struct Hub {
    addr: SocketAddr,
    settings: Settings,
    metrics: Arc<HubMetrics>,
    ingest: IngestQueue,
    registry: Arc<SessionRegistry>,
    store: Store,
    commands: Commands,
    command_store: CommandStore,
    tracker: TaskTracker,
    sessions_stop: CancellationToken,
    server_stop: CancellationToken,
    writer_stop: CancellationToken,
    commands_stop: CancellationToken,
    bridge_stop: CancellationToken,
    bridge: Option<JoinHandle<()>>,
    server: JoinHandle<Result<(), tonic::transport::Error>>,
    /// The supervisors of the writer and the commands task: they end when
    /// the task does.
    writer: JoinHandle<()>,
    commands_task: JoinHandle<()>,
    writer_abort: AbortHandle,
    commands_abort: AbortHandle,
    stopping: CancellationToken,
    failure: Arc<Failure>,
    health: JoinHandle<()>,
    metrics_server: Option<(SocketAddr, JoinHandle<std::io::Result<()>>)>,
    http: Option<crate::http::HttpServer>,
    retention: Option<JoinHandle<()>>,
    /// PostgreSQL: hears other hubs' claims and command changes.
    claims: Option<JoinHandle<()>>,
    /// PostgreSQL: this hub's heartbeat and its devices' presence.
    presence: Option<JoinHandle<()>>,
    hub_id: Arc<str>,
}

impl Hub {
    /// Opens the store, starts the writer and the gRPC server; returns once
    /// the server is listening.
    pub async fn start(settings: Settings) -> anyhow::Result<Hub> {
        settings.validate()?;
        let (store, store_writer) = store::open(&settings.storage).await.with_context(|| {
            let st = &settings.storage;
            match st.backend {
                crate::config::Backend::Sqlite => {
                    format!("cannot open the database {}", st.path.display())
                }
                crate::config::Backend::Postgres => {
                    format!(
                        "cannot open the PostgreSQL database {} (storage.url)",
                        st.url
                    )
                }
            }
        })?;
        let metrics = HubMetrics::new();
        let registry = SessionRegistry::new();
        let hub_id = crate::cluster::new_hub_id();
        let auth = Arc::new(AuthPolicy::new(&settings.auth));
        let tracker = TaskTracker::new();

        let (ingest, queue_rx) = ingest::queue(settings.ingest.queue_capacity);
        let (fanout, _) = tokio::sync::broadcast::channel(settings.ingest.fanout_capacity);
        let writer = Writer::new(
            store_writer,
            queue_rx,
            WriterSettings {
                max_batch_rows: settings.ingest.max_batch_rows,
                max_batch_delay: settings.ingest.max_batch_delay,
                max_sensors: settings.ingest.max_sensors,
                max_sensors_per_device: settings.ingest.max_sensors_per_device,
                compact_rows: settings.storage.compact_rows,
                hub_id: Arc::clone(&hub_id),
                cached_devices: settings.ingest.cached_devices,
            },
            Arc::clone(&metrics),
            fanout.clone(),
        );
        let stopping = CancellationToken::new();
        let failure = Arc::new(Failure::default());
        let writer_stop = CancellationToken::new();
        // Cancelled when shutdown begins: sessions end, the writer commits
        // what it holds at once so their last acks go out.
        let sessions_stop = CancellationToken::new();
        let writer = tokio::spawn(writer.run(writer_stop.clone(), sessions_stop.clone()));
        let writer_abort = writer.abort_handle();
        let writer = supervise(
            CriticalTask::Writer,
            writer,
            stopping.clone(),
            Arc::clone(&failure),
        );

        let (command_store, command_writer) = store::commands::open(&settings.storage)
            .await
            .context("cannot open the command log")?;
        let c = &settings.commands;
        let (commands, command_actor) = commands::channel(
            CommandSettings {
                default_ttl: c.default_ttl,
                max_pending_per_device: c.max_pending_per_device,
                ack_timeout: c.ack_timeout,
                max_attempts: c.max_attempts,
                outbox: c.outbox,
                max_params_bytes: c.max_params_bytes,
                retention: c.retention,
            },
            command_store.clone(),
            command_writer,
            store.clone(),
        );
        let commands_stop = CancellationToken::new();
        let commands_task = tokio::spawn(
            command_actor
                .with_metrics(Arc::clone(&metrics))
                .with_hub_id(Arc::clone(&hub_id))
                .run(commands_stop.clone()),
        );
        let commands_abort = commands_task.abort_handle();
        let commands_task = supervise(
            CriticalTask::Commands,
            commands_task,
            stopping.clone(),
            Arc::clone(&failure),
        );

        let bridge_stop = CancellationToken::new();
        let bridge = settings.mqtt.enabled.then(|| {
            let cluster =
                (settings.storage.backend == crate::config::Backend::Postgres).then_some(&*hub_id);
            let bridge = crate::mqtt::Bridge::new(
                settings.mqtt.clone(),
                commands.clone(),
                Arc::clone(&registry),
                Arc::clone(&metrics),
                cluster,
            );
            // Each hub publishes the command changes it committed itself.
            tokio::spawn(bridge.run(
                fanout.subscribe(),
                registry.subscribe(),
                commands.subscribe_local(),
                bridge_stop.clone(),
            ))
        });

        // Before the first stream: other hubs' notices and this hub's
        // heartbeat (PostgreSQL).
        let claims = crate::cluster::listen(
            &store,
            Arc::clone(&hub_id),
            Arc::clone(&registry),
            commands.clone(),
            stopping.clone(),
        )
        .await
        .context("cannot listen for other hubs' notices")?
        .map(tokio::spawn);
        let presence = crate::cluster::keep_presence(
            store.clone(),
            Arc::clone(&hub_id),
            Arc::clone(&registry),
            stopping.clone(),
        )
        .await
        .context("cannot record this hub's heartbeat")?
        .map(tokio::spawn);
        let server_settings = &settings.server;
        let ctx = Arc::new(SessionContext {
            ingest: ingest.clone(),
            registry: Arc::clone(&registry),
            metrics: Arc::clone(&metrics),
            commands: commands.clone(),
            tracker: tracker.clone(),
            shutdown: sessions_stop.clone(),
            max_batch: server_settings.max_batch,
            max_message_bytes: server_settings.max_message_bytes,
            hello_timeout: server_settings.hello_timeout,
            drain_timeout: server_settings.drain_timeout,
            send_timeout: server_settings.send_timeout,
            max_replies_per_sec: server_settings.max_replies_per_sec,
            max_readings_per_sec: server_settings.max_readings_per_sec,
            max_devices: server_settings.max_devices,
            max_clock_skew: settings.ingest.max_clock_skew,
            retention: (!settings.storage.retention.is_zero())
                .then_some(settings.storage.retention),
            auth: Arc::clone(&auth),
            store: store.clone(),
            failures: FailureLimiter::new(settings.auth.max_failures_per_minute),
            refusals: std::sync::Mutex::new(crate::throttle::LogThrottle::new(
                Duration::from_secs(10),
            )),
        });
        let gateway = DeviceGatewayServer::new(DeviceGatewayService::new(
            Arc::clone(&ctx),
            server_settings.outbound_buffer,
        ))
        .max_decoding_message_size(server_settings.max_message_bytes);
        let ops = Arc::new(Operations::new(OperationsParts {
            store: store.clone(),
            commands: ctx.commands.clone(),
            registry: Arc::clone(&ctx.registry),
            metrics: Arc::clone(&ctx.metrics),
            ingest: ctx.ingest.clone(),
            tracker: ctx.tracker.clone(),
            shutdown: ctx.shutdown.clone(),
            fanout: fanout.clone(),
            backups: Backups {
                command_store: command_store.clone(),
                root: settings.storage.backup_root(),
                running: tokio::sync::Mutex::new(()),
            },
            max_watches: settings.server.max_watches,
            max_queries: settings.server.max_queries,
        }));
        let operator = OperatorAuth::new(
            OperatorServer::new(OperatorService {
                ops: Arc::clone(&ops),
                tracker: ctx.tracker.clone(),
            }),
            Arc::clone(&auth),
        );
        // Both versions of reflection: grpcurl and grpcui ask v1, Python's
        // grpcio-reflection and many GUI clients still ask v1alpha.
        let reflection = || {
            tonic_reflection::server::Builder::configure()
                .register_encoded_file_descriptor_set(telemetry_proto::v1::FILE_DESCRIPTOR_SET)
                .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        };
        let reflection_v1alpha = reflection().build_v1alpha().context("gRPC reflection")?;
        let reflection = reflection().build_v1().context("gRPC reflection")?;

        let retention = (!settings.storage.retention.is_zero()).then(|| {
            tokio::spawn(crate::retention::run(
                ingest.clone(),
                store.clone(),
                settings.storage.retention,
                stopping.clone(),
            ))
        });

        tokio::spawn(crate::metrics::log_summary(
            Arc::clone(&metrics),
            settings.log.summary_interval,
            stopping.clone(),
        ));

        let (health_reporter, health_service) = tonic_health::server::health_reporter();
        let health = tokio::spawn(report_health(
            health_reporter,
            Arc::clone(&metrics),
            Arc::clone(&failure),
            stopping.clone(),
        ));

        let metrics_server = if settings.metrics.enabled {
            let listener = tokio::net::TcpListener::bind(settings.metrics.listen)
                .await
                .with_context(|| {
                    format!(
                        "cannot listen on {} (metrics.listen)",
                        settings.metrics.listen
                    )
                })?;
            let metrics_addr = listener.local_addr()?;
            if !metrics_addr.ip().is_loopback() {
                tracing::warn!(%metrics_addr,
                    "metrics.listen is not a loopback address: anyone who reaches it reads the \
                     fleet's figures (no token is asked); keep it on loopback or firewall it");
            }
            let (db_size, sized) = match settings.storage.backend {
                crate::config::Backend::Sqlite => {
                    let path = &settings.storage.path;
                    let commands_path = crate::store::commands::commands_path(path);
                    let files = [path.clone(), commands_path]
                        .into_iter()
                        .flat_map(|p| {
                            let wal = PathBuf::from(format!("{}-wal", p.display()));
                            [p, wal]
                        })
                        .collect();
                    (crate::prometheus::DbSize::Files(files), None)
                }
                crate::config::Backend::Postgres => {
                    let bytes = Arc::new(std::sync::atomic::AtomicU64::new(0));
                    (
                        crate::prometheus::DbSize::Postgres(Arc::clone(&bytes)),
                        Some((store.clone(), bytes)),
                    )
                }
            };
            let registry = crate::prometheus::registry(
                Arc::clone(&metrics),
                tracker.clone(),
                ingest.clone(),
                db_size,
            );
            tracing::info!("metrics on http://{metrics_addr}/metrics");
            Some((
                metrics_addr,
                tokio::spawn(crate::prometheus::serve(
                    listener,
                    registry,
                    sized,
                    stopping.clone(),
                )),
            ))
        } else {
            None
        };

        let http = if settings.http.enabled {
            let server = crate::http::start(
                &settings.http,
                Arc::clone(&ops),
                Arc::clone(&auth),
                tracker.clone(),
                sessions_stop.clone(),
                stopping.clone(),
            )
            .await
            .with_context(|| format!("cannot listen on {} (http.listen)", settings.http.listen))?;
            tracing::info!("web console on http://{}/", server.addr);
            Some(server)
        } else {
            None
        };

        let listener = tokio::net::TcpListener::bind(server_settings.listen)
            .await
            .with_context(|| format!("cannot listen on {}", server_settings.listen))?;
        let addr = listener.local_addr()?;
        let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
        let server_stop = CancellationToken::new();
        let mut builder = Server::builder();
        if let Some(tls) = server_tls(&server_settings.tls)? {
            builder = builder.tls_config(tls).context("server.tls")?;
        }
        let server = tokio::spawn(
            builder
                .http2_keepalive_interval(Some(server_settings.keepalive))
                .http2_keepalive_timeout(Some(server_settings.keepalive))
                .tcp_keepalive(Some(server_settings.keepalive))
                .max_concurrent_streams(server_settings.max_concurrent_streams)
                .add_service(health_service)
                .add_service(reflection)
                .add_service(reflection_v1alpha)
                .add_service(gateway)
                .add_service(operator)
                .serve_with_incoming_shutdown(incoming, server_stop.clone().cancelled_owned()),
        );
        let scheme = if server_settings.tls.enabled() {
            "https"
        } else {
            "http"
        };
        tracing::info!(devices = ?settings.auth.devices, operators_open = auth.operators_open(),
            hub_id = %hub_id, backend = ?settings.storage.backend, "listening on {addr} ({scheme})");
        Ok(Hub {
            addr,
            settings,
            metrics,
            ingest,
            registry,
            store,
            commands,
            command_store,
            tracker,
            sessions_stop,
            server_stop,
            writer_stop,
            commands_stop,
            bridge_stop,
            bridge,
            server,
            writer,
            commands_task,
            writer_abort,
            commands_abort,
            stopping,
            failure,
            health,
            metrics_server,
            http,
            retention,
            claims,
            presence,
            hub_id,
        })
    }

    /// This hub's id for the life of its process (written into the devices
    /// it claims).
    pub fn hub_id(&self) -> &str {
        &self.hub_id
    }

    /// Where `/metrics` is served (when `metrics.enabled`).
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_server.as_ref().map(|(addr, _)| *addr)
    }

    /// Where the web console and its API are served (when `http.enabled`).
    pub fn http_addr(&self) -> Option<SocketAddr> {
        self.http.as_ref().map(|h| h.addr)
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn metrics(&self) -> &Arc<HubMetrics> {
        &self.metrics
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    pub fn commands(&self) -> &Commands {
        &self.commands
    }

    pub fn registry(&self) -> &Arc<SessionRegistry> {
        &self.registry
    }

    /// Tasks running for streams and queries (two per device stream).
    pub fn live_tasks(&self) -> usize {
        self.tracker.len()
    }

    /// Resolves when a critical task has failed, with the reason.
    pub async fn failed(&self) -> String {
        self.failure.happened.cancelled().await;
        self.failure.reason()
    }

    /// Fault injection for tests: ends a critical task as a panic would.
    #[doc(hidden)]
    pub fn kill_for_test(&self, task: CriticalTask) {
        match task {
            CriticalTask::Writer => self.writer_abort.abort(),
            CriticalTask::Commands => self.commands_abort.abort(),
        }
    }

    /// Serves until SIGINT or SIGTERM (or until the server or a critical
    /// task fails), then shuts down gracefully. A failure is returned as an
    /// error after the shutdown, so the process exits non-zero.
    pub async fn run_until_signal(mut self) -> anyhow::Result<()> {
        let mut failure = None;
        tokio::select! {
            signal = shutdown_signal() => {
                signal?;
                tracing::info!("signal received");
            }
            result = &mut self.server => {
                tracing::error!("the gRPC server stopped by itself");
                result.context("server task")?.context("gRPC server")?;
            }
            _ = self.failure.happened.cancelled() => {
                failure = Some(self.failure.reason());
            }
        }
        self.shutdown().await?;
        match failure {
            Some(reason) => Err(anyhow::anyhow!(reason)),
            None => Ok(()),
        }
    }

    /// Graceful shutdown, bounded by `server.shutdown_timeout`: stop
    /// accepting, let sessions flush their acks and end, commit what is
    /// queued, close the database.
    pub async fn shutdown(self) -> anyhow::Result<()> {
        let deadline = Instant::now() + self.settings.server.shutdown_timeout;
        tracing::info!("shutting down");
        self.stopping.cancel();
        self.server_stop.cancel();
        self.sessions_stop.cancel();
        self.tracker.close();
        // Sessions wait for their last commits: the writer still runs here.
        if timeout_at(deadline, self.tracker.wait()).await.is_err() {
            tracing::warn!(
                left = self.tracker.len(),
                "streams and queries did not end within the shutdown timeout"
            );
        }
        if let Some(claims) = self.claims
            && timeout_at(deadline, claims).await.is_err()
        {
            tracing::warn!("the cluster listener did not stop within the shutdown timeout");
        }
        if let Some(presence) = self.presence
            && timeout_at(deadline, presence).await.is_err()
        {
            tracing::warn!("the presence task did not stop within the shutdown timeout");
        }
        // Retention stopped at `stopping`; its last step is in the queue.
        if let Some(retention) = self.retention
            && timeout_at(deadline, retention).await.is_err()
        {
            tracing::warn!("retention did not stop within the shutdown timeout");
        }
        // Devices are offline now; the bridge says so and disconnects.
        self.bridge_stop.cancel();
        if let Some(mut bridge) = self.bridge
            && timeout_at(deadline, &mut bridge).await.is_err()
        {
            bridge.abort();
            tracing::warn!("the MQTT bridge did not stop within the shutdown timeout");
        }
        self.writer_stop.cancel();
        self.commands_stop.cancel();
        let mut server = self.server;
        match timeout_at(deadline, &mut server).await {
            Ok(Ok(Err(e))) => tracing::warn!(error = %e, "gRPC server ended with an error"),
            Ok(_) => {}
            Err(_) => {
                tracing::warn!("connections still open at the shutdown timeout; closing them");
                server.abort();
            }
        }
        drop(self.ingest);
        let mut writer = self.writer;
        if timeout_at(deadline, &mut writer).await.is_err() {
            self.writer_abort.abort();
            anyhow::bail!("the writer did not finish within the shutdown timeout");
        }
        drop(self.commands);
        let mut commands_task = self.commands_task;
        if timeout_at(deadline, &mut commands_task).await.is_err() {
            self.commands_abort.abort();
            tracing::warn!("the commands task did not finish within the shutdown timeout");
        }
        let _ = self.health.await;
        if let Some((_, server)) = self.metrics_server {
            let _ = server.await;
        }
        if let Some(http) = self.http {
            let mut task = http.task;
            if timeout_at(deadline, &mut task).await.is_err() {
                task.abort();
                tracing::warn!("HTTP connections still open at the shutdown timeout; closed them");
            }
        }
        self.store.close().await;
        self.command_store.close().await;
        tracing::info!("shutdown complete");
        Ok(())
    }
}

/// The server's TLS settings from `server.tls`: none without a
/// certificate; client certificates are asked for (and must chain to
/// `client_ca`) when one is given, but stay optional at the TLS layer so
/// operators without one can still use their tokens; `auth.devices = "tls"`
/// then insists on them for devices.
fn server_tls(tls: &TlsSettings) -> anyhow::Result<Option<tonic::transport::ServerTlsConfig>> {
    use tonic::transport::{Certificate, Identity, ServerTlsConfig};
    if !tls.enabled() {
        return Ok(None);
    }
    let read = |path: &std::path::Path, key: &str| {
        std::fs::read(path).with_context(|| format!("cannot read {key} {}", path.display()))
    };
    let identity = Identity::from_pem(
        read(&tls.cert, "server.tls.cert")?,
        read(&tls.key, "server.tls.key")?,
    );
    let mut config = ServerTlsConfig::new().identity(identity);
    if tls.verifies_clients() {
        config = config
            .client_ca_root(Certificate::from_pem(read(
                &tls.client_ca,
                "server.tls.client_ca",
            )?))
            .client_auth_optional(true);
    }
    Ok(Some(config))
}

async fn shutdown_signal() -> std::io::Result<()> {
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            r = tokio::signal::ctrl_c() => r,
            _ = term.recv() => Ok(()),
        }
    }
    #[cfg(not(unix))]
    {
        tokio::signal::ctrl_c().await
    }
}
