//! tonic services. The only place that converts protobuf <-> domain
//! ([`convert`]).
//!
//! - [`DeviceGatewayService`]: one [`session`] per device stream.
//! - [`OperatorService`]: queries, devices, stats, commands and live tails
//!   for the CLI and other operator tools.

pub mod convert;
mod operator;
mod operator_auth;
pub mod session;

pub use operator::OperatorService;
pub use operator_auth::OperatorAuth;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures_util::Stream;
use telemetry_proto::v1::{self as pb, device_gateway_server::DeviceGateway};
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::task::TaskTracker;
use tonic::{Request, Response, Status, Streaming};

use session::SessionContext;

use crate::ingest::AckSlot;

use crate::operator::STALLED_CLIENT;

pub struct DeviceGatewayService {
    ctx: Arc<SessionContext>,
    outbound_buffer: usize,
}

impl DeviceGatewayService {
    pub fn new(ctx: Arc<SessionContext>, outbound_buffer: usize) -> Self {
        Self {
            ctx,
            outbound_buffer,
        }
    }
}

#[tonic::async_trait]
impl DeviceGateway for DeviceGatewayService {
    type ConnectStream = session::DeviceStream;

    async fn connect(
        &self,
        request: Request<Streaming<pb::DeviceMessage>>,
    ) -> Result<Response<Self::ConnectStream>, Status> {
        let peer = session::Peer {
            ip: request.remote_addr().map(|a| a.ip()),
            certificate: request
                .peer_certs()
                .and_then(|certs| certs.first().map(|c| c.as_ref().to_vec())),
        };
        let inbound = request.into_inner();
        let (outbound, rx) = mpsc::channel(self.outbound_buffer);
        let (abort, aborted) = oneshot::channel();
        let slot = AckSlot::for_stream();
        // The session owns the stream from here; the tracker lets shutdown
        // wait for it.
        self.ctx.tracker.spawn(session::run(
            Arc::clone(&self.ctx),
            inbound,
            session::Outlet {
                tx: outbound,
                abort,
                slot: Arc::clone(&slot),
            },
            peer,
        ));
        Ok(Response::new(session::DeviceStream::new(rx, aborted, slot)))
    }
}

/// The hub's messages to one device that a task queues: what the session
/// queued, unless the session aborts the stream (a device that reads
/// nothing cannot pin it). Boxed messages: a channel allocates 32 slots up
/// front, and every device holds one for the life of its stream.
pub type HubStream = CutStream<Box<pb::HubMessage>, pb::HubMessage>;

/// A server stream: what its task queued, unless the task aborts it, which
/// ends it at once with that status and drops what is still queued. Items
/// are queued as `T` and sent as `U` (`map`).
pub struct CutStream<T, U> {
    /// None once aborted.
    messages: Option<ReceiverStream<Result<T, Status>>>,
    aborted: Option<oneshot::Receiver<Status>>,
    map: fn(T) -> U,
}

impl HubStream {
    fn new(
        messages: mpsc::Receiver<Result<Box<pb::HubMessage>, Status>>,
        aborted: oneshot::Receiver<Status>,
    ) -> Self {
        CutStream::with_map(messages, aborted, |boxed| *boxed)
    }
}

impl<T, U> CutStream<T, U> {
    fn with_map(
        messages: mpsc::Receiver<Result<T, Status>>,
        aborted: oneshot::Receiver<Status>,
        map: fn(T) -> U,
    ) -> Self {
        Self {
            messages: Some(ReceiverStream::new(messages)),
            aborted: Some(aborted),
            map,
        }
    }
}

impl<T, U> CutStream<T, U> {
    /// The stream was aborted (its last item was the abort's status).
    fn aborted_now(&self) -> bool {
        self.messages.is_none()
    }
}

impl<T, U> Stream for CutStream<T, U> {
    type Item = Result<U, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if let Some(aborted) = self.aborted.as_mut() {
            match Pin::new(aborted).poll(cx) {
                Poll::Ready(Ok(status)) => {
                    self.aborted = None;
                    self.messages = None;
                    return Poll::Ready(Some(Err(status)));
                }
                // The session ended without aborting: just the queue now.
                Poll::Ready(Err(_)) => self.aborted = None,
                Poll::Pending => {}
            }
        }
        let map = self.map;
        match self.messages.as_mut() {
            Some(messages) => Pin::new(messages)
                .poll_next(cx)
                .map(|m| m.map(|m| m.map(map))),
            None => Poll::Ready(None),
        }
    }
}

/// The sending end of an operator call's answer: a send waits for the
/// client at most [`STALLED_CLIENT`]; past it the answer ends at once with
/// DEADLINE_EXCEEDED (what is queued is dropped), so a client that reads
/// nothing cannot hold a slot of the hub's budgets of long calls.
pub(crate) struct AnswerSender<T> {
    tx: mpsc::Sender<Result<T, Status>>,
    abort: Option<oneshot::Sender<Status>>,
}

