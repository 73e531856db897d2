//! One device stream: a reader loop (this task), a task for what the hub
//! sends besides acks, and the response stream that takes the acks.
//!
//! ```text
//! inbound ──reader──▶ IngestQueue ──writer commits──▶ AckSlot ──▶ DeviceStream ──▶ device
//!                              commands, desired ──ack task──▶ channel ──┘
//! ```
//! The reader validates readings and pushes them into the bounded ingest
//! queue (waiting when it is full). The writer's commit leaves the Ack in
//! the session's slot and wakes the response stream ([`DeviceStream`]),
//! which takes it: an Ack costs no task wake-up or channel of its own. The
//! ack task sends the rest (commands, desired state) through a bounded
//! channel. When the reader ends (half-close, takeover, shutdown, bad
//! input, vanished peer) it hands the ack task a [`Finish`]: wait for the
//! batches still due, within `drain_timeout`, then end the stream with its
//! status, which the stream sends after the last Acks. The session counts
//! as live until both tasks have ended.
//!
//! A twin-aware device (its Hello set `twin`) also gets its desired
//! state: the whole document after the Welcome when the version it holds
//! is not the current one, then every change this hub hands over
//! ([`crate::twin::DesiredFeed`], taken before the registration reads the
//! twin, so no change slips between). Its reported patches go through the
//! ingest queue like batches and are acked (ReportedAck) after the commit.
//!
//! One device must not cost the others: its command replies are paced
//! (`server.max_replies_per_sec`; past it the reader stops reading, which
//! slows only this stream), its noise is logged with suppression counts, and
//! a device that reads nothing for `server.send_timeout` is dropped.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use telemetry_proto::v1::{
    self as pb, device_message::Msg as DeviceMsg, hub_message::Msg as HubMsg,
};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::{Status, Streaming};
use tracing::Instrument;

use super::convert;
use crate::auth::{AuthPolicy, FailureLimiter, Presented, Proof, certificate_sha256};
use crate::commands::{Commands, DeviceCommand};
use crate::config::DeviceAuthMode;
use crate::domain::{
    CheckedReading, DeviceHello, DeviceId, DeviceKey, MAX_SEQ, now_ms, seq_in_range,
};
use crate::ingest::{
    AckSlot, Due, IngestBatch, IngestError, IngestQueue, PendingAck, PendingReported, ReportedBatch,
};
use crate::metrics::HubMetrics;
use crate::registry::SessionRegistry;
use crate::registry::{EndProbe, EndReason, StreamClaim};
use crate::store::Store;
use crate::store::credentials::CredentialReads;
use crate::throttle::{LogThrottle, TokenBucket};
use crate::twin::{DesiredFeed, DesiredUpdate, DocLimits, TwinHub, doc};

pub type Outbound = mpsc::Sender<Result<Box<pb::HubMessage>, Status>>;

/// Ends the response stream at once with a status, dropping what is still
/// buffered for the device: the way out when the device reads nothing.
pub type Abort = oneshot::Sender<Status>;

/// How often one kind of warning about one stream may be logged.
const LOG_INTERVAL: Duration = Duration::from_secs(10);

/// Everything a session needs, shared by all sessions.
pub struct SessionContext {
    pub ingest: IngestQueue,
    pub registry: Arc<SessionRegistry>,
    pub metrics: Arc<HubMetrics>,
    pub commands: Commands,
    pub tracker: TaskTracker,
    /// Cancelled when the hub shuts down.
    pub shutdown: CancellationToken,
    pub max_batch: u32,
    pub max_message_bytes: usize,
    pub hello_timeout: Duration,
    pub drain_timeout: Duration,
    pub send_timeout: Duration,
    pub max_replies_per_sec: u32,
    pub max_readings_per_sec: u32,
    pub max_devices: usize,
    pub max_clock_skew: Duration,
    /// `storage.retention`: readings older than this are refused.
    pub retention: Option<Duration>,
    pub auth: Arc<AuthPolicy>,
    /// The database (its backend).
    pub store: Store,
    /// Device credentials are read from here.
    pub credentials: CredentialReads,
    /// Desired changes for twin-aware streams come from here.
    pub twins: Arc<TwinHub>,
    /// What a reported document may be.
    pub twin_limits: DocLimits,
    pub failures: FailureLimiter,
    /// Refused streams and failed authentications, logged with suppression.
    pub refusals: std::sync::Mutex<LogThrottle>,
}

