//! Builds the hub, spawns its tasks and owns shutdown. The only place that
//! wires components together.
//!
//! Each component (storage and the writer, commands, the cluster tasks, the
//! MQTT bridge, background jobs, metrics, HTTP, gRPC and its device
//! streams) has one start function that returns a [`Component`]: its task,
//! how to tell it to stop, and the [`Phase`] at which shutdown does so and
//! at which it waits for it. [`Hub::shutdown`] walks the phases in order;
//! adding a background job is one more component in [`Hub::start`]'s list.
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
use telemetry_proto::io::BatchedWrites;
use telemetry_proto::v1::{
    device_gateway_server::DeviceGatewayServer, operator_server::OperatorServer,
};
use tokio::sync::broadcast;
use tokio::task::{AbortHandle, JoinHandle};
use tokio::time::{Instant, timeout_at};
use tokio_stream::StreamExt;
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
use crate::domain::CommittedBatch;
use crate::grpc::OperatorAuth;
use crate::grpc::session::SessionContext;
use crate::grpc::{DeviceGatewayService, OperatorService};
use crate::ingest::{self, IngestQueue, Writer, WriterSettings};
use crate::metrics::HubMetrics;
use crate::operator::{Backups, Operations, OperationsParts};
use crate::registry::SessionRegistry;
use crate::store::commands::CommandStore;
use crate::store::credentials::CredentialReads;
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

/// When shutdown tells a component to stop, and when it waits for it: the
/// phases run in this order, each stopping its components, then waiting
/// for those whose wait falls in it (bounded by `server.shutdown_timeout`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Phase {
    /// Stop taking work: the doors stop accepting, device streams flush
    /// their acks and end (the writer still runs), jobs stop.
    Intake,
    /// The jobs that ride on the writer or the database end.
    Background,
    /// The MQTT bridge tells the broker every device and the hub are
    /// offline, and disconnects.
    Bridges,
    /// The writer commits what is queued, the commands task its last batch.
    Storage,
    /// Whatever still holds a connection: servers, health.
    Last,
}

const PHASES: [Phase; 5] = [
    Phase::Intake,
    Phase::Background,
    Phase::Bridges,
    Phase::Storage,
    Phase::Last,
];

/// What shutdown does with a component still running at its deadline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Overdue {
    /// Abort it and go on, with a warning.
    Abort,
    /// Abort it and fail the shutdown (the writer: readings may be lost).
    Fail,
}

/// A started component, as shutdown sees it.
struct Component {
    name: &'static str,
    /// Tells it to stop (at `stop_at`).
    stop: Box<dyn FnOnce() + Send>,
    stop_at: Phase,
    task: JoinHandle<()>,
    /// The task `task` watches, when it is a wrapper (a supervisor): an
    /// abort must reach it too.
    inner: Option<AbortHandle>,
    wait_at: Phase,
    overdue: Overdue,
}

impl Component {
    fn new(name: &'static str, task: JoinHandle<()>) -> Self {
        Self {
            name,
            stop: Box::new(|| {}),
            stop_at: Phase::Intake,
            task,
            inner: None,
            wait_at: Phase::Intake,
            overdue: Overdue::Abort,
        }
    }

    /// `task` watches this one: aborting the component aborts it too.
    fn wrapping(mut self, inner: AbortHandle) -> Self {
        self.inner = Some(inner);
        self
    }

    /// Ends it now: told to stop, and aborted.
    fn abort(self) {
        (self.stop)();
        self.task.abort();
        if let Some(inner) = self.inner {
            inner.abort();
        }
    }

    /// Told to stop by cancelling `token` at `phase`.
    fn stopped_by(mut self, phase: Phase, token: CancellationToken) -> Self {
        self.stop = Box::new(move || token.cancel());
        self.stop_at = phase;
        self
    }

    fn awaited_at(mut self, phase: Phase) -> Self {
        self.wait_at = phase;
        self
    }

