//! Command lifecycle: persisted states, per-device ordered queues, offline
//! delivery, TTL, ack timeouts and redelivery.
//!
//! One task ([`CommandActor`]) owns every command that is not final and is
//! the command log's only writer. Operators, sessions and timers talk to it
//! through one bounded mailbox ([`Commands`] is the handle). For each batch
//! of requests it changes its in-memory state, writes the changes in one
//! transaction, commits, and only then answers operators, publishes events
//! and pushes commands to devices: every transition is persisted before
//! anyone hears of it.
//!
//! A device with a live stream is *attached*: the actor holds a small
//! bounded outbox to that stream. Commands go out in the order they were
//! created; a full outbox delays only that device. SENT is recorded when the
//! session has written the command to its stream, RECEIVED only when the
//! device says so.
//!
//! Several hubs on one PostgreSQL database each run an actor over the same
//! log. Every update is conditional on the command being as this hub last
//! knew it ([`Expected`]): of two hubs deciding at once (both expiring it,
//! one expiring while the holder records the device's reply) one wins and
//! the other reloads the command and says nothing. Every committed change
//! is announced (NOTIFY); the other hubs reload the command, tell their
//! watchers, and the hub holding the device's stream delivers it.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::sync::{broadcast, mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::domain::{
    CommandRecord, CommandReply, CommandState, CommandTransition, DeviceId, ReplyStatus, now_ms,
};
use crate::metrics::{HubMetrics, StateLabel};
use crate::store::commands::{CommandFilter, CommandStore, CommandWriter, Expected};
use crate::store::{Store, StoreError};
use crate::throttle::LogThrottle;

pub const MIN_TTL: Duration = Duration::from_secs(1);
pub const MAX_TTL: Duration = Duration::from_secs(7 * 24 * 3600);
/// Longest detail of a device's reply kept, in bytes (longer is cut).
pub const MAX_REPLY_DETAIL: usize = 1024;

#[derive(Debug, Clone)]
pub struct CommandSettings {
    pub default_ttl: Duration,
    pub max_pending_per_device: usize,
    pub ack_timeout: Duration,
    /// Writes to a device stream (across reconnects) without the device
    /// saying RECEIVED before the command is FAILED.
    pub max_attempts: u32,
    /// Commands queued to one device stream before the actor waits.
    pub outbox: usize,
    /// Largest params JSON (and largest result JSON kept), in bytes.
    pub max_params_bytes: usize,
    /// Final commands older than this are deleted (zero: kept for ever).
    pub retention: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    #[error("unknown device {0:?}")]
    UnknownDevice(String),
    #[error("unknown command {0:?}")]
    UnknownCommand(String),
    #[error(
        "device {device} already has {limit} commands that are not final (commands.max_pending_per_device = {limit})"
    )]
    TooManyPending { device: String, limit: usize },
    #[error("{0}")]
    Invalid(String),
    #[error("command {id} is already {state}")]
    AlreadyFinal { id: String, state: CommandState },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("the hub is shutting down")]
    Closed,
    #[error("the command log is unavailable; try again")]
    LogUnavailable,
}

/// What an operator asks for.
#[derive(Debug, Clone)]
pub struct NewCommand {
    pub device_id: String,
    pub name: String,
    /// A JSON object; empty means `{}`.
    pub params: String,
    /// None = the default TTL.
    pub ttl: Option<Duration>,
}

/// What goes down a device's stream.
#[derive(Debug, Clone)]
pub struct DeviceCommand {
    pub command_id: String,
    pub name: String,
    pub params: String,
    pub expires_at_ms: i64,
    /// Set when the command became final (cancelled, expired, ...) while
    /// it waited in the stream's outbox: the session drops it unsent.
    withdrawn: Arc<AtomicBool>,
}

impl DeviceCommand {
    /// Still to be written to the stream: not withdrawn, not expired.
    pub fn still_wanted(&self, now_ms: i64) -> bool {
        !self.withdrawn.load(Ordering::Relaxed) && self.expires_at_ms > now_ms
    }
}

enum Request {
    Send {
        cmd: NewCommand,
        reply: oneshot::Sender<Result<CommandRecord, CommandError>>,
    },
    Cancel {
        command_id: String,
        reply: oneshot::Sender<Result<CommandRecord, CommandError>>,
    },
    Attach {
        device: String,
        session: u64,
        outbox: mpsc::Sender<Box<DeviceCommand>>,
    },
    Detach {
        device: String,
        session: u64,
    },
    Written {
        device: String,
        session: u64,
        command_id: String,
    },
    Reply {
        device: String,
        reply: CommandReply,
    },
    /// Another hub changed the command (PostgreSQL): reload it.
    Refresh {
        command_id: String,
    },
}

/// Handle to the commands task; cheap to clone.
#[derive(Clone)]
pub struct Commands {
    tx: mpsc::Sender<Request>,
    events: broadcast::Sender<CommandRecord>,
    /// Only the changes this hub committed (not other hubs' it heard of).
    local_events: broadcast::Sender<CommandRecord>,
    store: CommandStore,
    outbox: usize,
}