/// How the reader ended, told to the ack task.
struct Finish {
    batches_pushed: u64,
    /// Send the acks still due before ending (not when the peer is gone).
    flush: bool,
    /// None ends the stream with OK.
    status: Option<Status>,
}

/// Who is at the other end of a stream, as the transport saw it.
#[derive(Debug, Clone, Default)]
pub struct Peer {
    pub ip: Option<IpAddr>,
    /// The client certificate (leaf, DER), under TLS with client auth.
    pub certificate: Option<Vec<u8>>,
}

/// The session's ends of its response stream ([`DeviceStream`]).
pub struct Outlet {
    /// Welcome, desired state, commands and the closing status.
    pub tx: Outbound,
    pub abort: Abort,
    /// Acks, which the stream takes from here itself.
    pub slot: Arc<AckSlot>,
}

/// Runs one device stream to its end.
pub async fn run(
    ctx: Arc<SessionContext>,
    mut inbound: Streaming<pb::DeviceMessage>,
    outlet: Outlet,
    peer: Peer,
) {
    let _live = ctx.metrics.session_started();
    let checked = match wait_for_hello(&ctx, &mut inbound).await {
        Ok(Some((hello, token))) => admit(&ctx, &hello, &token, &peer)
            .await
            .map(|proof| (hello, proof)),
        // The device ended its send side before a Hello.
        Ok(None) => {
            outlet.slot.say_ok();
            return;
        }
        Err(status) => Err(status),
    };
    let (hello, proof) = match checked {
        Ok(admitted) => admitted,
        Err(status) => {
            if let Some(suppressed) = ctx
                .refusals
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .allow()
            {
                tracing::info!(code = ?status.code(), reason = status.message(), peer = ?peer.ip,
                    suppressed, "stream refused at Hello");
            }
            let _ = outlet.tx.send(Err(status)).await;
            return;
        }
    };
    let span = tracing::info_span!("session", device_id = %hello.device_id);
    run_registered(ctx, inbound, outlet, hello, proof)
        .instrument(span)
        .await;
}

async fn run_registered(
    ctx: Arc<SessionContext>,
    mut inbound: Streaming<pb::DeviceMessage>,
    outlet: Outlet,
    hello: DeviceHello,
    proof: Proof,
) {
    let Outlet {
        tx: outbound,
        abort,
        slot,
    } = outlet;
    let device_id = hello.device_id.clone();
    let firmware = hello.firmware.clone();
    // Followed before the registration reads the twin: a change committed
    // after that read is handed over here.
    let holds = hello.twin;
    let feed = holds.map(|_| ctx.twins.follow(device_id.as_str()));
    let registered = match ctx.ingest.register(hello, proof).await {
        Ok(r) => r,
        Err(IngestError::Refused) => {
            // Removed, or its credentials changed, since its Hello was checked.
            let status = Status::unauthenticated("invalid device credentials");
            let _ = outbound.send(Err(status)).await;
            return;
        }
        Err(e) => {
            tracing::warn!(error = %e, "registration failed");
            let _ = outbound.send(Err(Status::unavailable(e.to_string()))).await;
            return;
        }
    };
    let certificate = match proof {
        Proof::Certificate(sha256) => Some(sha256),
        _ => None,
    };
    let Some(claim) = ctx.registry.claim(
        &device_id,
        registered.stream,
        registered.epoch,
        now_ms(),
        &firmware,
        certificate,
    ) else {
        // A newer Hello of this device was registered meanwhile.
        let status = Status::aborted("superseded by a newer connection");
        let _ = outbound.send(Err(status)).await;
        return;
    };
    // Whether another hub may claim the device: then a fence nothing here
    // explains is a move.
    let moves = ctx.store.backend() == crate::config::Backend::Postgres;
    let twin = registered.twin.as_ref();
    let welcome = pb::HubMessage {
        msg: Some(HubMsg::Welcome(pb::Welcome {
            acked_seq: registered.acked_seq,
            max_batch: ctx.max_batch,
            reported_seq: twin.map_or(0, |t| t.reported_seq),
            reported_version: twin.map_or(0, |t| t.reported_version),
        })),
    };
    if outbound.send(Ok(Box::new(welcome))).await.is_err() {
        return;
    }
    // A device that holds another desired version gets the whole document.
    let desired = match (feed, twin, holds) {
        (Some(feed), Some(start), Some(held)) => {
            if held != start.desired_version {
                let full = desired_message(start.desired_version, true, &start.desired);
                if outbound.send(Ok(Box::new(full))).await.is_err() {
                    return;
                }
            }
            Some(DesiredLink {
                feed,
                sent: start.desired_version,
            })
        }
        _ => None,
    };
    HubMetrics::add(&ctx.metrics.connects, 1);
    tracing::debug!(acked_seq = registered.acked_seq, "device connected");
    let link = CommandLink {
        commands: ctx.commands.clone(),
        inbox: ctx.commands.attach(&device_id, claim.id()).await,
        device: device_id.clone(),
        session: claim.id(),
    };

    let ended = CancellationToken::new();
    let (finish_tx, finish_rx) = oneshot::channel();
    let acker = ctx.tracker.spawn(
        ack_task(
            Arc::clone(&slot),
            link,
            DeviceOutbound {
                tx: outbound,
                abort,
                why_ended: claim.probe(moves),
            },
            desired,
            finish_rx,
            ended.clone(),
            Timeouts {
                drain: ctx.drain_timeout,
                send: ctx.send_timeout,
            },
        )
        .in_current_span(),
    );
    let mut reader = Reader {
        ctx: &ctx,
        device_id: &device_id,
        device_name: Arc::from(device_id.as_str()),
        device: registered.device,
        epoch: registered.epoch,
        slot: &slot,
        ended: &ended,
        rejects: LogThrottle::new(LOG_INTERVAL),
        noise: LogThrottle::new(LOG_INTERVAL),
        replies: TokenBucket::new(ctx.max_replies_per_sec, ctx.max_replies_per_sec),
        readings: TokenBucket::new(ctx.max_readings_per_sec, ctx.max_readings_per_sec),
        paused_until: None,
        batches_pushed: 0,
    };
    let finish = reader.read(&mut inbound, &claim).await;
    let reason = finish
        .status
        .as_ref()
        .map_or("closed by device".to_owned(), |s| {
            format!("{:?}: {}", s.code(), s.message())
        });
    // The ack task may be gone already (peer vanished); that is fine.
    let _ = finish_tx.send(finish);
    let _ = acker.await;
    if slot.fenced() && claim.probe(moves).fenced_because() == EndReason::MovedAway {
        claim.moved_away();
    }
    ctx.commands.detach(&device_id, claim.id()).await;
    drop(claim);
    HubMetrics::add(&ctx.metrics.disconnects, 1);
    tracing::debug!(reason, "device disconnected");
}

