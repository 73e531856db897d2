//! Bounded ingest queue -> one batching writer -> acks after commit.
//!
//! Sessions push checked readings into [`IngestQueue`] (bounded: a full queue
//! makes sessions wait, which reaches devices as HTTP/2 flow control). The
//! single [`writer`] task drains it, writes a group of batches in one
//! transaction, commits, and only then fills each session's [`AckSlot`]. The
//! writer never waits on a session: acks for one device coalesce in its slot
//! until the device's response stream takes them (it is woken by the slot).
//!
//! The writer is also the authority on duplicates: it keeps every device's
//! high-water mark in memory, so readings of an old and a new stream of the
//! same device (takeover) are never stored twice.

pub mod alarms;
pub mod jobs;
pub(crate) mod sidecar;
pub mod writer;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::Waker;
use std::time::Instant;

use tokio::sync::{Notify, mpsc, oneshot};

use crate::auth::Proof;
use crate::domain::{Arrival, CheckedReading, DeviceHello, DeviceId, DeviceKey, SensorKey};
use crate::twin::{Doc, TwinView};

pub use writer::{Writer, WriterSettings};

#[derive(Debug, Clone, thiserror::Error)]
pub enum IngestError {
    #[error("the hub is shutting down")]
    Closed,
    #[error("storage is unavailable")]
    Storage,
    /// The device's credentials changed (or it was removed) after its Hello
    /// was checked.
    #[error("invalid device credentials")]
    Refused,
    /// A line-protocol write of a device that holds a gRPC stream to
    /// another live hub (PostgreSQL): claiming it would cut that off.
    #[error("the device holds a gRPC stream to hub {0}")]
    StreamingElsewhere(String),
}

/// Readings of one device, in the order the device sent them. Every seq is
/// in 1..=2^63-1 (the session refuses a batch with any other).
pub struct IngestBatch {
    /// When the hub read it (for the ack latency histogram).
    pub received: std::time::Instant,
    pub device: DeviceKey,
    /// The device's external id, for the committed-readings fan-out.
    pub device_id: Arc<str>,
    pub readings: Vec<CheckedReading>,
    pub ack: Arc<AckSlot>,
    /// The device's session epoch when this stream registered: on
    /// PostgreSQL the batch is written only while it is still the device's.
    pub epoch: u64,
    /// The readings carry no seq (line protocol without `seq`): the writer
    /// gives them the seqs after the device's mark, in order.
    pub assign_seqs: bool,
}

/// A reported patch of a device's twin, checked by its session; written
/// and acked like a batch (the same epoch fence, the same slot).
pub struct ReportedBatch {
    pub received: std::time::Instant,
    pub device: DeviceKey,
    pub device_id: Arc<str>,
    /// ReportedPatch.seq, in 1..=2^63-1.
    pub seq: u64,
    /// The patch, or why the session refused it (committed as rejected,
    /// so the device's mark moves past it).
    pub patch: Result<Doc, String>,
    pub ack: Arc<AckSlot>,
    pub epoch: u64,
}

/// An operator's change of a twin, written by the writer.
#[derive(Debug, Clone)]
pub enum TwinOp {
    /// A merge patch of the desired document; with `if_version`, only if
    /// that is its version.
    Desired {
        device: DeviceKey,
        patch: Doc,
        if_version: Option<u64>,
    },
    /// Tags set and removed (both checked by the operator core).
    Tags {
        device: DeviceKey,
        set: BTreeMap<String, String>,
        remove: Vec<String>,
    },
}

/// What became of a [`TwinOp`].
#[derive(Debug, Clone)]
pub enum TwinOutcome {
    /// Committed: the twin right after it.
    Done(Arc<TwinView>),
    /// No such device (any more).
    Gone,
    /// `if_version` is not the desired version, which is `current`.
    Stale { current: u64 },
    /// The document it makes is over the limits, or too many tags.
    Invalid(String),
}

