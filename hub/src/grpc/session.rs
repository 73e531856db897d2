//! One device stream: a reader loop (this task) and an ack writer task.
//!
//! ```text
//! inbound ──reader──▶ IngestQueue ──writer commits──▶ AckSlot ──ack task──▶ outbound
//! ```
//! The reader validates readings and pushes them into the bounded ingest
//! queue (waiting when it is full). The ack task sends an Ack whenever the
//! writer has committed something of this stream, through a bounded outbound
//! channel. When the reader ends (half-close, takeover, shutdown, bad input,
//! vanished peer) it hands the ack task a [`Finish`]: flush the acks that are
//! due, within `drain_timeout`, then end the stream with its status. The
//! session counts as live until both tasks have ended.

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
use crate::commands::{Commands, DeviceCommand};
use crate::domain::{CheckedReading, DeviceHello, DeviceId, DeviceKey, now_ms};
use crate::ingest::{AckSlot, IngestBatch, IngestQueue, PendingAck};
use crate::metrics::HubMetrics;
use crate::registry::SessionRegistry;

pub type Outbound = mpsc::Sender<Result<pb::HubMessage, Status>>;

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
    pub max_clock_skew: Duration,
}

/// How the reader ended, told to the ack task.
struct Finish {
    batches_pushed: u64,
    /// Send the acks still due before ending (not when the peer is gone).
    flush: bool,
    /// None ends the stream with OK.
    status: Option<Status>,
}

/// Runs one device stream to its end.
pub async fn run(
    ctx: Arc<SessionContext>,
    mut inbound: Streaming<pb::DeviceMessage>,
    outbound: Outbound,
) {
    let _live = ctx.metrics.session_started();
    let hello = match wait_for_hello(&ctx, &mut inbound).await {
        Ok(Some(hello)) => hello,
        Ok(None) => return,
        Err(status) => {
            tracing::info!(code = ?status.code(), reason = status.message(), "stream refused before Hello");
            let _ = outbound.send(Err(status)).await;
            return;
        }
    };
    let span = tracing::info_span!("session", device_id = %hello.device_id);
    run_registered(ctx, inbound, outbound, hello)
        .instrument(span)
        .await;
}

async fn run_registered(
    ctx: Arc<SessionContext>,
    mut inbound: Streaming<pb::DeviceMessage>,
    outbound: Outbound,
    hello: DeviceHello,
) {
    let device_id = hello.device_id.clone();
    let firmware = hello.firmware.clone();
    let registered = match ctx.ingest.register(hello).await {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(error = %e, "registration failed");
            let _ = outbound.send(Err(Status::unavailable(e.to_string()))).await;
            return;
        }
    };
    let claim = ctx.registry.claim(&device_id, now_ms(), &firmware);
    let welcome = pb::HubMessage {
        msg: Some(HubMsg::Welcome(pb::Welcome {
            acked_seq: registered.acked_seq,
            max_batch: ctx.max_batch,
        })),
    };
    if outbound.send(Ok(welcome)).await.is_err() {
        return;
    }
    tracing::info!(acked_seq = registered.acked_seq, "device connected");
    let link = CommandLink {
        commands: ctx.commands.clone(),
        inbox: ctx.commands.attach(&device_id, claim.id()).await,
        device: device_id.clone(),
        session: claim.id(),
    };

    let slot = AckSlot::new();
    let ended = CancellationToken::new();
    let (finish_tx, finish_rx) = oneshot::channel();
    let acker = ctx.tracker.spawn(
        ack_task(
            Arc::clone(&slot),
            link,
            outbound,
            finish_rx,
            ended.clone(),
            ctx.drain_timeout,
        )
        .in_current_span(),
    );
    let mut reader = Reader {
        ctx: &ctx,
        device_id: &device_id,
        device: registered.device,
        slot: &slot,
        ended: &ended,
        rejects: RejectLog::default(),
        batches_pushed: 0,
    };
    let finish = reader.read(&mut inbound, &claim.superseded).await;
    let reason = finish
        .status
        .as_ref()
        .map_or("closed by device".to_owned(), |s| {
            format!("{:?}: {}", s.code(), s.message())
        });
    // The ack task may be gone already (peer vanished); that is fine.
    let _ = finish_tx.send(finish);
    let _ = acker.await;
    ctx.commands.detach(&device_id, claim.id()).await;
    drop(claim);
    tracing::info!(reason, "device disconnected");
}

async fn wait_for_hello(
    ctx: &SessionContext,
    inbound: &mut Streaming<pb::DeviceMessage>,
) -> Result<Option<DeviceHello>, Status> {
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
    device: DeviceKey,
    slot: &'a Arc<AckSlot>,
    ended: &'a CancellationToken,
    rejects: RejectLog,
    batches_pushed: u64,
}