/// May this Hello become a session? The device's credentials (the core's
/// policy, `auth`), and the limit of connected devices. An address with
/// too many failures in the last minute gets RESOURCE_EXHAUSTED for each
/// further failure, but valid credentials are always let in: devices behind
/// one NAT cannot be locked out by a neighbour guessing.
async fn admit(
    ctx: &SessionContext,
    hello: &DeviceHello,
    token: &str,
    peer: &Peer,
) -> Result<Proof, Status> {
    let id = hello.device_id.as_str();
    let certificate = peer
        .certificate
        .as_deref()
        .filter(|_| ctx.auth.devices == DeviceAuthMode::Tls);
    let stored = ctx
        .credentials
        .get(id, certificate.map(certificate_sha256).as_ref())
        .await
        .map_err(convert::store_status)?;
    let presented = Presented {
        device_id: id,
        token,
        certificate,
    };
    let proof = match ctx.auth.admit(presented, stored) {
        Ok(proof) => proof,
        Err(why) => {
            tracing::debug!(device_id = id, reason = %why, "device credentials refused");
            return Err(refuse(ctx, peer));
        }
    };
    if ctx.registry.live_count() >= ctx.max_devices && !ctx.registry.is_live(&hello.device_id) {
        return Err(Status::resource_exhausted(format!(
            "the hub already serves its limit of {} connected devices (server.max_devices)",
            ctx.max_devices
        )));
    }
    Ok(proof)
}

/// A refused Hello: counted, and from an address with too many failures in
/// the last minute RESOURCE_EXHAUSTED; else the same answer whatever the
/// reason, whether or not the device exists.
fn refuse(ctx: &SessionContext, peer: &Peer) -> Status {
    HubMetrics::add(&ctx.metrics.auth_failures, 1);
    if !ctx.failures.allowed(peer.ip) {
        return Status::resource_exhausted(
            "too many failed authentications from this address; try again in a minute",
        );
    }
    ctx.failures.failed(peer.ip);
    Status::unauthenticated("invalid device credentials")
}

