//! The operator API: queries, devices, stats, commands and live tails. What
//! is shared with other doors is in `crate::operator`; here requests and
//! answers are translated to and from protobuf.

use std::pin::Pin;
use std::sync::Arc;

use futures_util::Stream;
use telemetry_proto::v1::{self as pb, operator_server::Operator};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use super::session::SessionContext;
use super::{convert, spawn_stream};
use crate::auth::Operator as OperatorIdentity;
use crate::devices;
use crate::domain::{CommandRecord, CommittedBatch};
use crate::operator::{Operations, ReadingsRequest};
use crate::query::{self, QueryChunk};
use crate::store::Store;
use crate::store::commands::{CommandFilter, CommandStore};

pub struct OperatorService {
    pub ops: Arc<Operations>,
    pub store: Store,
    pub command_store: CommandStore,
    /// `storage.backup_dir`: backups go into directories below it.
    pub backup_root: std::path::PathBuf,
    pub backup_running: tokio::sync::Mutex<()>,
    pub ctx: Arc<SessionContext>,
    pub fanout: tokio::sync::broadcast::Sender<Arc<CommittedBatch>>,
}

type ChunkStream = Pin<Box<dyn Stream<Item = Result<pb::QueryReadingsChunk, Status>> + Send>>;
type CommandStream = ReceiverStream<Result<pb::CommandInfo, Status>>;
type LiveStream = ReceiverStream<Result<pb::WatchReadingsEvent, Status>>;

#[tonic::async_trait]
impl Operator for OperatorService {
    type QueryReadingsStream = ChunkStream;
    type WatchCommandStream = CommandStream;
    type WatchReadingsStream = LiveStream;

    async fn query_readings(
        &self,
        request: Request<pb::QueryReadingsRequest>,
    ) -> Result<Response<Self::QueryReadingsStream>, Status> {
        let req = request.into_inner();
        let wanted = convert::aggregates(&req.aggregates)?;
        let q = self
            .ops
            .readings_query(ReadingsRequest {
                device_id: req.device_id,
                sensor: Some(req.sensor),
                since_ms: req.since_ms,
                until_ms: req.until_ms,
                limit: req.limit,
                bucket_ms: req.bucket_ms,
            })
            .await
            .map_err(convert::op_status)?;
        let store = self.store.clone();
        let chunks = spawn_stream(&self.ctx.tracker, 4, move |out| async move {
            let (tx, mut rx) = mpsc::channel(4);
            let forward = async {
                while let Some(chunk) = rx.recv().await {
                    let chunk = match chunk {
                        Ok(QueryChunk::Rows(rows)) => Ok(pb::QueryReadingsChunk {
                            rows: rows.into_iter().map(convert::reading_row).collect(),
                            buckets: Vec::new(),
                        }),
                        Ok(QueryChunk::Buckets(buckets)) => Ok(pb::QueryReadingsChunk {
                            rows: Vec::new(),
                            buckets: buckets
                                .into_iter()
                                .map(|b| convert::bucket_row(b, &wanted))
                                .collect(),
                        }),
                        Err(e) => Err(convert::store_status(e)),
                    };
                    if out.send(chunk).await.is_err() {
                        return;
                    }
                }
            };
            // One task: a panic in either ends the call with INTERNAL.
            tokio::join!(query::run(store, q, tx), forward);
        });
        Ok(Response::new(Box::pin(chunks)))
    }

    async fn list_devices(
        &self,
        request: Request<pb::ListDevicesRequest>,
    ) -> Result<Response<pb::ListDevicesResponse>, Status> {
        let req = request.into_inner();
        let page = self
            .ops
            .list_devices(&req.after, req.limit)
            .await
            .map_err(convert::op_status)?;
        Ok(Response::new(pb::ListDevicesResponse {
            devices: page
                .devices
                .into_iter()
                .map(|(d, since)| convert::device_info(d, since))
                .collect(),
            next_after: page.next_after,
        }))
    }

    async fn get_hub_stats(
        &self,
        _request: Request<pb::GetHubStatsRequest>,
    ) -> Result<Response<pb::HubStats>, Status> {
        let stats = self.ops.stats().await.map_err(convert::op_status)?;
        Ok(Response::new(convert::hub_stats(stats)))
    }