/// Where a twin-aware device's stream starts (its Hello set `twin`).
#[derive(Debug, Clone)]
pub struct TwinStart {
    pub desired_version: u64,
    pub desired: Arc<str>,
    pub reported_seq: u64,
    pub reported_version: u64,
}

/// A device after registration: its key and committed high-water mark.
#[derive(Debug, Clone)]
pub struct Registered {
    pub device: DeviceKey,
    pub acked_seq: u64,
    /// This stream's id: ids grow in the order the writer registered
    /// Hellos, so the later Hello of a device wins a takeover.
    pub stream: u64,
    /// The device's session epoch, bumped by this Hello (shared by every
    /// hub on one PostgreSQL database).
    pub epoch: u64,
    /// With a twin-aware Hello: its twin as the registration read it.
    pub twin: Option<TwinStart>,
}

/// An operator's change to a device's credentials, written by the writer
/// (the one writer of the readings database).
#[derive(Debug, Clone)]
pub enum CredentialChange {
    /// Add the device, or re-add a removed one, with its own token.
    Enroll {
        hello: DeviceHello,
        token_sha256: [u8; 32],
    },
    Rotate {
        device_id: DeviceId,
        token_sha256: [u8; 32],
    },
    Remove {
        device_id: DeviceId,
    },
    /// Pin a device to one client certificate, or unpin it (None).
    PinCertificate {
        device_id: DeviceId,
        sha256: Option<[u8; 32]>,
    },
    /// Refuse a client certificate from now on (replies whether it was new).
    RevokeCertificate {
        sha256: [u8; 32],
    },
}

pub(crate) enum WriterMsg {
    Batch(IngestBatch),
    Alarm(alarms::AlarmMsg),
    Job(jobs::JobMsg),
    Reported(ReportedBatch),
    Twin {
        op: TwinOp,
        reply: oneshot::Sender<Result<TwinOutcome, IngestError>>,
    },
    Register {
        hello: DeviceHello,
        proof: Proof,
        arrival: Arrival,
        reply: oneshot::Sender<Result<Registered, IngestError>>,
    },
    /// Replies whether the device was there (always true for Enroll).
    Credentials {
        change: CredentialChange,
        reply: oneshot::Sender<Result<bool, IngestError>>,
    },
    /// Retention: deletes up to `limit` old readings; replies how many,
    /// and how many of the step's series were finished.
    Retain {
        step: RetainStep,
        reply: oneshot::Sender<Result<RetainDone, IngestError>>,
    },
}

/// One retention step: readings stamped before `cutoff_ms`, at most
/// `limit` of them, from the staging table and then from each series in
/// turn.
#[derive(Debug, Clone)]
pub struct RetainStep {
    pub cutoff_ms: i64,
    pub limit: u32,
    pub staged: bool,
    /// (device, sensor) series of the clustered table.
    pub series: Vec<(DeviceKey, SensorKey)>,
    /// Rollup chunks: (every_ms, cutoff_ms) of rollups with a `keep`, chunks
    /// starting before the cutoff, at most `limit` of them in all.
    pub rollups: Vec<(i64, i64)>,
}

/// What a retention step did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RetainDone {
    pub deleted: u64,
    /// Whether the staging table has no more to delete.
    pub staged_done: bool,
    /// Series at the front of the step with nothing old left.
    pub series_done: usize,
    /// Rollup chunks deleted, and whether none is left to delete.
    pub rollup_chunks: u64,
    pub rollups_done: bool,
}

impl WriterMsg {
    /// The device a Hello or a credential change names by its id.
    fn names_device(&self) -> Option<&str> {
        match self {
            WriterMsg::Register { hello, .. } => Some(hello.device_id.as_str()),
            WriterMsg::Credentials { change, .. } => match change {
                CredentialChange::Enroll { hello, .. } => Some(hello.device_id.as_str()),
                CredentialChange::Rotate { device_id, .. }
                | CredentialChange::Remove { device_id }
                | CredentialChange::PinCertificate { device_id, .. } => Some(device_id.as_str()),
                CredentialChange::RevokeCertificate { .. } => None,
            },
            _ => None,
        }
    }