async fn wait_for_hello(
    ctx: &SessionContext,
    inbound: &mut Streaming<pb::DeviceMessage>,
) -> Result<Option<(DeviceHello, String)>, Status> {
    let first = tokio::select! {
        first = tokio::time::timeout(ctx.hello_timeout, inbound.message()) => first,
        _ = ctx.shutdown.cancelled() => return Err(Status::unavailable("the hub is shutting down")),
    };
    let message = match first {
        Err(_) => {
            return Err(Status::deadline_exceeded(format!(
                "no Hello within {}",
                humantime::format_duration(ctx.hello_timeout)
            )));
        }
        Ok(Ok(Some(message))) => message,
        Ok(Ok(None)) => return Ok(None),
        Ok(Err(status)) => return Err(convert::inbound_error(status, ctx.max_message_bytes).0),
    };
    match message.msg {
        Some(DeviceMsg::Hello(hello)) => convert::hello(hello).map(Some),
        _ => Err(Status::failed_precondition(
            "the first message must be Hello",
        )),
    }
}

struct Reader<'a> {
    ctx: &'a SessionContext,
    device_id: &'a DeviceId,
    device_name: Arc<str>,
    device: DeviceKey,
    /// The session epoch this stream registered with.
    epoch: u64,
    slot: &'a Arc<AckSlot>,
    ended: &'a CancellationToken,
    /// Rejected readings.
    rejects: LogThrottle,
    /// Bad replies, empty messages, pacing.
    noise: LogThrottle,
    /// Command replies and empty messages: past the rate, reading pauses.
    replies: TokenBucket,
    /// Readings: past `server.max_readings_per_sec`, reading pauses.
    readings: TokenBucket,
    paused_until: Option<Instant>,
    batches_pushed: u64,
}