    fn critical(mut self) -> Self {
        self.overdue = Overdue::Fail;
        self
    }
}

/// What every component may need: built first, shared by the start
/// functions below.
struct Core {
    settings: Settings,
    metrics: Arc<HubMetrics>,
    registry: Arc<SessionRegistry>,
    hub_id: Arc<str>,
    auth: Arc<AuthPolicy>,
    /// Device streams, queries and event streams run here.
    tracker: TaskTracker,
    /// Cancelled when shutdown begins: jobs and listeners stop.
    stopping: CancellationToken,
    /// Cancelled when device streams and watches must end (Intake).
    sessions_stop: CancellationToken,
    failure: Arc<Failure>,
    fanout: broadcast::Sender<Arc<CommittedBatch>>,
    /// Committed twin changes: to device streams and watchers.
    twins: Arc<crate::twin::TwinHub>,
    /// Committed alarm events, and the writer's and leader's signals.
    alarms: Arc<crate::alarms::AlarmHub>,
}

/// A running hub. Dropping it without [`Hub::shutdown`] aborts nothing
/// cleanly; call `shutdown`.
pub struct Hub {
    addr: SocketAddr,
    settings: Settings,
    metrics: Arc<HubMetrics>,
    registry: Arc<SessionRegistry>,
    store: Store,
    commands: Commands,
    command_store: CommandStore,
    tracker: TaskTracker,
    stopping: CancellationToken,
    failure: Arc<Failure>,
    /// Every component, in the order they were started.
    components: Vec<Component>,
    writer_abort: AbortHandle,
    commands_abort: AbortHandle,
    metrics_addr: Option<SocketAddr>,
    http_addr: Option<SocketAddr>,
    hub_id: Arc<str>,
}

impl Hub {
    /// Opens the store, starts every component; returns once the gRPC
    /// server is listening.
    pub async fn start(settings: Settings) -> anyhow::Result<Hub> {
        settings.validate()?;
        let (fanout, _) = broadcast::channel(settings.ingest.fanout_capacity);
        let core = Core {
            metrics: HubMetrics::new(),
            registry: SessionRegistry::new(),
            hub_id: crate::cluster::new_hub_id(),
            auth: Arc::new(AuthPolicy::new(&settings.auth)),
            tracker: TaskTracker::new(),
            stopping: CancellationToken::new(),
            sessions_stop: CancellationToken::new(),
            failure: Arc::new(Failure::default()),
            fanout,
            twins: crate::twin::TwinHub::new(settings.twin.events_capacity),
            alarms: crate::alarms::AlarmHub::new(settings.alarms.events_capacity),
            settings,
        };
        let mut components = Vec::new();
        match start_all(&core, &mut components).await {
            Ok(started) => Ok(Hub::started(core, started, components)),
            Err(e) => {
                // Nothing started may outlive a failed start: the writer
                // would hold the database's lock, HTTP would serve on.
                core.stopping.cancel();
                core.sessions_stop.cancel();
                components.into_iter().for_each(Component::abort);
                Err(e)
            }
        }
    }

    fn started(core: Core, started: Started, components: Vec<Component>) -> Hub {
        let Started {
            addr,
            storage,
            commands,
            metrics_addr,
            http_addr,
        } = started;
        let settings = &core.settings;
        let scheme = if settings.server.tls.enabled() {
            "https"
        } else {
            "http"
        };
        tracing::info!(devices = ?settings.auth.devices, operators_open = core.auth.operators_open(),
            hub_id = %core.hub_id, backend = ?settings.storage.backend, "listening on {addr} ({scheme})");
        Hub {
            addr,
            metrics: core.metrics,
            registry: core.registry,
            store: storage.store,
            commands: commands.commands,
            command_store: commands.store,
            tracker: core.tracker,
            stopping: core.stopping,
            failure: core.failure,
            components,
            writer_abort: storage.writer_abort,
            commands_abort: commands.abort,
            metrics_addr,
            http_addr,
            hub_id: core.hub_id,
            settings: core.settings,
        }
    }