    /// When the hub read it from its device, for a batch or a reported
    /// patch: the group's wait counts from there (a batch that queued
    /// behind the last commit has waited already).
    fn arrived(&self) -> Option<std::time::Instant> {
        match self {
            WriterMsg::Batch(b) => Some(b.received),
            WriterMsg::Reported(r) => Some(r.received),
            _ => None,
        }
    }

    fn rows(&self) -> usize {
        match self {
            WriterMsg::Batch(b) => b.readings.len(),
            WriterMsg::Register { .. }
            | WriterMsg::Credentials { .. }
            | WriterMsg::Reported(_)
            | WriterMsg::Alarm(_)
            | WriterMsg::Job(_)
            | WriterMsg::Twin { .. } => 1,
            WriterMsg::Retain { step, .. } => step.limit as usize,
        }
    }

    /// Tells the sender its message was not committed (storage failed).
    fn fail(self) {
        // A sender that went meanwhile has nobody left to tell.
        match self {
            WriterMsg::Batch(batch) => batch.ack.fail(),
            WriterMsg::Reported(patch) => patch.ack.fail(),
            WriterMsg::Twin { reply, .. } => {
                let _ = reply.send(Err(IngestError::Storage));
            }
            WriterMsg::Alarm(msg) => {
                let _ = msg.reply.send(Err(IngestError::Storage));
            }
            WriterMsg::Job(msg) => {
                let _ = msg.reply.send(Err(IngestError::Storage));
            }
            WriterMsg::Register { reply, .. } => {
                let _ = reply.send(Err(IngestError::Storage));
            }
            WriterMsg::Credentials { reply, .. } => {
                let _ = reply.send(Err(IngestError::Storage));
            }
            WriterMsg::Retain { reply, .. } => {
                let _ = reply.send(Err(IngestError::Storage));
            }
        }
    }
}

/// The sending side of the ingest queue; cheap to clone.
#[derive(Clone)]
pub struct IngestQueue {
    tx: mpsc::Sender<WriterMsg>,
    full: Arc<Notify>,
}

/// The writer's end of the queue: the messages, and a wake-up for when a
/// sender found the queue full.
pub(crate) struct QueueRx {
    pub rx: mpsc::Receiver<WriterMsg>,
    pub full: Arc<Notify>,
}

/// Creates the bounded queue and the receiver the writer drains.
pub(crate) fn queue(capacity: usize) -> (IngestQueue, QueueRx) {
    let (tx, rx) = mpsc::channel(capacity);
    let full = Arc::new(Notify::new());
    (
        IngestQueue {
            tx,
            full: Arc::clone(&full),
        },
        QueueRx { rx, full },
    )
}

impl IngestQueue {
    /// Queues a message, waiting while the queue is full. A full queue
    /// wakes the writer: it sleeps through a group's wait, and what is
    /// queued is then enough to commit.
    async fn send(&self, msg: WriterMsg) -> Result<(), IngestError> {
        match self.tx.try_send(msg) {
            Ok(()) => Ok(()),
            Err(mpsc::error::TrySendError::Full(msg)) => {
                self.full.notify_one();
                self.tx.send(msg).await.map_err(|_| IngestError::Closed)
            }
            Err(mpsc::error::TrySendError::Closed(_)) => Err(IngestError::Closed),
        }
    }