impl Reader<'_> {
    async fn read(
        &mut self,
        inbound: &mut Streaming<pb::DeviceMessage>,
        claim: &StreamClaim,
    ) -> Finish {
        // Made and registered with their tokens once, not per message
        // (each registration locks its token). A poll still checks each
        // token under its lock: the hub's shutdown is followed through a
        // child token of this stream's own, so 10k streams do not take
        // turns at one lock 50k times a second.
        let (ctx, ended) = (self.ctx, self.ended);
        let stopping = ctx.shutdown.child_token();
        let shutdown = stopping.cancelled();
        let superseded = claim.superseded.cancelled();
        let ending = ended.cancelled();
        tokio::pin!(shutdown, superseded, ending);
        loop {
            let paused = self.paused_until;
            let next = tokio::select! {
                biased;
                _ = &mut shutdown => {
                    return self.finish(true, Some(Status::unavailable("the hub is shutting down")));
                }
                _ = &mut superseded => {
                    return self.finish(true, Some(end_status(claim.end_reason())));
                }
                _ = &mut ending => return self.finish(false, None),
                // A timer only while paused.
                _ = pause_end(paused), if paused.is_some() => {
                    self.paused_until = None;
                    continue;
                }
                next = inbound.message(), if paused.is_none() => next,
            };
            let message = match next {
                Ok(Some(message)) => message,
                // The device ended its send side: the clean close.
                Ok(None) => return self.finish(true, None),
                Err(status) => {
                    let (status, peer_alive) =
                        convert::inbound_error(status, self.ctx.max_message_bytes);
                    return self.finish(peer_alive, Some(status));
                }
            };
            match message.msg {
                Some(DeviceMsg::Readings(batch)) => {
                    if batch.readings.len() > self.ctx.max_batch as usize {
                        let status = Status::invalid_argument(format!(
                            "a batch of {} readings exceeds max_batch {}",
                            batch.readings.len(),
                            self.ctx.max_batch
                        ));
                        return self.finish(true, Some(status));
                    }
                    if let Some(bad) = batch.readings.iter().find(|r| !seq_in_range(r.seq)) {
                        let status = Status::invalid_argument(format!(
                            "reading seq {} is outside 1..={MAX_SEQ}; nothing of this batch is stored",
                            bad.seq
                        ));
                        return self.finish(true, Some(status));
                    }
                    if batch.readings.is_empty() {
                        // Nothing to store or ack; paced like other noise.
                        self.pace();
                        continue;
                    }
                    if let Some(finish) = self.push(batch, claim).await {
                        return finish;
                    }
                }
                Some(DeviceMsg::Hello(_)) => {
                    let status =
                        Status::failed_precondition("Hello was already received on this stream");
                    return self.finish(true, Some(status));
                }
                Some(DeviceMsg::Reported(patch)) => {
                    if !seq_in_range(patch.seq) {
                        let status = Status::invalid_argument(format!(
                            "reported patch seq {} is outside 1..={MAX_SEQ}",
                            patch.seq
                        ));
                        return self.finish(true, Some(status));
                    }
                    // A bad patch is committed as rejected (its seq moves
                    // the mark) and the device is told why in its ack.
                    let parsed = doc::parse_patch(&patch.patch_json, &self.ctx.twin_limits)
                        .map_err(|e| e.to_string());
                    if let Err(why) = &parsed
                        && let Some(suppressed) = self.rejects.allow()
                    {
                        tracing::warn!(seq = patch.seq, %why, suppressed, "reported patch rejected");
                    }
                    self.pace();
                    if let Some(finish) = self.push_reported(patch.seq, parsed, claim).await {
                        return finish;
                    }
                }
                Some(DeviceMsg::CommandReply(reply)) => {
                    match convert::command_reply(reply) {
                        Ok(reply) => self.ctx.commands.reply(self.device_id, reply).await,
                        Err(why) => {
                            if let Some(suppressed) = self.noise.allow() {
                                tracing::warn!(%why, suppressed, "command reply ignored");
                            }
                        }
                    }
                    self.pace();
                }
                None => {
                    // A message type this hub does not know (a newer
                    // firmware's, perhaps): ignored, not fatal.
                    if let Some(suppressed) = self.noise.allow() {
                        tracing::warn!(suppressed, "message without known content ignored");
                    }
                    self.pace();
                }
            }
        }
    }

    /// Spends a token of the reply budget; in debt, the next read waits
    /// (this stream only slows down, nothing is dropped).
    fn pace(&mut self) {
        if let Err(wait) = self.replies.spend() {
            self.paused_until = Some(Instant::now() + wait);
            if let Some(suppressed) = self.noise.allow() {
                tracing::warn!(
                    limit = self.ctx.max_replies_per_sec,
                    suppressed,
                    "device sends replies faster than server.max_replies_per_sec; its stream is slowed"
                );
            }
        }
    }

    /// Checks and queues a batch. A push waiting for room gives up when a
    /// newer stream takes over: the batch is not queued (nor acked).
    async fn push(&mut self, batch: pb::ReadingBatch, claim: &StreamClaim) -> Option<Finish> {
        let now = now_ms();
        let latest = now.saturating_add(self.ctx.max_clock_skew.as_millis() as i64);
        let earliest = match self.ctx.retention {
            Some(retention) => now.saturating_sub(retention.as_millis() as i64),
            None => i64::MIN,
        };
        let mut readings = Vec::with_capacity(batch.readings.len());
        for reading in batch.readings {
            let reading = convert::reading(reading);
            match reading.check(earliest, latest) {
                Ok(()) => readings.push(CheckedReading::Valid(reading)),
                Err(reason) => {
                    if let Some(suppressed) = self.rejects.allow() {
                        tracing::warn!(seq = reading.seq, sensor = ?reading.sensor, %reason, suppressed, "reading rejected");
                    }
                    readings.push(CheckedReading::Rejected { seq: reading.seq });
                }
            }
        }
        // Past the device's reading rate the next read waits: backpressure
        // to this device alone, nothing rejected.
        if let Err(wait) = self.readings.spend_n(readings.len()) {
            self.paused_until = Some(Instant::now() + wait);
        }
        let batch = IngestBatch {
            received: std::time::Instant::now(),
            device: self.device,
            device_id: Arc::clone(&self.device_name),
            readings,
            ack: Arc::clone(self.slot),
            epoch: self.epoch,
            assign_seqs: false,
        };
        let ctx = self.ctx;
        let closed = "the hub is shutting down; resend unacknowledged readings";
        let batch = match ctx.ingest.try_push(batch) {
            Ok(None) => {
                self.batches_pushed += 1;
                return None;
            }
            Ok(Some(full)) => full,
            Err(_) => return Some(self.finish(true, Some(Status::unavailable(closed)))),
        };
        self.queue(ctx.ingest.push(batch), claim, closed).await
    }

    /// Waits for a push into the ingest queue (a full queue makes this
    /// wait: backpressure to the device). How the stream ends, if it must:
    /// the device gone, or the writer taking nothing more (`closed` says
    /// what to resend). A newer stream taking over while it waits leaves
    /// the item unqueued and the loop's next turn ends the stream.
    async fn queue(
        &mut self,
        push: impl Future<Output = Result<(), IngestError>>,
        claim: &StreamClaim,
        closed: &'static str,
    ) -> Option<Finish> {
        // The push first: it is ready at once unless the queue is full, and
        // then the tokens are not polled (each poll registers with them).
        tokio::select! {
            biased;
            pushed = push => match pushed {
                Ok(()) => {
                    self.batches_pushed += 1;
                    None
                }
                Err(_) => Some(self.finish(true, Some(Status::unavailable(closed)))),
            },
            _ = self.ended.cancelled() => Some(self.finish(false, None)),
            _ = claim.superseded.cancelled() => None,
        }
    }

    /// Queues a reported patch like a batch (acked after its commit).
    async fn push_reported(
        &mut self,
        seq: u64,
        patch: Result<doc::Doc, String>,
        claim: &StreamClaim,
    ) -> Option<Finish> {
        let patch = ReportedBatch {
            received: std::time::Instant::now(),
            device: self.device,
            device_id: Arc::clone(&self.device_name),
            seq,
            patch,
            ack: Arc::clone(self.slot),
            epoch: self.epoch,
        };
        let ctx = self.ctx;
        let closed = "the hub is shutting down; resend unacknowledged reported patches";
        self.queue(ctx.ingest.push_reported(patch), claim, closed)
            .await
    }

    fn finish(&self, flush: bool, status: Option<Status>) -> Finish {
        Finish {
            batches_pushed: self.batches_pushed,
            flush,
            status,
        }
    }
}