    /// This hub's id for the life of its process (written into the devices
    /// it claims).
    pub fn hub_id(&self) -> &str {
        &self.hub_id
    }

    /// Where `/metrics` is served (when `metrics.enabled`).
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    /// Where the web console and its API are served (when `http.enabled`).
    pub fn http_addr(&self) -> Option<SocketAddr> {
        self.http_addr
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

    /// Serves until SIGINT or SIGTERM (or until a critical task or the
    /// gRPC server fails), then shuts down gracefully. A failure is
    /// returned as an error after the shutdown, so the process exits
    /// non-zero.
    pub async fn run_until_signal(self) -> anyhow::Result<()> {
        let mut failure = None;
        tokio::select! {
            signal = shutdown_signal() => {
                signal?;
                tracing::info!("signal received");
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

    /// Graceful shutdown, bounded by `server.shutdown_timeout`: the phases
    /// in order (see [`Phase`]), then the databases are closed.
    pub async fn shutdown(self) -> anyhow::Result<()> {
        let deadline = Instant::now() + self.settings.server.shutdown_timeout;
        tracing::info!("shutting down");
        self.stopping.cancel();
        let mut left = self.components;
        let mut result = Ok(());
        for phase in PHASES {
            for component in left.iter_mut().filter(|c| c.stop_at == phase) {
                let stop = std::mem::replace(&mut component.stop, Box::new(|| {}));
                stop();
            }
            let (due, later): (Vec<_>, Vec<_>) = left.into_iter().partition(|c| c.wait_at == phase);
            left = later;
            for mut component in due {
                if timeout_at(deadline, &mut component.task).await.is_ok() {
                    continue;
                }
                component.task.abort();
                if let Some(inner) = &component.inner {
                    inner.abort();
                }
                match component.overdue {
                    Overdue::Abort => tracing::warn!(
                        component = component.name,
                        "did not stop within the shutdown timeout; aborted"
                    ),
                    Overdue::Fail => {
                        result = Err(anyhow::anyhow!(
                            "{} did not finish within the shutdown timeout",
                            component.name
                        ));
                    }
                }
            }
        }
        result?;
        self.store.close().await;
        self.command_store.close().await;
        tracing::info!("shutdown complete");
        Ok(())
    }
}

/// What [`start_all`] hands the hub besides its components.
struct Started {
    addr: SocketAddr,
    storage: Storage,
    commands: CommandsPart,
    metrics_addr: Option<SocketAddr>,
    http_addr: Option<SocketAddr>,
}

/// Every component, in start order, into `components` (which a failed
/// start then stops).
async fn start_all(core: &Core, components: &mut Vec<Component>) -> anyhow::Result<Started> {
    let storage = start_storage(core, components).await?;
    let commands = start_commands(core, &storage, components).await?;
    let ops = Arc::new(operations(core, &storage, &commands));
    components.extend(start_bridge(core, &ops, &commands));
    components.extend(start_cluster(core, &storage.store, &commands).await?);
    components.extend(start_jobs(core, &storage, &ops));
    let metrics_addr = match start_metrics(core, &storage).await? {
        Some((addr, component)) => {
            components.push(component);
            Some(addr)
        }
        None => None,
    };
    let http_addr = match start_http(core, &storage, &ops).await? {
        Some((addr, component)) => {
            components.push(component);
            Some(addr)
        }
        None => None,
    };
    let addr = start_grpc(core, &storage, &commands, ops, components).await?;
    Ok(Started {
        addr,
        storage,
        commands,
        metrics_addr,
        http_addr,
    })
}

/// The readings database and its one writer.
struct Storage {
    store: Store,
    /// Device credentials for admission, read many to a statement.
    credentials: CredentialReads,
    ingest: IngestQueue,
    writer_abort: AbortHandle,
}

/// Opens the readings database (migrations, the SQLite lock) and starts
/// the writer: critical, stopped and awaited at [`Phase::Storage`]; at
/// [`Phase::Intake`] it commits at once what it holds, so closing streams
/// get their last acks.
async fn start_storage(core: &Core, components: &mut Vec<Component>) -> anyhow::Result<Storage> {
    let settings = &core.settings;
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
    let sidecar = ingest::sidecar::Sidecar::open(&settings.storage)
        .await
        .context("cannot open the ingest writer's second PostgreSQL connection")?;
    let (ingest, queue_rx) = ingest::queue(settings.ingest.queue_capacity);
    let writer = Writer::new(
        store_writer,
        sidecar,
        queue_rx,
        WriterSettings {
            max_batch_rows: settings.ingest.max_batch_rows,
            max_batch_delay: settings.ingest.max_batch_delay,
            max_sensors: settings.ingest.max_sensors,
            max_sensors_per_device: settings.ingest.max_sensors_per_device,
            compact_rows: settings.storage.compact_rows,
            hub_id: Arc::clone(&core.hub_id),
            cached_devices: settings.ingest.cached_devices,
            twin_limits: settings.twin.limits(),
        },
        Arc::clone(&core.metrics),
        core.fanout.clone(),
        Arc::clone(&core.twins),
        crate::ingest::alarms::AlarmWork::new(
            Arc::clone(&core.alarms),
            settings
                .alarms
                .webhooks
                .iter()
                .map(|w| Arc::from(w.name.as_str()))
                .collect(),
            settings.ingest.cached_devices,
        ),
    );
    let writer_stop = CancellationToken::new();
    let lookups_stop = CancellationToken::new();
    let (credentials, lookups) = CredentialReads::new(store.clone(), lookups_stop.clone());
    components.push(
        Component::new("the credential reads", tokio::spawn(lookups))
            .stopped_by(Phase::Storage, lookups_stop)
            .awaited_at(Phase::Storage),
    );
    let writer = spawn_on_own_thread(
        "hub-writer",
        writer.run(writer_stop.clone(), core.sessions_stop.clone()),
    )
    .context("cannot start the ingest writer's thread")?;
    let writer_abort = writer.abort_handle();
    let supervisor = supervise(
        CriticalTask::Writer,
        writer,
        core.stopping.clone(),
        Arc::clone(&core.failure),
    );
    components.push(
        Component::new("the ingest writer", supervisor)
            .wrapping(writer_abort.clone())
            .stopped_by(Phase::Storage, writer_stop)
            .awaited_at(Phase::Storage)
            .critical(),
    );
    Ok(Storage {
        store,
        credentials,
        ingest,
        writer_abort,
    })
}

/// Runs `task` on a thread of its own, in a single-threaded runtime, and
/// hands back the same handle `tokio::spawn` would (join, abort); the
/// thread ends with the task. For the ingest writer: every device waits on
/// it, and on the hub's shared runtime each of its statements' wake-ups
/// queued behind the runnable session tasks (100,000 of them while a
/// fleet connects), so one commit took seconds with the database idle.
/// Also for the writer's PostgreSQL sidecar (`ingest::sidecar`).
pub(crate) fn spawn_on_own_thread<F>(name: &str, task: F) -> std::io::Result<JoinHandle<F::Output>>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    let (handed, handle) = std::sync::mpsc::sync_channel(1);
    std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(runtime) => runtime,
                Err(e) => {
                    let _ = handed.send(Err(e));
                    return;
                }
            };
            let ended = CancellationToken::new();
            let guard = ended.clone().drop_guard();
            let _ = handed.send(Ok(runtime.spawn(async move {
                // Dropped when the task ends, panics or is aborted.
                let _guard = guard;
                task.await
            })));
            runtime.block_on(ended.cancelled());
        })?;
    // The thread hands its handle over at once (or why it has none).
    handle
        .recv()
        .map_err(|_| std::io::Error::other("the thread ended before it started the task"))?
}