    async fn send_command(
        &self,
        request: Request<pb::SendCommandRequest>,
    ) -> Result<Response<pb::CommandInfo>, Status> {
        let by = caller(&request);
        let req = request.into_inner();
        if req.ttl_ms < 0 {
            return Err(Status::invalid_argument("ttl_ms must not be negative"));
        }
        let ttl = (req.ttl_ms > 0).then(|| std::time::Duration::from_millis(req.ttl_ms as u64));
        let rec = self
            .ops
            .send_command(req.device_id, req.name, req.params_json, ttl)
            .await
            .map_err(convert::op_status)?;
        tracing::info!(by, command_id = rec.command_id, device_id = ?rec.device_id, name = ?rec.name, "command sent");
        Ok(Response::new(convert::command_info(rec, Vec::new())))
    }

    async fn get_command(
        &self,
        request: Request<pb::GetCommandRequest>,
    ) -> Result<Response<pb::CommandInfo>, Status> {
        let (rec, history) = self
            .ops
            .get_command(&request.into_inner().command_id)
            .await
            .map_err(convert::op_status)?;
        Ok(Response::new(convert::command_info(rec, history)))
    }

    async fn list_commands(
        &self,
        request: Request<pb::ListCommandsRequest>,
    ) -> Result<Response<pb::ListCommandsResponse>, Status> {
        let req = request.into_inner();
        let filter = CommandFilter {
            device_id: (!req.device_id.is_empty()).then_some(req.device_id),
            state: convert::state_filter(req.state)?,
            since_ms: req.since_ms,
            until_ms: req.until_ms,
            limit: req.limit,
        };
        let commands = self
            .ops
            .list_commands(filter)
            .await
            .map_err(convert::op_status)?
            .into_iter()
            .map(|rec| convert::command_info(rec, Vec::new()))
            .collect();
        Ok(Response::new(pb::ListCommandsResponse { commands }))
    }

    async fn cancel_command(
        &self,
        request: Request<pb::CancelCommandRequest>,
    ) -> Result<Response<pb::CommandInfo>, Status> {
        let by = caller(&request);
        let rec = self
            .ops
            .cancel_command(&request.into_inner().command_id)
            .await
            .map_err(convert::op_status)?;
        tracing::info!(by, command_id = rec.command_id, "command cancelled");
        Ok(Response::new(convert::command_info(rec, Vec::new())))
    }

    async fn watch_command(
        &self,
        request: Request<pb::WatchCommandRequest>,
    ) -> Result<Response<Self::WatchCommandStream>, Status> {
        let req = request.into_inner();
        let commands = self.ctx.commands.clone();
        // Subscribe before reading the current state, so no change falls in
        // between.
        let mut events = commands.subscribe();
        let (current, _) = commands
            .get(&req.command_id)
            .await
            .map_err(convert::command_status)?;
        let timeout =
            (req.timeout_ms > 0).then(|| std::time::Duration::from_millis(req.timeout_ms as u64));
        let shutdown = self.ctx.shutdown.clone();
        let stream = spawn_stream(&self.ctx.tracker, 8, move |tx| async move {
            let deadline = timeout.map(|t| tokio::time::Instant::now() + t);
            let id = current.command_id.clone();
            let mut last: CommandRecord = current;
            if tx
                .send(Ok(convert::command_info(last.clone(), Vec::new())))
                .await
                .is_err()
            {
                return;
            }
            while !last.state.is_final() {
                let far = tokio::time::Instant::now() + std::time::Duration::from_secs(86_400);
                let next = tokio::select! {
                    event = events.recv() => event,
                    _ = tokio::time::sleep_until(deadline.unwrap_or(far)) => return,
                    _ = shutdown.cancelled() => return,
                    _ = tx.closed() => return,
                };
                let rec = match next {
                    Ok(rec) if rec.command_id == id => rec,
                    Ok(_) => continue,
                    // Missed events: the log has the truth.
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                        match commands.get(&id).await {
                            Ok((rec, _)) if rec != last => rec,
                            Ok(_) => continue,
                            Err(e) => {
                                let _ = tx.send(Err(convert::command_status(e))).await;
                                return;
                            }
                        }
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                };
                last = rec;
                if tx
                    .send(Ok(convert::command_info(last.clone(), Vec::new())))
                    .await
                    .is_err()
                {
                    return;
                }
            }
        });
        Ok(Response::new(stream))
    }