    /// Sends the writer a request and waits for its answer, given after the
    /// commit that holds it.
    async fn ask<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<Result<T, IngestError>>) -> WriterMsg,
    ) -> Result<T, IngestError> {
        let (reply, answer) = oneshot::channel();
        self.send(make(reply)).await?;
        answer.await.map_err(|_| IngestError::Closed)?
    }

    /// Registers a device (in the writer's next commit) and returns its key
    /// and committed high-water mark.
    pub async fn register(
        &self,
        hello: DeviceHello,
        proof: Proof,
    ) -> Result<Registered, IngestError> {
        self.ask(|reply| WriterMsg::Register {
            hello,
            proof,
            arrival: Arrival::Stream,
            reply,
        })
        .await
    }

    /// Registers a device for a line-protocol write: like a Hello (its
    /// credentials checked again, its epoch bumped), but its firmware and
    /// reported state stay.
    pub async fn register_writes(
        &self,
        device_id: crate::domain::DeviceId,
        proof: Proof,
    ) -> Result<Registered, IngestError> {
        let hello = DeviceHello {
            device_id,
            firmware: String::new(),
            labels: BTreeMap::new(),
            twin: None,
        };
        self.ask(|reply| WriterMsg::Register {
            hello,
            proof,
            arrival: Arrival::Write,
            reply,
        })
        .await
    }

    /// Changes a device's credentials in the writer's next commit; whether
    /// the device was there.
    pub async fn change_credentials(&self, change: CredentialChange) -> Result<bool, IngestError> {
        self.ask(|reply| WriterMsg::Credentials { change, reply })
            .await
    }

    /// An operator's twin change, in the writer's next commit.
    pub async fn change_twin(&self, op: TwinOp) -> Result<TwinOutcome, IngestError> {
        self.ask(|reply| WriterMsg::Twin { op, reply }).await
    }

    /// An alarm change (a rule, an operator's acknowledgement or clear,
    /// the leader's inactivity step or webhook attempts), in the writer's
    /// next commit.
    pub async fn alarm(&self, op: alarms::AlarmOp) -> Result<alarms::AlarmOutcome, IngestError> {
        self.ask(|reply| WriterMsg::Alarm(alarms::AlarmMsg { op, reply }))
            .await
    }

    /// A job change, in the writer's next commit.
    pub async fn job(&self, op: jobs::JobOp) -> Result<jobs::JobOutcome, IngestError> {
        self.ask(|reply| WriterMsg::Job(jobs::JobMsg { op, reply }))
            .await
    }

    /// Queues a reported patch, waiting while the queue is full.
    pub async fn push_reported(&self, patch: ReportedBatch) -> Result<(), IngestError> {
        self.send(WriterMsg::Reported(patch)).await
    }

    /// One retention step, in the writer's next commit: how many readings
    /// it deleted.
    pub async fn retain(&self, step: RetainStep) -> Result<RetainDone, IngestError> {
        self.ask(|reply| WriterMsg::Retain { step, reply }).await
    }

    /// Queues a batch, waiting while the queue is full.
    pub async fn push(&self, batch: IngestBatch) -> Result<(), IngestError> {
        self.send(WriterMsg::Batch(batch)).await
    }

    /// Queues a batch if the queue has room now; hands it back when the
    /// queue is full (then [`IngestQueue::push`] waits for room). A
    /// session's common case, without making the futures of a wait.
    pub fn try_push(&self, batch: IngestBatch) -> Result<Option<IngestBatch>, IngestError> {
        match self.tx.try_send(WriterMsg::Batch(batch)) {
            Ok(()) => Ok(None),
            Err(mpsc::error::TrySendError::Full(WriterMsg::Batch(batch))) => Ok(Some(batch)),
            Err(_) => Err(IngestError::Closed),
        }
    }

    /// Messages waiting for the writer.
    pub fn depth(&self) -> usize {
        self.tx.max_capacity() - self.tx.capacity()
    }
}

impl std::fmt::Debug for IngestQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IngestQueue")
            .field("depth", &self.depth())
            .finish()
    }
}

/// What the next Ack to a device will say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PendingAck {
    pub acked_seq: u64,
    pub rejected: u32,
    pub duplicates: u32,
}

/// What the next ReportedAck to a device will say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingReported {
    pub seq: u64,
    pub version: u64,
    pub rejected: u32,
    /// Why the last rejected patch was; empty when none was.
    pub error: String,
}