/// The command log and the task that owns open commands.
struct CommandsPart {
    commands: Commands,
    store: CommandStore,
    abort: AbortHandle,
}

/// Opens the command log and starts the commands task: critical, stopped
/// and awaited at [`Phase::Storage`], after the writer.
async fn start_commands(
    core: &Core,
    storage: &Storage,
    components: &mut Vec<Component>,
) -> anyhow::Result<CommandsPart> {
    let (command_store, command_writer) = store::commands::open(&core.settings.storage)
        .await
        .context("cannot open the command log")?;
    let c = &core.settings.commands;
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
        storage.store.clone(),
    );
    let stop = CancellationToken::new();
    let task = tokio::spawn(
        command_actor
            .with_metrics(Arc::clone(&core.metrics))
            .with_hub_id(Arc::clone(&core.hub_id))
            .run(stop.clone()),
    );
    let abort = task.abort_handle();
    let supervisor = supervise(
        CriticalTask::Commands,
        task,
        core.stopping.clone(),
        Arc::clone(&core.failure),
    );
    components.push(
        Component::new("the commands task", supervisor)
            .wrapping(abort.clone())
            .stopped_by(Phase::Storage, stop)
            .awaited_at(Phase::Storage),
    );
    Ok(CommandsPart {
        commands,
        store: command_store,
        abort,
    })
}