impl Commands {
    async fn ask(
        &self,
        make: impl FnOnce(oneshot::Sender<Result<CommandRecord, CommandError>>) -> Request,
    ) -> Result<CommandRecord, CommandError> {
        let (reply, answer) = oneshot::channel();
        self.tx
            .send(make(reply))
            .await
            .map_err(|_| CommandError::Closed)?;
        answer.await.map_err(|_| CommandError::Closed)?
    }

    pub async fn send(&self, cmd: NewCommand) -> Result<CommandRecord, CommandError> {
        self.ask(|reply| Request::Send { cmd, reply }).await
    }

    pub async fn cancel(&self, command_id: &str) -> Result<CommandRecord, CommandError> {
        let command_id = command_id.to_owned();
        self.ask(|reply| Request::Cancel { command_id, reply })
            .await
    }

    pub async fn get(
        &self,
        command_id: &str,
    ) -> Result<(CommandRecord, Vec<CommandTransition>), CommandError> {
        self.store
            .get(command_id)
            .await?
            .ok_or_else(|| CommandError::UnknownCommand(command_id.to_owned()))
    }

    pub async fn list(&self, filter: &CommandFilter) -> Result<Vec<CommandRecord>, CommandError> {
        Ok(self.store.list(filter).await?)
    }

    /// Every committed state change, as it happens (on PostgreSQL, also
    /// those other hubs committed).
    pub fn subscribe(&self) -> broadcast::Receiver<CommandRecord> {
        self.events.subscribe()
    }

    /// The state changes this hub committed: what it publishes on MQTT
    /// (every hub publishes its own).
    pub fn subscribe_local(&self) -> broadcast::Receiver<CommandRecord> {
        self.local_events.subscribe()
    }

    /// A device stream is live: its pending commands start flowing into the
    /// returned receiver, in order. Boxed: a channel allocates 32 slots
    /// up front, and every live session holds one.
    pub async fn attach(
        &self,
        device: &DeviceId,
        session: u64,
    ) -> mpsc::Receiver<Box<DeviceCommand>> {
        let (outbox, commands) = mpsc::channel(self.outbox);
        let _ = self
            .tx
            .send(Request::Attach {
                device: device.as_str().to_owned(),
                session,
                outbox,
            })
            .await;
        commands
    }

    pub async fn detach(&self, device: &DeviceId, session: u64) {
        let _ = self
            .tx
            .send(Request::Detach {
                device: device.as_str().to_owned(),
                session,
            })
            .await;
    }

    /// The session wrote the command to its stream.
    pub async fn written(&self, device: &DeviceId, session: u64, command_id: String) {
        let _ = self
            .tx
            .send(Request::Written {
                device: device.as_str().to_owned(),
                session,
                command_id,
            })
            .await;
    }

    /// Another hub on the same database changed (or created) the command.
    pub async fn refresh(&self, command_id: String) {
        let _ = self.tx.send(Request::Refresh { command_id }).await;
    }

    pub async fn reply(&self, device: &DeviceId, reply: CommandReply) {
        let _ = self
            .tx
            .send(Request::Reply {
                device: device.as_str().to_owned(),
                reply,
            })
            .await;
    }
}

/// A command that is not final yet.
struct Open {
    rec: CommandRecord,
    /// The session it was last pushed to; None = push it (again).
    pushed_to: Option<u64>,
    pushed_at: Option<Instant>,
    /// Shared with the copies waiting in device outboxes.
    withdrawn: Arc<AtomicBool>,
}

impl Open {
    fn new(rec: CommandRecord) -> Self {
        Self {
            rec,
            pushed_to: None,
            pushed_at: None,
            withdrawn: Arc::default(),
        }
    }

    /// Not on any stream now: it is pushed again at the next chance.
    fn unpush(&mut self) {
        self.pushed_to = None;
        self.pushed_at = None;
    }
}

/// Every open command of a device queue goes out again (in order) on the
/// next stream it has.
fn unpush_all(open: &mut HashMap<String, Open>, order: &VecDeque<String>) {
    for id in order {
        if let Some(open) = open.get_mut(id) {
            open.unpush();
        }
    }
}

#[derive(Default)]
struct DeviceQueue {
    /// Open command ids, oldest first.
    order: VecDeque<String>,
    link: Option<(u64, mpsc::Sender<Box<DeviceCommand>>)>,
    /// The newest stream seen (stream ids only grow): an Attach from an
    /// older one that arrives late is refused.
    newest: u64,
}

/// What a batch of requests changed, to write in one transaction.
#[derive(Default)]
struct Batch {
    inserts: Vec<CommandRecord>,
    /// The command as it is to be stored, its new transitions, and what
    /// the log must still hold for the update to apply.
    updates: Vec<(CommandRecord, Vec<CommandTransition>, Expected)>,
    answers: Vec<(
        oneshot::Sender<Result<CommandRecord, CommandError>>,
        CommandRecord,
    )>,
    events: Vec<CommandRecord>,
}

impl Batch {
    /// Nothing to write (answers and events only come with writes).
    fn is_empty(&self) -> bool {
        self.inserts.is_empty() && self.updates.is_empty()
    }
}