/// Ends at `until` (a paused reader's next read).
async fn pause_end(until: Option<Instant>) {
    if let Some(until) = until {
        tokio::time::sleep_until(until).await;
    }
}

/// How a stream that was told to end ends, by why.
fn end_status(reason: EndReason) -> Status {
    match reason {
        EndReason::Superseded => Status::aborted("superseded by a newer connection"),
        EndReason::MovedAway => Status::aborted("the device connected to another hub"),
        EndReason::Removed => Status::unauthenticated("the device was removed by an operator"),
        EndReason::CredentialsChanged => Status::unauthenticated(
            "the device's credentials were changed; connect with the new ones",
        ),
    }
}

fn ack_message(ack: PendingAck) -> pb::HubMessage {
    pb::HubMessage {
        msg: Some(HubMsg::Ack(pb::Ack {
            acked_seq: ack.acked_seq,
            rejected: ack.rejected,
            duplicates: ack.duplicates,
        })),
    }
}

fn reported_ack_message(ack: PendingReported) -> pb::HubMessage {
    pb::HubMessage {
        msg: Some(HubMsg::ReportedAck(pb::ReportedAck {
            seq: ack.seq,
            version: ack.version,
            rejected: ack.rejected,
            error: ack.error,
        })),
    }
}

fn desired_message(version: u64, full: bool, json: &str) -> pb::HubMessage {
    pb::HubMessage {
        msg: Some(HubMsg::Desired(pb::DesiredState {
            version,
            full,
            json: json.to_owned(),
        })),
    }
}

/// A twin-aware stream's desired versions, and the last one it was sent.
struct DesiredLink {
    feed: DesiredFeed,
    sent: u64,
}

impl DesiredLink {
    /// What to send for a version handed over: nothing if the device has
    /// it already, the patch if it holds the version before, else the
    /// whole document.
    fn message(&mut self, update: &DesiredUpdate) -> Option<pb::HubMessage> {
        if update.version <= self.sent {
            return None;
        }
        let message = match &update.patch {
            Some(patch) if update.version == self.sent + 1 => {
                desired_message(update.version, false, patch)
            }
            _ => desired_message(update.version, true, &update.full),
        };
        self.sent = update.version;
        Some(message)
    }
}

/// The next desired version handed over (never, without a link).
async fn next_desired(link: &mut Option<DesiredLink>) -> Option<Arc<DesiredUpdate>> {
    match link {
        Some(link) => link.feed.next().await,
        None => std::future::pending().await,
    }
}

/// The session's end of the commands task: commands to write down the
/// stream, and where to say they were written.
struct CommandLink {
    commands: Commands,
    inbox: mpsc::Receiver<Box<DeviceCommand>>,
    device: DeviceId,
    session: u64,
}

/// The hub's side of a device stream.
struct DeviceOutbound {
    tx: Outbound,
    abort: Abort,
    /// Why the stream was told to end: how a fenced one ends.
    why_ended: EndProbe,
}

struct Timeouts {
    /// How long a closing stream waits for its last acks.
    drain: Duration,
    /// How long a device may leave what the hub sends unread.
    send: Duration,
}