/// The operator core every door calls.
fn operations(core: &Core, storage: &Storage, commands: &CommandsPart) -> Operations {
    Operations::new(OperationsParts {
        store: storage.store.clone(),
        commands: commands.commands.clone(),
        registry: Arc::clone(&core.registry),
        metrics: Arc::clone(&core.metrics),
        ingest: storage.ingest.clone(),
        tracker: core.tracker.clone(),
        shutdown: core.sessions_stop.clone(),
        fanout: core.fanout.clone(),
        twins: Arc::clone(&core.twins),
        alarms: Arc::clone(&core.alarms),
        twin_limits: core.settings.twin.limits(),
        backups: Backups {
            command_store: commands.store.clone(),
            root: core.settings.storage.backup_root(),
            running: tokio::sync::Mutex::new(()),
        },
        max_watches: core.settings.server.max_watches,
        max_queries: core.settings.server.max_queries,
    })
}

/// The MQTT bridge (`mqtt.enabled`): stopped at [`Phase::Bridges`], when
/// every device stream has ended, so it can say they are offline.
fn start_bridge(core: &Core, ops: &Arc<Operations>, commands: &CommandsPart) -> Option<Component> {
    let settings = &core.settings;
    if !settings.mqtt.enabled {
        return None;
    }
    let cluster =
        (settings.storage.backend == crate::config::Backend::Postgres).then_some(&*core.hub_id);
    let bridge = crate::mqtt::Bridge::new(
        settings.mqtt.clone(),
        Arc::clone(ops),
        Arc::clone(&core.registry),
        Arc::clone(&core.metrics),
        cluster,
    );
    let stop = CancellationToken::new();
    // Each hub publishes the command changes it committed itself.
    let task = tokio::spawn(bridge.run(
        core.fanout.subscribe(),
        core.registry.subscribe(),
        commands.commands.subscribe_local(),
        core.twins.subscribe_local(),
        core.alarms.subscribe(),
        stop.clone(),
    ));
    Some(
        Component::new("the MQTT bridge", task)
            .stopped_by(Phase::Bridges, stop)
            .awaited_at(Phase::Bridges),
    )
}