pub struct CommandActor {
    rx: mpsc::Receiver<Request>,
    writer: CommandWriter,
    log: CommandStore,
    devices: Store,
    settings: CommandSettings,
    events: broadcast::Sender<CommandRecord>,
    local_events: broadcast::Sender<CommandRecord>,
    open: HashMap<String, Open>,
    queues: HashMap<String, DeviceQueue>,
    /// The in-memory state could not be rebuilt from the log after a failed
    /// commit: nothing is pushed or decided until it is.
    stale: bool,
    reload_retry_at: Instant,
    noise: LogThrottle,
    metrics: Option<Arc<HubMetrics>>,
    /// When retention next deletes old final commands.
    next_retention: Instant,
    /// This hub's id, in the change notices it sends (PostgreSQL).
    hub_id: Arc<str>,
    /// When the open commands are next compared with the log (PostgreSQL).
    next_resync: Instant,
}

/// How often a hub on PostgreSQL compares its open commands with the log.
const RESYNC_EVERY: Duration = Duration::from_secs(10);

/// Creates the handle and the task that serves it.
pub fn channel(
    settings: CommandSettings,
    store: CommandStore,
    writer: CommandWriter,
    devices: Store,
) -> (Commands, CommandActor) {
    let (tx, rx) = mpsc::channel(1024);
    let (events, _) = broadcast::channel(1024);
    let (local_events, _) = broadcast::channel(1024);
    let handle = Commands {
        tx,
        events: events.clone(),
        local_events: local_events.clone(),
        store: store.clone(),
        outbox: settings.outbox,
    };
    let actor = CommandActor {
        rx,
        writer,
        log: store,
        devices,
        settings,
        events,
        local_events,
        open: HashMap::new(),
        queues: HashMap::new(),
        stale: false,
        reload_retry_at: Instant::now(),
        noise: LogThrottle::new(Duration::from_secs(10)),
        metrics: None,
        next_retention: Instant::now(),
        hub_id: Arc::from("local"),
        next_resync: Instant::now() + RESYNC_EVERY,
    };
    (handle, actor)
}

fn transition(state: CommandState, at_ms: i64, detail: &str) -> CommandTransition {
    CommandTransition {
        state,
        at_ms,
        detail: detail.to_owned(),
    }
}

impl CommandActor {
    /// Counts committed transitions by state (Prometheus).
    pub fn with_metrics(mut self, metrics: Arc<HubMetrics>) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// The hub's id, for the change notices other hubs receive.
    pub fn with_hub_id(mut self, hub_id: Arc<str>) -> Self {
        self.hub_id = hub_id;
        self
    }

    /// Serves requests until every handle is gone or `stop` is cancelled;
    /// what is already in the mailbox then is still handled and committed.
    pub async fn run(mut self, stop: CancellationToken) {
        self.reload_or_go_stale().await;
        let mut stopping = false;
        loop {
            if self.stale && Instant::now() >= self.reload_retry_at {
                self.reload_or_go_stale().await;
            }
            let wake = self.next_deadline();
            let first = tokio::select! {
                r = self.rx.recv() => match r {
                    Some(r) => Some(r),
                    None => break,
                },
                _ = tokio::time::sleep_until(wake), if !stopping => None,
                _ = stop.cancelled(), if !stopping => {
                    stopping = true;
                    self.rx.close();
                    None
                }
            };
            let mut batch = Batch::default();
            if let Some(first) = first {
                self.handle(first, &mut batch).await;
                while batch.inserts.len() + batch.updates.len() < 256 {
                    let Ok(next) = self.rx.try_recv() else { break };
                    self.handle(next, &mut batch).await;
                }
            }
            self.check_timers(&mut batch);
            self.commit(batch).await;
            self.resync_if_due().await;
            self.dispatch();
            self.retain().await;
        }
        if let Err(e) = self.writer.close().await {
            tracing::warn!(error = %e, "closing the command log failed");
        }
    }

    /// Rebuilds the in-memory state from the log. If the log cannot be
    /// read, forgets every open command (so none is pushed or timed out on
    /// the strength of a change that was never committed) and tries again a
    /// second later; meanwhile operators get LogUnavailable.
    async fn reload_or_go_stale(&mut self) {
        match self.reload().await {
            Ok(()) => {
                if self.stale {
                    tracing::info!("command log readable again; open commands reloaded");
                }
                self.stale = false;
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot load open commands from the command log");
                self.open.clear();
                for q in self.queues.values_mut() {
                    q.order.clear();
                }
                self.stale = true;
                self.reload_retry_at = Instant::now() + Duration::from_secs(1);
            }
        }
    }

    /// Rebuilds the in-memory state from the log (at start, and after a
    /// failed commit). Links to live streams are kept.
    async fn reload(&mut self) -> Result<(), StoreError> {
        let open = self.writer.load_open().await?;
        self.open.clear();
        for q in self.queues.values_mut() {
            q.order.clear();
        }
        for rec in open {
            self.queues
                .entry(rec.device_id.clone())
                .or_default()
                .order
                .push_back(rec.command_id.clone());
            self.open.insert(rec.command_id.clone(), Open::new(rec));
        }
        Ok(())
    }