    async fn add_device(
        &self,
        request: Request<pb::AddDeviceRequest>,
    ) -> Result<Response<pb::DeviceCredentials>, Status> {
        let by = caller(&request);
        let req = request.into_inner();
        let token = devices::add(
            &self.ctx.ingest,
            &self.ctx.registry,
            &req.device_id,
            req.labels.into_iter().collect(),
        )
        .await
        .map_err(convert::device_admin_status)?;
        tracing::info!(by, device_id = ?req.device_id, "device added");
        Ok(Response::new(pb::DeviceCredentials {
            device_id: req.device_id,
            token,
        }))
    }

    async fn rotate_device_token(
        &self,
        request: Request<pb::RotateDeviceTokenRequest>,
    ) -> Result<Response<pb::DeviceCredentials>, Status> {
        let by = caller(&request);
        let req = request.into_inner();
        let token = devices::rotate_token(&self.ctx.ingest, &self.ctx.registry, &req.device_id)
            .await
            .map_err(convert::device_admin_status)?;
        tracing::info!(by, device_id = ?req.device_id, "device token rotated");
        Ok(Response::new(pb::DeviceCredentials {
            device_id: req.device_id,
            token,
        }))
    }

    async fn remove_device(
        &self,
        request: Request<pb::RemoveDeviceRequest>,
    ) -> Result<Response<pb::RemoveDeviceResponse>, Status> {
        let by = caller(&request);
        let req = request.into_inner();
        let was_online = devices::remove(&self.ctx.ingest, &self.ctx.registry, &req.device_id)
            .await
            .map_err(convert::device_admin_status)?;
        tracing::info!(by, device_id = ?req.device_id, was_online, "device removed");
        Ok(Response::new(pb::RemoveDeviceResponse { was_online }))
    }

    async fn backup(
        &self,
        request: Request<pb::BackupRequest>,
    ) -> Result<Response<pb::BackupResponse>, Status> {
        let by = caller(&request);
        let to = request.into_inner().to;
        let Ok(_one_at_a_time) = self.backup_running.try_lock() else {
            return Err(Status::failed_precondition("a backup is running already"));
        };
        let report =
            crate::store::backup::backup(&self.store, &self.command_store, &self.backup_root, &to)
                .await
                .map_err(convert::backup_status)?;
        tracing::info!(
            by,
            to,
            readings = report.readings,
            commands = report.commands,
            "backup taken"
        );
        Ok(Response::new(pb::BackupResponse {
            readings_path: report.readings_path.display().to_string(),
            commands_path: report.commands_path.display().to_string(),
            devices: report.devices,
            readings: report.readings,
            commands: report.commands,
        }))
    }

    async fn watch_readings(
        &self,
        request: Request<pb::WatchReadingsRequest>,
    ) -> Result<Response<Self::WatchReadingsStream>, Status> {
        let req = request.into_inner();
        let device = (!req.device_id.is_empty()).then_some(req.device_id);
        let sensor = (!req.sensor.is_empty()).then_some(req.sensor);
        let mut batches = self.fanout.subscribe();
        let shutdown = self.ctx.shutdown.clone();
        let stream = spawn_stream(&self.ctx.tracker, 16, move |tx| async move {
            // Index of the next reading this watcher expects; a gap is what
            // it skipped while too slow.
            let mut expected: Option<u64> = None;
            let mut skipped = 0u64;
            loop {
                let batch = tokio::select! {
                    b = batches.recv() => b,
                    _ = shutdown.cancelled() => return,
                    _ = tx.closed() => return,
                };
                let batch = match batch {
                    Ok(batch) => batch,
                    // The gap shows in the next batch's index.
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                };
                if let Some(expected) = expected {
                    skipped += batch.first_index.saturating_sub(expected);
                }
                expected = Some(batch.first_index + batch.count);
                let readings = convert::live_readings(&batch, device.as_deref(), sensor.as_deref());
                if readings.is_empty() && skipped == 0 {
                    continue;
                }
                let event = pb::WatchReadingsEvent { readings, skipped };
                skipped = 0;
                // A slow client makes this wait; meanwhile the broadcast
                // moves on without us, and we count what we missed.
                if tx.send(Ok(event)).await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(stream))
    }
}

/// Who made an admin call, for the log: the token's name (never its value),
/// or "open" when the Operator API takes no tokens.
fn caller<T>(request: &Request<T>) -> String {
    request
        .extensions()
        .get::<OperatorIdentity>()
        .map_or_else(|| "open".to_owned(), |op| op.name.clone())
}