/// The stream's writer of everything but acks: commands as the commands
/// task hands them over, desired state, and the closing status. (The
/// response stream takes the acks from the slot itself, woken by the
/// writer's commit: an ack costs no task of its own.) After the reader's
/// [`Finish`], waits for the batches still due (bounded by the drain
/// timeout) and ends the stream; the stream sends the last acks before
/// the status. A device that takes nothing for the send timeout is dropped.
async fn ack_task(
    slot: Arc<AckSlot>,
    mut link: CommandLink,
    out: DeviceOutbound,
    mut desired: Option<DesiredLink>,
    mut finish_rx: oneshot::Receiver<Finish>,
    ended: CancellationToken,
    timeouts: Timeouts,
) {
    let DeviceOutbound {
        tx: outbound,
        abort,
        why_ended,
    } = out;
    let mut abort = Some(abort);
    let mut finish: Option<Finish> = None;
    let mut inbox_open = true;
    // Replaced by a real deadline once the reader has finished.
    let mut deadline = Instant::now() + Duration::from_secs(365 * 24 * 3600);
    // The drain timeout passed with batches of this stream not yet acked.
    let mut undrained = false;
    loop {
        if let Some(f) = &finish
            && (!f.flush || slot.batches_done() >= f.batches_pushed || slot.failed())
        {
            break;
        }
        if slot.failed() {
            // The stream sends the acks already due, then this.
            let status = failure_status(&slot, &why_ended).await;
            if tokio::time::timeout(timeouts.send, outbound.send(Err(status)))
                .await
                .is_err()
            {
                drop_stalled(abort.take(), &ended, timeouts.send);
            }
            ended.cancel();
            return;
        }
        // An ack left untaken for the send timeout: the device reads nothing.
        let stalled_at = match slot.waiting_since() {
            Some(since) => Instant::from_std(since) + timeouts.send,
            None => Instant::now() + timeouts.send,
        };
        tokio::select! {
            biased;
            f = &mut finish_rx, if finish.is_none() => match f {
                Ok(f) => {
                    deadline = Instant::now() + timeouts.drain;
                    finish = Some(f);
                    // The last batches' completions wake this task now.
                    slot.watch();
                }
                Err(_) => break,
            },
            _ = tokio::time::sleep_until(deadline), if finish.is_some() => {
                tracing::warn!("acks not flushed within the drain timeout");
                undrained = true;
                break;
            }
            _ = tokio::time::sleep_until(stalled_at) => {
                // On tokio's clock, as the timer: the slot's std instant
                // is converted, never compared with std's own now (under
                // a paused clock the two part, and this would spin).
                if slot
                    .waiting_since()
                    .is_some_and(|since| Instant::from_std(since) + timeouts.send <= Instant::now())
                {
                    drop_stalled(abort.take(), &ended, timeouts.send);
                    return;
                }
            }
            update = next_desired(&mut desired), if finish.is_none() => match update {
                Some(update) => {
                    let Some(message) = desired.as_mut().and_then(|l| l.message(&update)) else {
                        continue;
                    };
                    match tokio::time::timeout(timeouts.send, outbound.send(Ok(Box::new(message)))).await {
                        Ok(Ok(())) => {}
                        Ok(Err(_)) => break,
                        Err(_) => {
                            drop_stalled(abort.take(), &ended, timeouts.send);
                            return;
                        }
                    }
                }
                None => desired = None,
            },
            command = link.inbox.recv(), if inbox_open && finish.is_none() => match command {
                // Cancelled or expired while it waited: never sent.
                Some(command) if !command.still_wanted(now_ms()) => {}
                Some(command) => {
                    let id = command.command_id.clone();
                    let message = Ok(Box::new(convert::command_message(*command)));
                    match tokio::time::timeout(timeouts.send, outbound.send(message)).await {
                        Ok(Ok(())) => link.commands.written(&link.device, link.session, id).await,
                        Ok(Err(_)) => break,
                        Err(_) => {
                            drop_stalled(abort.take(), &ended, timeouts.send);
                            return;
                        }
                    }
                }
                // The commands task let go of this stream (a newer one took
                // over, or the hub is stopping).
                None => inbox_open = false,
            },
            // Failures; completions once watched.
            _ = slot.changed() => {}
            _ = outbound.closed() => break,
        }
    }
    // The reader stops at once if it is still running (peer gone, timeout).
    ended.cancel();
    let Some(finish) = finish else { return };
    let status = if slot.failed() {
        Some(failure_status(&slot, &why_ended).await)
    } else if undrained && finish.flush && finish.status.is_none() {
        // OK promises that every due Ack was sent: this stream's were not.
        Some(Status::unavailable(
            "the hub could not ack every batch before closing; resend unacknowledged readings",
        ))
    } else {
        finish.status
    };
    // The stream sends the acks due before this status, or before OK.
    match status {
        Some(status) => {
            // A short grace of its own: the status matters more than the
            // last ack. If the device does not take it, the stream ends
            // anyway.
            let sent =
                tokio::time::timeout(timeouts.drain, outbound.send(Err(status.clone()))).await;
            if sent.is_err()
                && let Some(abort) = abort.take()
            {
                let _ = abort.send(status);
            }
        }
        // OK as the channel closes, after what is queued and due.
        None => slot.say_ok(),
    }
}