    async fn handle(&mut self, request: Request, batch: &mut Batch) {
        match request {
            // Nothing can be decided without the log: operators are told,
            // device news waits (a final reply is repeated on redelivery).
            Request::Send { reply, .. } | Request::Cancel { reply, .. } if self.stale => {
                let _ = reply.send(Err(CommandError::LogUnavailable));
            }
            Request::Written { .. } | Request::Reply { .. } | Request::Refresh { .. }
                if self.stale => {}
            Request::Send { cmd, reply } => match self.create(cmd).await {
                Ok(rec) => {
                    batch.inserts.push(rec.clone());
                    batch.events.push(rec.clone());
                    batch.answers.push((reply, rec));
                }
                Err(e) => {
                    let _ = reply.send(Err(e));
                }
            },
            Request::Cancel { command_id, reply } => {
                if !self.open.contains_key(&command_id) {
                    let refusal = match self.final_record(&command_id).await {
                        // Open, but this hub had not heard of it (another
                        // hub's notice was lost): it is now.
                        Ok(Some(rec)) if !rec.state.is_final() => {
                            self.reconcile(rec);
                            None
                        }
                        Ok(Some(rec)) => Some(CommandError::AlreadyFinal {
                            id: command_id.clone(),
                            state: rec.state,
                        }),
                        Ok(None) => Some(CommandError::UnknownCommand(command_id.clone())),
                        Err(e) => Some(e.into()),
                    };
                    if let Some(refusal) = refusal {
                        let _ = reply.send(Err(refusal));
                        return;
                    }
                }
                let cancelled = self.finish(
                    &command_id,
                    CommandState::Cancelled,
                    "cancelled by an operator",
                    None,
                    Vec::new(),
                    now_ms(),
                    batch,
                );
                match cancelled {
                    Some(rec) => batch.answers.push((reply, rec)),
                    // Open was checked (or reconciled) just above.
                    None => {
                        let _ = reply.send(Err(CommandError::UnknownCommand(command_id)));
                    }
                }
            }
            Request::Attach {
                device,
                session,
                outbox,
            } => {
                // The device's open commands as the log holds them: other
                // hubs may have created, changed or finished some while it
                // was theirs, and a notice may have been lost.
                if self.writer.backend() == crate::config::Backend::Postgres {
                    match self.writer.load_open_for(&device).await {
                        Ok(open) => self.resync(Some(&device), open),
                        Err(e) => {
                            tracing::warn!(device_id = device, error = %e,
                                "cannot load the device's open commands; the next change brings them")
                        }
                    }
                }
                self.attach(device, session, outbox)
            }
            Request::Refresh { command_id } => match self.log.get(&command_id).await {
                Ok(Some((rec, _))) => {
                    // Watchers on this hub hear of it too.
                    let _ = self.events.send(rec.clone());
                    self.reconcile(rec);
                }
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(command_id, error = %e, "cannot reload a command another hub changed")
                }
            },
            Request::Detach { device, session } => self.detach(&device, session),
            Request::Written {
                device,
                session,
                command_id,
            } => {
                let linked = self
                    .queues
                    .get(&device)
                    .and_then(|q| q.link.as_ref())
                    .is_some_and(|(s, _)| *s == session);
                if let Some(open) = self.open.get_mut(&command_id)
                    && linked
                {
                    let now = now_ms();
                    let expected = Expected::of(&open.rec);
                    open.rec.attempts += 1;
                    open.rec.updated_at_ms = now;
                    let mut transitions = Vec::new();
                    if open.rec.state == CommandState::Queued {
                        open.rec.state = CommandState::Sent;
                        transitions.push(transition(CommandState::Sent, now, ""));
                        batch.events.push(open.rec.clone());
                    }
                    batch
                        .updates
                        .push((open.rec.clone(), transitions, expected));
                }
            }
            Request::Reply { device, reply } => self.on_reply(&device, reply, batch),
        }
    }

    /// A device stream is live. An Attach of a stream older than one already
    /// seen arrived late (its takeover happened meanwhile): refused, so it
    /// cannot take the live stream's commands; its outbox just closes.
    fn attach(&mut self, device: String, session: u64, outbox: mpsc::Sender<Box<DeviceCommand>>) {
        let queue = self.queues.entry(device).or_default();
        if session < queue.newest {
            return;
        }
        queue.newest = session;
        queue.link = Some((session, outbox));
        // Everything not final goes out again on the new stream, in order:
        // the device deduplicates by command_id.
        unpush_all(&mut self.open, &queue.order);
    }

    fn detach(&mut self, device: &str, session: u64) {
        if let Some(queue) = self.queues.get_mut(device)
            && queue.link.as_ref().is_some_and(|(s, _)| *s == session)
        {
            queue.link = None;
            // The ack timeout only runs while the device stays connected;
            // the next stream gets everything again.
            unpush_all(&mut self.open, &queue.order);
        }
    }

    /// A command that is not open: final, or unknown.
    async fn final_record(&self, command_id: &str) -> Result<Option<CommandRecord>, StoreError> {
        Ok(self.log.get(command_id).await?.map(|(rec, _)| rec))
    }

    async fn create(&mut self, cmd: NewCommand) -> Result<CommandRecord, CommandError> {
        if cmd.name.is_empty() || cmd.name.len() > 64 {
            return Err(CommandError::Invalid(
                "command name must be 1 to 64 bytes".into(),
            ));
        }
        if cmd.name.chars().any(char::is_control) {
            // It reaches operators' terminals and devices' logs.
            return Err(CommandError::Invalid(
                "command name must not contain control characters".into(),
            ));
        }
        if cmd.params.len() > self.settings.max_params_bytes {
            return Err(CommandError::Invalid(format!(
                "params of {} bytes are over the limit of {} bytes (commands.max_params_bytes)",
                cmd.params.len(),
                self.settings.max_params_bytes
            )));
        }
        let params = if cmd.params.trim().is_empty() {
            "{}".to_owned()
        } else {
            match serde_json::from_str::<serde_json::Value>(&cmd.params) {
                Ok(v) if v.is_object() => v.to_string(),
                _ => {
                    return Err(CommandError::Invalid("params must be a JSON object".into()));
                }
            }
        };
        let ttl = cmd.ttl.unwrap_or(self.settings.default_ttl);
        if !(MIN_TTL..=MAX_TTL).contains(&ttl) {
            return Err(CommandError::Invalid(format!(
                "ttl must be between 1s and 7days, not {}",
                humantime::format_duration(ttl)
            )));
        }
        if self.devices.find_device(&cmd.device_id).await?.is_none() {
            return Err(CommandError::UnknownDevice(cmd.device_id));
        }
        let queue = self.queues.entry(cmd.device_id.clone()).or_default();
        if queue.order.len() >= self.settings.max_pending_per_device {
            return Err(CommandError::TooManyPending {
                device: cmd.device_id,
                limit: self.settings.max_pending_per_device,
            });
        }
        let now = now_ms();
        let rec = CommandRecord {
            command_id: new_command_id(),
            device_id: cmd.device_id,
            name: cmd.name,
            params,
            state: CommandState::Queued,
            detail: String::new(),
            result: String::new(),
            attempts: 0,
            created_at_ms: now,
            updated_at_ms: now,
            expires_at_ms: now.saturating_add(ttl.as_millis() as i64),
        };
        queue.order.push_back(rec.command_id.clone());
        self.open
            .insert(rec.command_id.clone(), Open::new(rec.clone()));
        Ok(rec)
    }

    /// Moves an open command to a final state and forgets it; `implied` are
    /// the transitions the final one implies (a final reply implies
    /// RECEIVED).
    #[allow(clippy::too_many_arguments)]
    fn finish(
        &mut self,
        command_id: &str,
        state: CommandState,
        detail: &str,
        result: Option<String>,
        implied: Vec<CommandTransition>,
        now: i64,
        batch: &mut Batch,
    ) -> Option<CommandRecord> {
        let mut open = self.open.remove(command_id)?;
        let expected = Expected::of(&open.rec);
        open.withdrawn.store(true, Ordering::Relaxed);
        if let Some(queue) = self.queues.get_mut(&open.rec.device_id) {
            queue.order.retain(|id| id != command_id);
        }
        let mut transitions = implied;
        transitions.push(transition(state, now, detail));
        let rec = &mut open.rec;
        rec.state = state;
        rec.detail = detail.to_owned();
        if let Some(result) = result {
            rec.result = result;
        }
        rec.updated_at_ms = now;
        batch.updates.push((rec.clone(), transitions, expected));
        batch.events.push(rec.clone());
        Some(open.rec)
    }

    fn on_reply(&mut self, device: &str, reply: CommandReply, batch: &mut Batch) {
        let Some(open) = self.open.get_mut(&reply.command_id) else {
            if let Some(suppressed) = self.noise.allow() {
                tracing::warn!(device_id = device, command_id = ?reply.command_id, suppressed,
                    "reply for an unknown or already final command ignored");
            }
            return;
        };
        if open.rec.device_id != device {
            if let Some(suppressed) = self.noise.allow() {
                tracing::warn!(device_id = device, command_id = ?reply.command_id,
                    owner = %open.rec.device_id, suppressed, "reply for another device's command ignored");
            }
            return;
        }
        let reply = bounded_reply(reply, self.settings.max_params_bytes);
        let now = now_ms();
        // The device has it, so it was sent even if the session's note that
        // it wrote the command has not arrived yet.
        let mut implied = Vec::new();
        if open.rec.state == CommandState::Queued {
            implied.push(transition(CommandState::Sent, now, ""));
        }
        if open.rec.state != CommandState::Received {
            implied.push(transition(CommandState::Received, now, ""));
        }
        let final_state = match reply.status {
            ReplyStatus::Received => None,
            ReplyStatus::Succeeded => Some(CommandState::Succeeded),
            ReplyStatus::Failed => Some(CommandState::Failed),
            ReplyStatus::Rejected => Some(CommandState::Rejected),
        };
        match final_state {
            None => {
                if implied.is_empty() {
                    return;
                }
                let expected = Expected::of(&open.rec);
                open.rec.state = CommandState::Received;
                open.rec.updated_at_ms = now;
                batch.updates.push((open.rec.clone(), implied, expected));
                batch.events.push(open.rec.clone());
            }
            Some(state) => {
                let result = Some(reply.result);
                self.finish(
                    &reply.command_id,
                    state,
                    &reply.detail,
                    result,
                    implied,
                    now,
                    batch,
                );
            }
        }
    }

    /// Expiry and the ack timeout. Attempts count every write to a device
    /// stream, across reconnects and restarts: a command whose delivery
    /// kills the stream is not pushed for ever.
    fn check_timers(&mut self, batch: &mut Batch) {
        let now = now_ms();
        let instant = Instant::now();
        let mut expired = Vec::new();
        let mut unanswered = Vec::new();
        let ack_timeout_ms = self.settings.ack_timeout.as_millis() as i64;
        for (id, open) in &mut self.open {
            if open.rec.expires_at_ms <= now {
                expired.push(id.clone());
                continue;
            }
            if open.rec.state != CommandState::Sent {
                continue;
            }
            let timed_out = open
                .pushed_at
                .is_some_and(|at| instant.duration_since(at) >= self.settings.ack_timeout);
            if timed_out {
                // Send it again (if attempts are left, see below).
                open.unpush();
            }
            // Out of attempts: FAILED once the device has been connected
            // for an ack timeout since the last write without a word.
            let attached = self
                .queues
                .get(&open.rec.device_id)
                .is_some_and(|q| q.link.is_some());
            if open.pushed_to.is_none()
                && attached
                && !attempts_left(&open.rec, self.settings.max_attempts)
                && now.saturating_sub(open.rec.updated_at_ms) >= ack_timeout_ms
            {
                unanswered.push(id.clone());
            }
        }
        for id in expired {
            self.finish(
                &id,
                CommandState::Expired,
                "ttl passed before a final state",
                None,
                Vec::new(),
                now,
                batch,
            );
        }
        for id in unanswered {
            self.finish(
                &id,
                CommandState::Failed,
                "no response from device",
                None,
                Vec::new(),
                now,
                batch,
            );
        }
    }

    /// Deletes a step of old final commands when retention is due.
    async fn retain(&mut self) {
        let retention = self.settings.retention;
        if retention.is_zero() || self.stale || Instant::now() < self.next_retention {
            return;
        }
        const STEP: u32 = 1_000;
        let cutoff = now_ms().saturating_sub(retention.as_millis() as i64);
        let wait = match self.writer.delete_final_before(cutoff, STEP).await {
            Ok(n) if n == u64::from(STEP) => Duration::ZERO,
            Ok(n) => {
                if n > 0 {
                    tracing::info!(deleted = n, "retention deleted old final commands");
                }
                crate::retention::interval(retention)
            }
            Err(e) => {
                self.writer.abort().await;
                tracing::warn!(error = %e, "command retention failed; tried again later");
                crate::retention::interval(retention)
            }
        };
        self.next_retention = Instant::now() + wait;
    }

    /// When the next timer is due (at most a second away: an out-of-attempts
    /// command fails within a second of its ack timeout).
    fn next_deadline(&self) -> Instant {
        let instant = Instant::now();
        let now = now_ms();
        let mut next = instant + Duration::from_secs(1);
        if !self.settings.retention.is_zero() {
            next = next.min(self.next_retention.max(instant));
        }
        for open in self.open.values() {
            let expires = instant
                + Duration::from_millis(open.rec.expires_at_ms.saturating_sub(now).max(0) as u64);
            next = next.min(expires);
            if open.rec.state == CommandState::Sent
                && let Some(at) = open.pushed_at
            {
                next = next.min(at + self.settings.ack_timeout);
            }
            if open.pushed_to.is_none()
                && attempts_left(&open.rec, self.settings.max_attempts)
                && self
                    .queues
                    .get(&open.rec.device_id)
                    .is_some_and(|q| q.link.is_some())
            {
                // Waiting for room in a device's outbox.
                next = next.min(instant + Duration::from_millis(50));
            }
        }
        next
    }

    /// Persists a batch, then tells: operators, watchers, devices.
    async fn commit(&mut self, batch: Batch) {
        if batch.is_empty() {
            return;
        }
        match self.write(&batch).await {
            Ok(conflicts) => {
                // Commands another hub changed first: nothing of this
                // batch's change to them is stored, so nobody hears of it;
                // they are reloaded as the log holds them.
                let mut current = HashMap::new();
                for id in &conflicts {
                    match self.log.get(id).await {
                        Ok(Some((rec, _))) => {
                            current.insert(id.clone(), rec.clone());
                            self.reconcile(rec);
                        }
                        Ok(None) => {}
                        Err(e) => {
                            tracing::warn!(command_id = id, error = %e, "cannot reload a command changed elsewhere");
                            self.forget(id);
                        }
                    }
                }
                for (reply, rec) in batch.answers {
                    let answer = if !conflicts.contains(&rec.command_id) {
                        Ok(rec)
                    } else {
                        match current.remove(&rec.command_id) {
                            Some(now) if now.state.is_final() => Err(CommandError::AlreadyFinal {
                                id: now.command_id,
                                state: now.state,
                            }),
                            _ => Err(CommandError::LogUnavailable),
                        }
                    };
                    let _ = reply.send(answer);
                }
                for rec in batch.events {
                    if conflicts.contains(&rec.command_id) {
                        continue;
                    }
                    if let Some(metrics) = &self.metrics {
                        metrics
                            .command_transitions
                            .get_or_create(&StateLabel {
                                state: rec.state.as_str(),
                            })
                            .inc();
                    }
                    // No subscriber is fine.
                    let _ = self.local_events.send(rec.clone());
                    let _ = self.events.send(rec);
                }
            }
            Err(e) => {
                self.writer.abort().await;
                tracing::error!(error = %e, "command log commit failed; reloading open commands");
                for (reply, _) in batch.answers {
                    let _ = reply.send(Err(CommandError::LogUnavailable));
                }
                // Forget what was not committed: back to what the log holds.
                self.reload_or_go_stale().await;
            }
        }
    }

    /// Writes a batch in one transaction; returns the commands whose
    /// update did not apply (another hub changed them first).
    async fn write(&mut self, batch: &Batch) -> Result<Vec<String>, StoreError> {
        let mut conflicts: Vec<String> = Vec::new();
        let mut tx = self.writer.begin().await?;
        for rec in &batch.inserts {
            tx.insert(rec).await?;
            tx.history(
                &rec.command_id,
                &[transition(CommandState::Queued, rec.created_at_ms, "")],
            )
            .await?;
            tx.notify(&self.hub_id, &rec.command_id).await?;
        }
        for (rec, transitions, expected) in &batch.updates {
            if conflicts.contains(&rec.command_id) {
                continue;
            }
            if tx.update(rec, transitions, *expected).await? {
                tx.notify(&self.hub_id, &rec.command_id).await?;
            } else {
                conflicts.push(rec.command_id.clone());
            }
        }
        tx.commit().await?;
        if !conflicts.is_empty() {
            tracing::debug!(?conflicts, "commands changed by another hub first");
        }
        Ok(conflicts)
    }

    /// Takes in a command as the log holds it: a final one is withdrawn and
    /// forgotten, an open one is kept (in creation order) to be delivered
    /// if its device's stream is on this hub.
    fn reconcile(&mut self, rec: CommandRecord) {
        if rec.state.is_final() {
            self.forget(&rec.command_id);
            return;
        }
        if let Some(open) = self.open.get_mut(&rec.command_id) {
            open.rec = rec;
            return;
        }
        let queue = self.queues.entry(rec.device_id.clone()).or_default();
        let at = queue
            .order
            .iter()
            .position(|id| {
                self.open
                    .get(id)
                    .is_some_and(|o| o.rec.created_at_ms > rec.created_at_ms)
            })
            .unwrap_or(queue.order.len());
        queue.order.insert(at, rec.command_id.clone());
        self.open.insert(rec.command_id.clone(), Open::new(rec));
    }

    /// Makes the open commands in memory (of one device, or all) those of
    /// the log: the others are forgotten, these reconciled.
    fn resync(&mut self, device: Option<&str>, open: Vec<CommandRecord>) {
        let ids: std::collections::HashSet<&str> =
            open.iter().map(|r| r.command_id.as_str()).collect();
        let gone: Vec<String> = self
            .open
            .values()
            .filter(|o| device.is_none_or(|d| o.rec.device_id == d))
            .filter(|o| !ids.contains(o.rec.command_id.as_str()))
            .map(|o| o.rec.command_id.clone())
            .collect();
        for id in gone {
            self.forget(&id);
        }
        for rec in open {
            self.reconcile(rec);
        }
    }

    /// PostgreSQL: every few seconds the open commands are compared with
    /// the log, in case notices of other hubs' changes were lost (the
    /// listener reconnects without saying so).
    async fn resync_if_due(&mut self) {
        if self.stale
            || self.writer.backend() != crate::config::Backend::Postgres
            || Instant::now() < self.next_resync
        {
            return;
        }
        self.next_resync = Instant::now() + RESYNC_EVERY;
        match self.writer.load_open().await {
            Ok(open) => self.resync(None, open),
            Err(e) => tracing::warn!(error = %e, "cannot compare open commands with the log"),
        }
    }

    /// Drops a command from memory (withdrawn from any outbox).
    fn forget(&mut self, command_id: &str) {
        if let Some(open) = self.open.remove(command_id) {
            open.withdrawn.store(true, Ordering::Relaxed);
            if let Some(queue) = self.queues.get_mut(&open.rec.device_id) {
                queue.order.retain(|id| id != command_id);
            }
        }
    }

    /// Pushes open commands to attached devices, oldest first, as far as
    /// each device's outbox has room. Expired ones never go out.
    fn dispatch(&mut self) {
        let now = now_ms();
        let instant = Instant::now();
        for queue in self.queues.values_mut() {
            let Some((session, outbox)) = &queue.link else {
                continue;
            };
            let mut closed = false;
            for id in &queue.order {
                let Some(open) = self.open.get_mut(id) else {
                    continue;
                };
                if open.pushed_to == Some(*session) || open.rec.expires_at_ms <= now {
                    continue;
                }
                if !attempts_left(&open.rec, self.settings.max_attempts) {
                    // Failed at the next timer check, never pushed again.
                    continue;
                }
                let cmd = DeviceCommand {
                    command_id: open.rec.command_id.clone(),
                    name: open.rec.name.clone(),
                    params: open.rec.params.clone(),
                    expires_at_ms: open.rec.expires_at_ms,
                    withdrawn: Arc::clone(&open.withdrawn),
                };
                match outbox.try_send(Box::new(cmd)) {
                    Ok(()) => {
                        open.pushed_to = Some(*session);
                        open.pushed_at = Some(instant);
                    }
                    Err(mpsc::error::TrySendError::Full(_)) => break,
                    Err(mpsc::error::TrySendError::Closed(_)) => {
                        closed = true;
                        break;
                    }
                }
            }
            if closed {
                queue.link = None;
            }
        }
        self.queues
            .retain(|_, q| q.link.is_some() || !q.order.is_empty());
    }
}