#[derive(Default)]
struct ReportedState {
    seq: u64,
    version: u64,
    rejected: u32,
    error: String,
    unsent: bool,
}

#[derive(Default)]
struct AckState {
    acked_seq: u64,
    rejected: u32,
    duplicates: u32,
    unsent: bool,
    reported: ReportedState,
    batches_done: u64,
    failed: bool,
    /// Failed because another hub claimed the device.
    fenced: bool,
    /// A fenced batch's readings, handed back (nothing of them was
    /// written): a line-protocol write queues them again.
    returned: Vec<CheckedReading>,
    /// Since when an ack has waited to be taken.
    news_since: Option<Instant>,
    /// The response stream waiting for the next completion.
    stream: Option<Waker>,
    /// Completions are told through `changed` too.
    watched: bool,
    /// The session ends its stream with OK (see [`AckSlot::say_ok`]).
    said_ok: bool,
}

/// Where the writer leaves the outcome of a session's committed batches.
/// Several commits between two sends coalesce into one Ack.
///
/// Two readers: the device's response stream takes the acks
/// ([`AckSlot::next_due`], which leaves its waker for the writer's next
/// completion), and the session's task waits on [`AckSlot::changed`] for a
/// failure, and for completions only once it [`AckSlot::watch`]es them (a
/// stream's slot starts unwatched: acks then wake the stream alone, not
/// a task that has nothing to do with them).
pub struct AckSlot {
    state: Mutex<AckState>,
    changed: Notify,
}

/// An ack due to the device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Due {
    Ack(PendingAck),
    Reported(PendingReported),
}

impl AckSlot {
    /// A slot whose every change is told through [`AckSlot::changed`].
    pub fn new() -> Arc<Self> {
        Self::with_watch(true)
    }

    /// A device stream's slot: completions wake the stream that takes the
    /// acks; [`AckSlot::changed`] tells only failures until
    /// [`AckSlot::watch`].
    pub fn for_stream() -> Arc<Self> {
        Self::with_watch(false)
    }

