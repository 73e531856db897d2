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

mod book;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::sync::{broadcast, mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::domain::{
    CommandRecord, CommandReply, CommandState, CommandTransition, DeviceId, now_ms,
};
use crate::metrics::{HubMetrics, StateLabel};
use crate::store::commands::{CommandFilter, CommandStore, CommandWriter};
use crate::store::{Store, StoreError};

pub use self::book::MAX_REPLY_DETAIL;
use self::book::{Batch, CommandBook, transition};

pub const MIN_TTL: Duration = Duration::from_secs(1);
pub const MAX_TTL: Duration = Duration::from_secs(7 * 24 * 3600);

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
    /// The caller's id for it (an idempotency key, e.g. a job's): sent
    /// again with the same id, the command is not created twice; the one
    /// there is returned. None: a new random id.
    pub id: Option<String>,
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

pub struct CommandActor {
    rx: mpsc::Receiver<Request>,
    writer: CommandWriter,
    log: CommandStore,
    devices: Store,
    settings: CommandSettings,
    events: broadcast::Sender<CommandRecord>,
    local_events: broadcast::Sender<CommandRecord>,
    /// The open commands and the device queues: every decision.
    book: CommandBook,
    /// The in-memory state could not be rebuilt from the log after a failed
    /// commit: nothing is pushed or decided until it is.
    stale: bool,
    reload_retry_at: Instant,
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
        book: CommandBook::new(&settings),
        rx,
        writer,
        log: store,
        devices,
        settings,
        events,
        local_events,
        stale: false,
        reload_retry_at: Instant::now(),
        metrics: None,
        next_retention: Instant::now(),
        hub_id: Arc::from("local"),
        next_resync: Instant::now() + RESYNC_EVERY,
    };
    (handle, actor)
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
                while batch.writes() < 256 {
                    let Ok(next) = self.rx.try_recv() else { break };
                    self.handle(next, &mut batch).await;
                }
            }
            self.book.check_timers(now_ms(), Instant::now(), &mut batch);
            self.commit(batch).await;
            self.resync_if_due().await;
            self.book.dispatch(now_ms());
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
                self.book.clear();
                self.stale = true;
                self.reload_retry_at = Instant::now() + Duration::from_secs(1);
            }
        }
    }

    /// Rebuilds the in-memory state from the log (at start, and after a
    /// failed commit). Links to live streams are kept.
    async fn reload(&mut self) -> Result<(), StoreError> {
        let open = self.writer.load_open().await?;
        self.book.replace_all(open);
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
            Request::Send { cmd, reply } => match self.create(cmd, batch).await {
                Ok((rec, true)) => batch.answers.push((reply, rec)),
                // Already there (sent again under its id): nothing to
                // commit, answered now.
                Ok((rec, false)) => {
                    let _ = reply.send(Ok(rec));
                }
                Err(e) => {
                    let _ = reply.send(Err(e));
                }
            },
            Request::Cancel { command_id, reply } => {
                if !self.book.is_open(&command_id) {
                    let refusal = match self.final_record(&command_id).await {
                        // Open, but this hub had not heard of it (another
                        // hub's notice was lost): it is now.
                        Ok(Some(rec)) if !rec.state.is_final() => {
                            self.book.reconcile(rec);
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
                match self.book.cancel(&command_id, now_ms(), batch) {
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
                        Ok(open) => self.book.resync(Some(&device), open),
                        Err(e) => {
                            tracing::warn!(device_id = device, error = %e,
                                "cannot load the device's open commands; the next change brings them")
                        }
                    }
                }
                self.book.attach(device, session, outbox)
            }
            Request::Refresh { command_id } => match self.log.get(&command_id).await {
                Ok(Some((rec, _))) => {
                    // Watchers on this hub hear of it too.
                    let _ = self.events.send(rec.clone());
                    self.book.reconcile(rec);
                }
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(command_id, error = %e, "cannot reload a command another hub changed")
                }
            },
            Request::Detach { device, session } => self.book.detach(&device, session),
            Request::Written {
                device,
                session,
                command_id,
            } => self.book.written(
                &device,
                session,
                &command_id,
                now_ms(),
                Instant::now(),
                batch,
            ),
            Request::Reply { device, reply } => self.book.on_reply(&device, reply, now_ms(), batch),
        }
    }

    /// A command that is not open: final, or unknown.
    async fn final_record(&self, command_id: &str) -> Result<Option<CommandRecord>, StoreError> {
        Ok(self.log.get(command_id).await?.map(|(rec, _)| rec))
    }

    /// Checks a command (the core's rules, [`book::checked`]) and that its
    /// device exists, then queues it; with the caller's id of a command
    /// already there, that one. Whether it is new.
    async fn create(
        &mut self,
        cmd: NewCommand,
        batch: &mut Batch,
    ) -> Result<(CommandRecord, bool), CommandError> {
        let (params, ttl) = book::checked(&cmd, &self.settings)?;
        if let Some(id) = &cmd.id {
            if id.is_empty() || id.len() > 128 || id.chars().any(char::is_control) {
                return Err(CommandError::Invalid(
                    "a command id is 1 to 128 bytes without control characters".into(),
                ));
            }
            if let Some(rec) = self.book.get_open(id).or(self.final_record(id).await?) {
                if rec.device_id != cmd.device_id || rec.name != cmd.name {
                    return Err(CommandError::Invalid(format!(
                        "command id {id:?} is taken by another command"
                    )));
                }
                return Ok((rec, false));
            }
        }
        if self.devices.find_device(&cmd.device_id).await?.is_none() {
            return Err(CommandError::UnknownDevice(cmd.device_id));
        }
        let id = cmd.id.clone().unwrap_or_else(new_command_id);
        let rec = self.book.create(cmd, params, ttl, id, now_ms(), batch)?;
        Ok((rec, true))
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

    /// When the next timer is due: an open command's, or retention's.
    fn next_deadline(&self) -> Instant {
        let instant = Instant::now();
        let next = self.book.next_deadline(now_ms(), instant);
        if self.settings.retention.is_zero() {
            next
        } else {
            next.min(self.next_retention.max(instant))
        }
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
                            self.book.reconcile(rec);
                        }
                        Ok(None) => {}
                        Err(e) => {
                            tracing::warn!(command_id = id, error = %e, "cannot reload a command changed elsewhere");
                            self.book.forget(id);
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
            Ok(open) => self.book.resync(None, open),
            Err(e) => tracing::warn!(error = %e, "cannot compare open commands with the log"),
        }
    }
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
    async fn a_command_sent_again_under_its_id_is_created_once() {
        let dir = tempfile::tempdir().unwrap();
        let (commands, stop) = actor(&dir).await;
        let send = |id: &str, name: &str| NewCommand {
            id: Some(id.into()),
            device_id: "dev".into(),
            name: name.into(),
            params: String::new(),
            ttl: None,
        };
        let first = commands.send(send("job-1-dev", "ping")).await.unwrap();
        assert_eq!(first.command_id, "job-1-dev");
        let again = commands.send(send("job-1-dev", "ping")).await.unwrap();
        assert_eq!(again, first, "the one already there");
        let listed = commands
            .list(&crate::store::commands::CommandFilter {
                device_id: Some("dev".into()),
                state: None,
                since_ms: None,
                until_ms: None,
                limit: 10,
            })
            .await
            .unwrap();
        assert_eq!(listed.len(), 1);
        // Final, too: still the one there. Another command cannot take it.
        commands.cancel("job-1-dev").await.unwrap();
        let after = commands.send(send("job-1-dev", "ping")).await.unwrap();
        assert_eq!(after.state, CommandState::Cancelled);
        assert!(matches!(
            commands.send(send("job-1-dev", "reboot")).await,
            Err(CommandError::Invalid(_))
        ));
        stop.cancel();
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
                id: None,
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
}