/// PostgreSQL: the listener of other hubs' notices and this hub's
/// heartbeat and presence, started before the first stream; they stop when
/// shutdown begins.
async fn start_cluster(
    core: &Core,
    store: &Store,
    commands: &CommandsPart,
) -> anyhow::Result<Vec<Component>> {
    let mut started = Vec::new();
    let claims = crate::cluster::listen(
        store,
        Arc::clone(&core.hub_id),
        Arc::clone(&core.registry),
        commands.commands.clone(),
        Arc::clone(&core.twins),
        core.stopping.clone(),
    )
    .await
    .context("cannot listen for other hubs' notices")?;
    if let Some(claims) = claims {
        started.push(
            Component::new("the cluster listener", tokio::spawn(claims))
                .awaited_at(Phase::Background),
        );
    }
    let presence = crate::cluster::keep_presence(
        store.clone(),
        Arc::clone(&core.hub_id),
        Arc::clone(&core.registry),
        core.stopping.clone(),
    )
    .await
    .context("cannot record this hub's heartbeat")?;
    if let Some(presence) = presence {
        started.push(
            Component::new("the presence task", tokio::spawn(presence))
                .awaited_at(Phase::Background),
        );
    }
    Ok(started)
}

/// Jobs that run beside ingest: retention (its steps ride in the writer's
/// groups, so it ends before the writer) and the periodic summary line.
fn start_jobs(core: &Core, storage: &Storage, ops: &Arc<Operations>) -> Vec<Component> {
    let settings = &core.settings;
    let mut started = vec![
        Component::new(
            "the summary log",
            tokio::spawn(crate::metrics::log_summary(
                Arc::clone(&core.metrics),
                settings.log.summary_interval,
                core.stopping.clone(),
            )),
        )
        .awaited_at(Phase::Background),
    ];
    started.push(
        Component::new(
            "the alarm leader",
            tokio::spawn(
                crate::alarms::leader::Leader {
                    store: storage.store.clone(),
                    ingest: storage.ingest.clone(),
                    hub: Arc::clone(&core.alarms),
                    settings: settings.alarms.clone(),
                    hub_id: Arc::clone(&core.hub_id),
                    ttl_ms: std::sync::atomic::AtomicI64::new(0),
                }
                .run(core.stopping.clone()),
            ),
        )
        .awaited_at(Phase::Background),
    );
    started.push(
        Component::new(
            "the job runner",
            tokio::spawn(
                crate::jobs::runner::Runner {
                    ops: Arc::clone(ops),
                    store: storage.store.clone(),
                    hub_id: Arc::clone(&core.hub_id),
                }
                .run(core.stopping.clone()),
            ),
        )
        .awaited_at(Phase::Background),
    );
    let rollups_kept: Vec<(i64, i64)> = settings
        .storage
        .rollups
        .iter()
        .filter(|r| !r.keep.is_zero())
        .map(|r| (r.every_ms(), r.keep_ms()))
        .collect();
    if !settings.storage.retention.is_zero() || !rollups_kept.is_empty() {
        started.push(
            Component::new(
                "retention",
                tokio::spawn(crate::retention::run(
                    storage.ingest.clone(),
                    storage.store.clone(),
                    settings.storage.retention,
                    rollups_kept,
                    core.stopping.clone(),
                )),
            )
            .awaited_at(Phase::Background),
        );
    }
    started
}

/// gRPC health's reporter: NOT_SERVING from the start of shutdown.
fn start_health(core: &Core, reporter: HealthReporter) -> Component {
    let task = tokio::spawn(report_health(
        reporter,
        Arc::clone(&core.metrics),
        Arc::clone(&core.failure),
        core.stopping.clone(),
    ));
    Component::new("health", task).awaited_at(Phase::Last)
}