    fn with_watch(watched: bool) -> Arc<Self> {
        Arc::new(Self {
            state: Mutex::new(AckState {
                watched,
                ..AckState::default()
            }),
            changed: Notify::new(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, AckState> {
        // A panic while holding this lock cannot leave the counters torn.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Wakes whoever waits for this change, after the lock is let go.
    fn told(&self, mut s: MutexGuard<'_, AckState>, failure: bool) {
        let stream = s.stream.take();
        let watched = s.watched;
        drop(s);
        if let Some(waker) = stream {
            waker.wake();
        }
        if watched || failure {
            self.changed.notify_one();
        }
    }

    /// Marks news as waiting to be taken (since now, if nothing was).
    fn news(s: &mut AckState) {
        if s.news_since.is_none() {
            s.news_since = Some(Instant::now());
        }
    }

    /// The stream took an ack just now: what is left waits from now.
    fn taken(s: &mut AckState) {
        s.news_since = (s.unsent || s.reported.unsent).then(Instant::now);
    }

    /// Called by the writer after the commit that holds a batch.
    pub(crate) fn complete(&self, acked_seq: u64, rejected: u32, duplicates: u32) {
        let mut s = self.lock();
        s.acked_seq = s.acked_seq.max(acked_seq);
        s.rejected = s.rejected.saturating_add(rejected);
        s.duplicates = s.duplicates.saturating_add(duplicates);
        s.unsent = true;
        s.batches_done += 1;
        Self::news(&mut s);
        self.told(s, false);
    }

    /// Called by the writer after the commit that holds a reported patch:
    /// the device's mark and version after it, and why it was rejected if
    /// it was.
    pub(crate) fn complete_reported(&self, seq: u64, version: u64, rejected: Option<String>) {
        let mut s = self.lock();
        let r = &mut s.reported;
        r.seq = r.seq.max(seq);
        r.version = r.version.max(version);
        if let Some(why) = rejected {
            r.rejected = r.rejected.saturating_add(1);
            r.error = why;
        }
        r.unsent = true;
        s.batches_done += 1;
        Self::news(&mut s);
        self.told(s, false);
    }

    fn reported_of(s: &mut AckState) -> Option<PendingReported> {
        let r = &mut s.reported;
        if !r.unsent {
            return None;
        }
        r.unsent = false;
        let ack = PendingReported {
            seq: r.seq,
            version: r.version,
            rejected: r.rejected,
            error: std::mem::take(&mut r.error),
        };
        r.rejected = 0;
        Self::taken(s);
        Some(ack)
    }

    /// Called by the writer when the commit holding a batch failed.
    pub(crate) fn fail(&self) {
        let mut s = self.lock();
        s.failed = true;
        self.told(s, true);
    }

    /// Called by the writer when a batch was not written because the
    /// device was claimed by another hub: the session must end.
    pub(crate) fn fence(&self) {
        self.fence_returning(Vec::new());
    }

    /// [`AckSlot::fence`] of a batch, whose readings come back through
    /// [`AckSlot::take_returned`].
    pub(crate) fn fence_returning(&self, readings: Vec<CheckedReading>) {
        let mut s = self.lock();
        s.failed = true;
        s.fenced = true;
        s.returned = readings;
        self.told(s, true);
    }

    /// The readings of a fenced batch, once.
    pub fn take_returned(&self) -> Vec<CheckedReading> {
        std::mem::take(&mut self.lock().returned)
    }

    /// Whether the failure was a claim by another hub.
    pub fn fenced(&self) -> bool {
        self.lock().fenced
    }

    /// The Ack to send now, if anything was committed since the last one.
    pub fn take(&self) -> Option<PendingAck> {
        Self::ack_of(&mut self.lock())
    }

    fn ack_of(s: &mut AckState) -> Option<PendingAck> {
        if !s.unsent {
            return None;
        }
        s.unsent = false;
        let ack = PendingAck {
            acked_seq: s.acked_seq,
            rejected: s.rejected,
            duplicates: s.duplicates,
        };
        s.rejected = 0;
        s.duplicates = 0;
        Self::taken(s);
        Some(ack)
    }

    /// The ack due now (the Ack before the ReportedAck); when none is,
    /// `waker` is woken by the next completion. Checked and registered
    /// under one lock, so no completion slips between.
    pub fn next_due(&self, waker: &Waker) -> Option<Due> {
        let mut s = self.lock();
        if let Some(ack) = Self::ack_of(&mut s) {
            return Some(Due::Ack(ack));
        }
        if let Some(ack) = Self::reported_of(&mut s) {
            return Some(Due::Reported(ack));
        }
        match &mut s.stream {
            Some(held) => held.clone_from(waker),
            None => s.stream = Some(waker.clone()),
        }
        None
    }

    /// Since when an ack has waited to be taken, if one is waiting.
    pub fn waiting_since(&self) -> Option<Instant> {
        self.lock().news_since
    }

    /// From now on every completion is told through [`AckSlot::changed`]
    /// too (a closing session waits for its last batches).
    pub fn watch(&self) {
        self.lock().watched = true;
    }

    /// The session ends its device's stream with OK, once the acks due are
    /// out. Said, not implied by its channel closing: a stream whose
    /// channel closes without it lost its session to a panic, and ends
    /// INTERNAL (`grpc::session::DeviceStream`).
    pub fn say_ok(&self) {
        self.lock().said_ok = true;
    }

    /// Whether [`AckSlot::say_ok`] was said.
    pub fn said_ok(&self) -> bool {
        self.lock().said_ok
    }

    /// Batches of this session that the writer has finished (committed).
    pub fn batches_done(&self) -> u64 {
        self.lock().batches_done
    }

    pub fn failed(&self) -> bool {
        self.lock().failed
    }

    /// Resolves after the next change (a permit is kept, so none is missed).
    pub async fn changed(&self) {
        self.changed.notified().await;
    }
}
