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
    type ConnectStream = HubStream;

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
        // The session owns the stream from here; the tracker lets shutdown
        // wait for it.
        self.ctx.tracker.spawn(session::run(
            Arc::clone(&self.ctx),
            inbound,
            outbound,
            abort,
            peer,
        ));
        Ok(Response::new(HubStream::new(rx, aborted)))
    }
}

/// The hub's messages to one device: what the session queued, unless the
/// session aborts the stream, which ends it at once with that status and
/// drops what is still queued (a device that reads nothing cannot pin it).
pub struct HubStream {
    /// None once aborted. Boxed messages: a channel allocates 32 slots up
    /// front, and every device holds one for the life of its stream.
    messages: Option<ReceiverStream<Result<Box<pb::HubMessage>, Status>>>,
    aborted: Option<oneshot::Receiver<Status>>,
}

impl HubStream {
    fn new(
        messages: mpsc::Receiver<Result<Box<pb::HubMessage>, Status>>,
        aborted: oneshot::Receiver<Status>,
    ) -> Self {
        Self {
            messages: Some(ReceiverStream::new(messages)),
            aborted: Some(aborted),
        }
    }
}

impl Stream for HubStream {
    type Item = Result<pb::HubMessage, Status>;

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
        match self.messages.as_mut() {
            Some(messages) => Pin::new(messages)
                .poll_next(cx)
                .map(|m| m.map(|m| m.map(|boxed| *boxed))),
            None => Poll::Ready(None),
        }
    }
}

/// Runs the body of a server-streaming call on the tracker. If it panics,
/// the client gets INTERNAL rather than an OK that would pass a truncated
/// answer off as complete.
pub(crate) fn spawn_stream<T, F, Fut>(
    tracker: &TaskTracker,
    capacity: usize,
    body: F,
) -> ReceiverStream<Result<T, Status>>
where
    T: Send + 'static,
    F: FnOnce(mpsc::Sender<Result<T, Status>>) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = mpsc::channel(capacity);
    let on_panic = tx.clone();
    let task = tracker.spawn(body(tx));
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
    ReceiverStream::new(rx)
}

#[cfg(test)]
mod tests {
    use tokio_stream::StreamExt;

    use super::*;

    #[tokio::test]
    async fn a_panicking_stream_ends_with_internal_not_ok() {
        let tracker = TaskTracker::new();
        let mut stream = spawn_stream(&tracker, 4, |tx| async move {
            tx.send(Ok(1u32)).await.unwrap();
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
        let mut stream = HubStream::new(rx, aborted);
        for _ in 0..4 {
            tx.send(Ok(Box::default())).await.unwrap();
        }
        abort.send(Status::deadline_exceeded("stalled")).unwrap();
        let end = stream.next().await.unwrap().unwrap_err();
        assert_eq!(end.code(), tonic::Code::DeadlineExceeded);
        assert!(stream.next().await.is_none(), "queued messages are dropped");
    }
}