/// Prometheus `/metrics` (`metrics.enabled`); its address.
async fn start_metrics(
    core: &Core,
    storage: &Storage,
) -> anyhow::Result<Option<(SocketAddr, Component)>> {
    let settings = &core.settings;
    if !settings.metrics.enabled {
        return Ok(None);
    }
    let listener = tokio::net::TcpListener::bind(settings.metrics.listen)
        .await
        .with_context(|| {
            format!(
                "cannot listen on {} (metrics.listen)",
                settings.metrics.listen
            )
        })?;
    let addr = listener.local_addr()?;
    if !addr.ip().is_loopback() {
        tracing::warn!(metrics_addr = %addr,
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
                Some((storage.store.clone(), bytes)),
            )
        }
    };
    let registry = crate::prometheus::registry(
        Arc::clone(&core.metrics),
        core.tracker.clone(),
        storage.ingest.clone(),
        db_size,
    );
    tracing::info!("metrics on http://{addr}/metrics");
    let serve = crate::prometheus::serve(listener, registry, sized, core.stopping.clone());
    let task = tokio::spawn(async move {
        if let Err(e) = serve.await {
            tracing::warn!(error = %e, "the metrics endpoint failed");
        }
    });
    Ok(Some((
        addr,
        Component::new("the metrics endpoint", task).awaited_at(Phase::Last),
    )))
}

/// The web console and its API (`http.enabled`): it stops accepting when
/// shutdown begins, its event streams end with the device streams.
async fn start_http(
    core: &Core,
    storage: &Storage,
    ops: &Arc<Operations>,
) -> anyhow::Result<Option<(SocketAddr, Component)>> {
    let settings = &core.settings;
    if !settings.http.enabled {
        return Ok(None);
    }
    let writes = crate::lines::LineWrites::new(
        storage.ingest.clone(),
        storage.credentials.clone(),
        Arc::clone(&core.auth),
        Arc::clone(&core.registry),
        Arc::clone(&core.metrics),
        FailureLimiter::new(settings.auth.max_failures_per_minute),
        crate::lines::WriteSettings {
            max_clock_skew: settings.ingest.max_clock_skew,
            retention: (!settings.storage.retention.is_zero())
                .then_some(settings.storage.retention),
            max_readings_per_sec: settings.server.max_readings_per_sec,
            commit_timeout: Duration::from_secs(30),
            cached_devices: settings.ingest.cached_devices,
        },
    );
    let server = crate::http::start(
        &settings.http,
        Arc::clone(ops),
        Arc::new(writes),
        Arc::clone(&core.auth),
        core.tracker.clone(),
        core.sessions_stop.clone(),
        core.stopping.clone(),
    )
    .await
    .with_context(|| format!("cannot listen on {} (http.listen)", settings.http.listen))?;
    tracing::info!("web console on http://{}/", server.addr);
    let served = server.task;
    let inner = served.abort_handle();
    let task = tokio::spawn(async move {
        if let Ok(Err(e)) = served.await {
            tracing::warn!(error = %e, "the HTTP server failed");
        }
    });
    Ok(Some((
        server.addr,
        Component::new("the HTTP server", task)
            .wrapping(inner)
            .awaited_at(Phase::Last),
    )))
}