impl<T> AnswerSender<T> {
    /// False when the answer is over: the client went away or stalled.
    pub async fn send(&mut self, item: Result<T, Status>) -> bool {
        match tokio::time::timeout(STALLED_CLIENT, self.tx.send(item)).await {
            Ok(sent) => sent.is_ok(),
            Err(_) => {
                if let Some(abort) = self.abort.take() {
                    let _ = abort.send(Status::deadline_exceeded(format!(
                        "the client read nothing of the answer for {}",
                        humantime::format_duration(STALLED_CLIENT)
                    )));
                }
                false
            }
        }
    }

    /// Resolves when the client has gone away.
    pub async fn closed(&self) {
        self.tx.closed().await
    }
}

/// An operator call's answer stream.
pub(crate) type AnswerStream<T> = CutStream<T, T>;

/// Runs the body of a server-streaming call on the tracker. If it panics,
/// the client gets INTERNAL rather than an OK that would pass a truncated
/// answer off as complete.
pub(crate) fn spawn_stream<T, F, Fut>(
    tracker: &TaskTracker,
    capacity: usize,
    body: F,
) -> AnswerStream<T>
where
    T: Send + 'static,
    F: FnOnce(AnswerSender<T>) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = mpsc::channel(capacity);
    let (abort, aborted) = oneshot::channel();
    let on_panic = tx.clone();
    let task = tracker.spawn(body(AnswerSender {
        tx,
        abort: Some(abort),
    }));
    tracker.spawn(async move {
        if let Err(e) = task.await
            && e.is_panic()
        {
            tracing::error!(error = %e, "a streaming call failed");
            let _ = on_panic
                .send(Err(Status::internal(
                    "the hub failed while answering; the answer is incomplete",
                )))
                .await;
        }
    });
    CutStream::with_map(rx, aborted, |item| item)
}

#[cfg(test)]
mod tests {
    use tokio_stream::StreamExt;

    use super::*;

    #[tokio::test]
    async fn a_panicking_stream_ends_with_internal_not_ok() {
        let tracker = TaskTracker::new();
        let mut stream = spawn_stream(&tracker, 4, |mut tx| async move {
            assert!(tx.send(Ok(1u32)).await);
            panic!("bug in a query");
        });
        assert_eq!(stream.next().await.unwrap().unwrap(), 1);
        let err = stream.next().await.unwrap().unwrap_err();
        assert_eq!(err.code(), tonic::Code::Internal);
        assert!(stream.next().await.is_none());
    }

    #[tokio::test]
    async fn an_aborted_stream_ends_at_once_and_drops_the_queue() {
        let (tx, rx) = mpsc::channel(4);
        let (abort, aborted) = oneshot::channel();
        let slot = AckSlot::for_stream();
        let mut stream = session::DeviceStream::new(rx, aborted, Arc::clone(&slot));
        for _ in 0..4 {
            tx.send(Ok(Box::default())).await.unwrap();
        }
        slot.complete(7, 0, 0);
        abort.send(Status::deadline_exceeded("stalled")).unwrap();
        let end = stream.next().await.unwrap().unwrap_err();
        assert_eq!(end.code(), tonic::Code::DeadlineExceeded);
        assert!(
            stream.next().await.is_none(),
            "queued messages and acks are dropped"
        );
    }

    /// OK is said, not implied: a stream whose session vanished (a panic
    /// drops its sender) ends INTERNAL after the acks due; one whose
    /// session said OK ends OK after them.
    #[tokio::test]
    async fn a_stream_whose_session_vanishes_ends_internal_not_ok() {
        for said_ok in [true, false] {
            let (tx, rx) = mpsc::channel(4);
            let (_abort, aborted) = oneshot::channel();
            let slot = AckSlot::for_stream();
            let mut stream = session::DeviceStream::new(rx, aborted, Arc::clone(&slot));
            tx.send(Ok(Box::default())).await.unwrap();
            slot.complete(7, 0, 0);
            if said_ok {
                slot.say_ok();
            }
            drop(tx);
            assert!(stream.next().await.unwrap().is_ok(), "the queued message");
            let ack = stream.next().await.unwrap().unwrap();
            assert!(
                matches!(ack.msg, Some(pb::hub_message::Msg::Ack(ref a)) if a.acked_seq == 7),
                "the ack due, before the end: {ack:?}"
            );
            match stream.next().await {
                None if said_ok => {}
                Some(Err(status)) if !said_ok => {
                    assert_eq!(status.code(), tonic::Code::Internal, "{status:?}");
                }
                other => panic!("said OK: {said_ok}; ended {other:?}"),
            }
            assert!(stream.next().await.is_none());
        }
    }
}