impl Reader<'_> {
    async fn read(
        &mut self,
        inbound: &mut Streaming<pb::DeviceMessage>,
        superseded: &CancellationToken,
    ) -> Finish {
        loop {
            let next = tokio::select! {
                biased;
                _ = self.ctx.shutdown.cancelled() => {
                    return self.finish(true, Some(Status::unavailable("the hub is shutting down")));
                }
                _ = superseded.cancelled() => {
                    return self.finish(true, Some(Status::aborted("superseded by a newer connection")));
                }
                _ = self.ended.cancelled() => return self.finish(false, None),
                next = inbound.message() => next,
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
                    if !self.push(batch).await {
                        return self.finish(false, None);
                    }
                }
                Some(DeviceMsg::Hello(_)) => {
                    let status =
                        Status::failed_precondition("Hello was already received on this stream");
                    return self.finish(true, Some(status));
                }
                Some(DeviceMsg::CommandReply(reply)) => match convert::command_reply(reply) {
                    Ok(reply) => self.ctx.commands.reply(self.device_id, reply).await,
                    Err(why) => tracing::warn!(%why, "command reply ignored"),
                },
                None => tracing::warn!("message without content ignored"),
            }
        }
    }

    /// Checks and queues a batch; false when the session must end.
    async fn push(&mut self, batch: pb::ReadingBatch) -> bool {
        let latest = now_ms().saturating_add(self.ctx.max_clock_skew.as_millis() as i64);
        let mut readings = Vec::with_capacity(batch.readings.len());
        for reading in batch.readings {
            let reading = convert::reading(reading);
            match reading.check(latest) {
                Ok(()) => readings.push(CheckedReading::Valid(reading)),
                Err(reason) => {
                    self.rejects.note(reading.seq, &reading.sensor, reason);
                    readings.push(CheckedReading::Rejected { seq: reading.seq });
                }
            }
        }
        let batch = IngestBatch {
            device: self.device,
            readings,
            ack: Arc::clone(self.slot),
        };
        // A full queue makes this wait: backpressure to the device.
        let pushed = tokio::select! {
            pushed = self.ctx.ingest.push(batch) => pushed.is_ok(),
            _ = self.ended.cancelled() => false,
        };
        if pushed {
            self.batches_pushed += 1;
        }
        pushed
    }

    fn finish(&self, flush: bool, status: Option<Status>) -> Finish {
        Finish {
            batches_pushed: self.batches_pushed,
            flush,
            status,
        }
    }
}

/// Logs rejected readings at most once per interval per session.
#[derive(Default)]
struct RejectLog {
    last: Option<Instant>,
    suppressed: u64,
}

impl RejectLog {
    const INTERVAL: Duration = Duration::from_secs(10);

    fn note(&mut self, seq: u64, sensor: &str, reason: crate::domain::RejectReason) {
        let now = Instant::now();
        if self
            .last
            .is_some_and(|t| now.duration_since(t) < Self::INTERVAL)
        {
            self.suppressed += 1;
            return;
        }
        tracing::warn!(seq, sensor, %reason, suppressed = self.suppressed, "reading rejected");
        self.last = Some(now);
        self.suppressed = 0;
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

/// The session's end of the commands task: commands to write down the
/// stream, and where to say they were written.
struct CommandLink {
    commands: Commands,
    inbox: mpsc::Receiver<DeviceCommand>,
    device: DeviceId,
    session: u64,
}

/// The stream's writer: Acks as the writer commits, commands as the commands
/// task hands them over. After the reader's [`Finish`], flushes the acks that
/// are due (bounded by `drain_timeout`) and ends the stream.
async fn ack_task(
    slot: Arc<AckSlot>,
    mut link: CommandLink,
    outbound: Outbound,
    mut finish_rx: oneshot::Receiver<Finish>,
    ended: CancellationToken,
    drain_timeout: Duration,
) {
    let mut finish: Option<Finish> = None;
    let mut inbox_open = true;
    // Replaced by a real deadline once the reader has finished.
    let mut deadline = Instant::now() + Duration::from_secs(365 * 24 * 3600);
    loop {
        if let Some(f) = &finish
            && (!f.flush || slot.batches_done() >= f.batches_pushed || slot.failed())
        {
            break;
        }
        let news = slot.has_news();
        tokio::select! {
            biased;
            f = &mut finish_rx, if finish.is_none() => match f {
                Ok(f) => {
                    deadline = Instant::now() + drain_timeout;
                    finish = Some(f);
                }
                Err(_) => break,
            },
            _ = tokio::time::sleep_until(deadline), if finish.is_some() => {
                tracing::warn!("acks not flushed within the drain timeout");
                break;
            }
            permit = outbound.reserve(), if news => match permit {
                Ok(permit) => {
                    if slot.failed() {
                        permit.send(Err(Status::unavailable(
                            "storage is unavailable; resend unacknowledged readings",
                        )));
                        ended.cancel();
                        return;
                    }
                    if let Some(ack) = slot.take() {
                        permit.send(Ok(ack_message(ack)));
                    }
                }
                Err(_) => break,
            },
            command = link.inbox.recv(), if inbox_open && finish.is_none() => match command {
                Some(command) => {
                    let id = command.command_id.clone();
                    if outbound.send(Ok(convert::command_message(command))).await.is_err() {
                        break;
                    }
                    link.commands.written(&link.device, link.session, id).await;
                }
                // The commands task let go of this stream (a newer one took
                // over, or the hub is stopping).
                None => inbox_open = false,
            },
            _ = slot.changed(), if !news => {}
            _ = outbound.closed(), if !news => break,
        }
    }
    // The reader stops at once if it is still running (peer gone, timeout).
    ended.cancel();
    let Some(finish) = finish else { return };
    if finish.flush
        && !slot.failed()
        && let Some(ack) = slot.take()
    {
        let _ = tokio::time::timeout_at(deadline, outbound.send(Ok(ack_message(ack)))).await;
    }
    let status = if slot.failed() {
        Some(Status::unavailable(
            "storage is unavailable; resend unacknowledged readings",
        ))
    } else {
        finish.status
    };
    if let Some(status) = status {
        // A short grace of its own: the status matters more than the last ack.
        let _ = tokio::time::timeout(drain_timeout, outbound.send(Err(status))).await;
    }
}