/// The gRPC server (device gateway, Operator API, health, reflection) and
/// its device streams. Intake: it stops accepting, the streams flush their
/// acks and end (they are waited for there); its connections are waited
/// for with the writer's phase. A server that stops by itself is a failure.
async fn start_grpc(
    core: &Core,
    storage: &Storage,
    commands: &CommandsPart,
    ops: Arc<Operations>,
    components: &mut Vec<Component>,
) -> anyhow::Result<SocketAddr> {
    let settings = &core.settings;
    let (reporter, health) = tonic_health::server::health_reporter();
    components.push(start_health(core, reporter));
    let server_settings = &settings.server;
    let ctx = Arc::new(SessionContext {
        ingest: storage.ingest.clone(),
        registry: Arc::clone(&core.registry),
        metrics: Arc::clone(&core.metrics),
        commands: commands.commands.clone(),
        tracker: core.tracker.clone(),
        shutdown: core.sessions_stop.clone(),
        max_batch: server_settings.max_batch,
        max_message_bytes: server_settings.max_message_bytes,
        hello_timeout: server_settings.hello_timeout,
        drain_timeout: server_settings.drain_timeout,
        send_timeout: server_settings.send_timeout,
        max_replies_per_sec: server_settings.max_replies_per_sec,
        max_readings_per_sec: server_settings.max_readings_per_sec,
        max_devices: server_settings.max_devices,
        max_clock_skew: settings.ingest.max_clock_skew,
        retention: (!settings.storage.retention.is_zero()).then_some(settings.storage.retention),
        auth: Arc::clone(&core.auth),
        store: storage.store.clone(),
        credentials: storage.credentials.clone(),
        twins: Arc::clone(&core.twins),
        twin_limits: settings.twin.limits(),
        failures: FailureLimiter::new(settings.auth.max_failures_per_minute),
        refusals: std::sync::Mutex::new(crate::throttle::LogThrottle::new(Duration::from_secs(10))),
    });
    let gateway = DeviceGatewayServer::new(DeviceGatewayService::new(
        Arc::clone(&ctx),
        server_settings.outbound_buffer,
    ))
    .max_decoding_message_size(server_settings.max_message_bytes);
    let operator = OperatorAuth::new(
        OperatorServer::new(OperatorService {
            ops,
            tracker: core.tracker.clone(),
        }),
        Arc::clone(&core.auth),
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

    let listener = tokio::net::TcpListener::bind(server_settings.listen)
        .await
        .with_context(|| format!("cannot listen on {}", server_settings.listen))?;
    let addr = listener.local_addr()?;
    // (TCP keepalive is the incoming's: the builder's applies only when
    // tonic binds the listener itself.) Each connection's flushes wait one
    // scheduler round, so a commit's Acks to the devices on one connection
    // leave in one write (`BatchedWrites`).
    let incoming = TcpIncoming::from(listener)
        .with_nodelay(Some(true))
        .with_keepalive(Some(server_settings.keepalive))
        .map(|accepted| accepted.map(BatchedWrites::new));
    let mut builder = Server::builder();
    if let Some(tls) = server_tls(&server_settings.tls)? {
        builder = builder.tls_config(tls).context("server.tls")?;
    }
    let server_stop = CancellationToken::new();
    let serve = builder
        .http2_keepalive_interval(Some(server_settings.keepalive))
        .http2_keepalive_timeout(Some(server_settings.keepalive))
        .max_concurrent_streams(server_settings.max_concurrent_streams)
        .initial_stream_window_size(server_settings.stream_window)
        .initial_connection_window_size(server_settings.connection_window())
        .add_service(health)
        .add_service(reflection)
        .add_service(reflection_v1alpha)
        .add_service(gateway)
        .add_service(operator)
        .serve_with_incoming_shutdown(incoming, server_stop.clone().cancelled_owned());
    let (stopping, failure) = (core.stopping.clone(), Arc::clone(&core.failure));
    let server = tokio::spawn(async move {
        let ended = serve.await;
        if stopping.is_cancelled() {
            if let Err(e) = ended {
                tracing::warn!(error = %e, "gRPC server ended with an error");
            }
            return;
        }
        let how = match ended {
            Ok(()) => "stopped by itself".to_owned(),
            Err(e) => format!("failed: {e}"),
        };
        let reason = format!("the gRPC server {how}");
        tracing::error!("{reason}");
        failure.record(reason);
    });
    // Device streams (and queries, watches) end at Intake, and are waited
    // for there: the writer still runs, so their last acks go out.
    let (sessions_stop, tracker) = (core.sessions_stop.clone(), core.tracker.clone());
    let streams = core.tracker.clone();
    let waiting = tokio::spawn(async move { streams.wait().await });
    components.push(Component {
        name: "device streams and queries",
        stop: Box::new(move || {
            sessions_stop.cancel();
            tracker.close();
        }),
        stop_at: Phase::Intake,
        task: waiting,
        inner: None,
        wait_at: Phase::Intake,
        overdue: Overdue::Abort,
    });
    components.push(
        Component::new("the gRPC server", server)
            .stopped_by(Phase::Intake, server_stop)
            .awaited_at(Phase::Storage),
    );
    Ok(addr)
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
