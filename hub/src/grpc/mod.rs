//! tonic services. The only place that converts protobuf <-> domain
//! ([`convert`]).
//!
//! - [`DeviceGatewayService`]: one [`session`] per device stream.
//! - [`OperatorService`]: queries, devices, stats, commands and live tails
//!   for the CLI and other operator tools.

pub mod convert;
mod operator;
pub mod session;

pub use operator::OperatorService;

use std::sync::Arc;

use telemetry_proto::v1::{self as pb, device_gateway_server::DeviceGateway};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
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
    type ConnectStream = ReceiverStream<Result<pb::HubMessage, Status>>;

    async fn connect(
        &self,
        request: Request<Streaming<pb::DeviceMessage>>,
    ) -> Result<Response<Self::ConnectStream>, Status> {
        let inbound = request.into_inner();
        let (outbound, rx) = mpsc::channel(self.outbound_buffer);
        // The session owns the stream from here; the tracker lets shutdown
        // wait for it.
        self.ctx
            .tracker
            .spawn(session::run(Arc::clone(&self.ctx), inbound, outbound));
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}