/// What a device is told when its session vanished without ending its
/// stream (a panic: a bug).
fn vanished() -> Status {
    Status::internal(
        "the hub's session of this stream failed; reconnect and resend unacknowledged readings",
    )
}

/// The hub's side of one device stream, as tonic sends it: the Acks the
/// writer left in the session's slot (taken here, the moment the writer's
/// completion wakes this stream), and what the session's task queued
/// (Welcome, desired state, commands, the closing status). Queued messages
/// go first, so the Welcome precedes every Ack; the closing status or OK
/// (said explicitly: see [`AckSlot::say_ok`]) waits until the Acks due are
/// out. An abort ends the stream at once with its status and drops the
/// rest (a device that reads nothing cannot pin it).
pub struct DeviceStream {
    queued: super::HubStream,
    slot: Arc<AckSlot>,
    /// How the stream ends, held until the acks due are sent: `Some(None)`
    /// is OK.
    last: Option<Option<Status>>,
    done: bool,
}

impl DeviceStream {
    pub fn new(
        messages: mpsc::Receiver<Result<Box<pb::HubMessage>, Status>>,
        aborted: oneshot::Receiver<Status>,
        slot: Arc<AckSlot>,
    ) -> Self {
        Self {
            queued: super::HubStream::new(messages, aborted),
            slot,
            last: None,
            done: false,
        }
    }
}

impl futures_util::Stream for DeviceStream {
    type Item = Result<pb::HubMessage, Status>;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        use std::task::Poll;
        if self.done {
            return Poll::Ready(None);
        }
        if self.last.is_none() {
            match std::pin::Pin::new(&mut self.queued).poll_next(cx) {
                Poll::Ready(Some(Ok(message))) => return Poll::Ready(Some(Ok(message))),
                Poll::Ready(Some(Err(status))) if self.queued.aborted_now() => {
                    self.done = true;
                    return Poll::Ready(Some(Err(status)));
                }
                Poll::Ready(Some(Err(status))) => self.last = Some(Some(status)),
                Poll::Ready(None) => self.last = Some((!self.slot.said_ok()).then(vanished)),
                Poll::Pending => {}
            }
        }
        match self.slot.next_due(cx.waker()) {
            Some(Due::Ack(ack)) => Poll::Ready(Some(Ok(ack_message(ack)))),
            Some(Due::Reported(ack)) => Poll::Ready(Some(Ok(reported_ack_message(ack)))),
            None => match self.last.take() {
                Some(end) => {
                    self.done = true;
                    Poll::Ready(end.map(Err))
                }
                None => Poll::Pending,
            },
        }
    }
}

/// How long a fenced stream waits to hear why before it guesses.
const FENCE_REASON_WAIT: Duration = Duration::from_secs(1);

/// How a stream whose batch was not written ends. A fenced one waits
/// briefly for its cause to be said here (a takeover's claim follows the
/// writer's fence by a moment), so it is told ABORTED, not UNAUTHENTICATED.
async fn failure_status(slot: &AckSlot, why_ended: &EndProbe) -> Status {
    if slot.fenced() {
        why_ended.settled(FENCE_REASON_WAIT).await;
        end_status(why_ended.fenced_because())
    } else {
        Status::unavailable("storage is unavailable; resend unacknowledged readings")
    }
}

/// Ends a stream whose device takes nothing the hub sends: what is buffered
/// for it is dropped, so a stuck device holds no more than the channel did.
fn drop_stalled(abort: Option<Abort>, ended: &CancellationToken, send_timeout: Duration) {
    let why = format!(
        "the device read nothing the hub sent for {}",
        humantime::format_duration(send_timeout)
    );
    tracing::info!(reason = why, "dropping a stalled stream");
    if let Some(abort) = abort {
        let _ = abort.send(Status::deadline_exceeded(why));
    }
    ended.cancel();
}