/// May the command be written to a device stream again? A command has
/// `max_attempts` writes, across reconnects and restarts: one whose
/// delivery (or execution, after RECEIVED) kills the stream is not pushed
/// for ever. A RECEIVED one out of attempts still waits for its final reply
/// until its TTL; a SENT one fails (see `check_timers`).
fn attempts_left(rec: &CommandRecord, max_attempts: u32) -> bool {
    rec.attempts < max_attempts
}

/// A device's reply as stored: the detail cut to [`MAX_REPLY_DETAIL`] bytes;
/// a result that is not JSON, or over `max_result` bytes, is not kept and
/// the detail says so (the state the device reported is kept either way).
fn bounded_reply(mut reply: CommandReply, max_result: usize) -> CommandReply {
    if reply.detail.len() > MAX_REPLY_DETAIL {
        let mut cut = MAX_REPLY_DETAIL;
        while !reply.detail.is_char_boundary(cut) {
            cut -= 1;
        }
        reply.detail.truncate(cut);
        reply.detail.push('…');
    }
    let dropped = if reply.result.len() > max_result {
        Some(format!("larger than {max_result} bytes"))
    } else if !reply.result.is_empty()
        && serde_json::from_str::<serde_json::Value>(&reply.result).is_err()
    {
        Some("not JSON".to_owned())
    } else {
        None
    };
    if let Some(why) = dropped {
        reply.result.clear();
        let sep = if reply.detail.is_empty() { "" } else { "; " };
        reply.detail = format!("{}{sep}result dropped: {why}", reply.detail);
    }
    reply
}

/// A random, unique command id (UUID v4 text).
fn new_command_id() -> String {
    uuid::Uuid::new_v4().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A commands task on temp databases, with one registered device.
    async fn actor(dir: &tempfile::TempDir) -> (Commands, CancellationToken) {
        let mut settings = crate::config::Settings::defaults().unwrap().storage;
        settings.path = dir.path().join("hub.db");
        let (devices, mut writer) = crate::store::open(&settings).await.unwrap();
        let mut tx = writer.begin().await.unwrap();
        let hello = crate::domain::DeviceHello::new(
            DeviceId::parse("dev").unwrap(),
            String::new(),
            Default::default(),
            "",
        )
        .unwrap();
        tx.upsert_device(&hello, 0, &crate::auth::Proof::Admitted, "test")
            .await
            .unwrap();
        tx.commit().await.unwrap();
        let (store, log) = crate::store::commands::open(&settings).await.unwrap();
        let (handle, actor) = channel(
            CommandSettings {
                default_ttl: Duration::from_secs(60),
                max_pending_per_device: 10,
                ack_timeout: Duration::from_secs(10),
                max_attempts: 3,
                outbox: 4,
                max_params_bytes: 1024,
                retention: Duration::ZERO,
            },
            store,
            log,
            devices,
        );
        let stop = CancellationToken::new();
        tokio::spawn(actor.run(stop.clone()));
        (handle, stop)
    }

    #[tokio::test]
    async fn a_late_attach_of_an_older_stream_cannot_take_the_commands() {
        let dir = tempfile::tempdir().unwrap();
        let (commands, stop) = actor(&dir).await;
        let device = DeviceId::parse("dev").unwrap();
        // Stream 2 took over from stream 1, but 1's Attach arrives last.
        let mut newer = commands.attach(&device, 2).await;
        let mut older = commands.attach(&device, 1).await;
        let cmd = commands
            .send(NewCommand {
                device_id: "dev".into(),
                name: "ping".into(),
                params: String::new(),
                ttl: None,
            })
            .await
            .unwrap();
        let got = tokio::time::timeout(Duration::from_secs(5), newer.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(got.command_id, cmd.command_id);
        let refused = tokio::time::timeout(Duration::from_secs(5), older.recv()).await;
        assert!(matches!(refused, Ok(None)), "the stale stream is refused");
        stop.cancel();
    }

    fn reply(detail: &str, result: &str) -> CommandReply {
        CommandReply {
            command_id: "c".into(),
            status: ReplyStatus::Succeeded,
            detail: detail.into(),
            result: result.into(),
        }
    }

    #[test]
    fn replies_are_bounded_and_say_what_was_dropped() {
        let ok = bounded_reply(reply("fine", r#"{"a":1}"#), 64);
        assert_eq!(
            (ok.detail.as_str(), ok.result.as_str()),
            ("fine", r#"{"a":1}"#)
        );
        let big = bounded_reply(reply("", &format!("\"{}\"", "x".repeat(100))), 64);
        assert_eq!(
            (big.detail.as_str(), big.result.as_str()),
            ("result dropped: larger than 64 bytes", "")
        );
        let bad = bounded_reply(reply("done", "{not json"), 64);
        assert_eq!(bad.detail, "done; result dropped: not JSON");
        let long = bounded_reply(reply(&"é".repeat(600), ""), 64);
        assert!(long.detail.len() <= MAX_REPLY_DETAIL + '…'.len_utf8());
        assert!(long.detail.ends_with('…'));
    }
}
