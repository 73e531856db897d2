//! The operator API: queries, devices, stats, commands and live tails. What
//! is shared with other doors is in `crate::operator`; here requests and
//! answers are translated to and from protobuf.

use std::pin::Pin;
use std::sync::Arc;

use futures_util::Stream;
use telemetry_proto::v1::{self as pb, operator_server::Operator};
use tonic::{Request, Response, Status};

use super::{AnswerStream, convert, spawn_stream};
use crate::auth::Operator as OperatorIdentity;
use crate::operator::{LiveEvent, Operations, ReadingsRequest, TwinWatchEvent};
use crate::query::QueryChunk;
use crate::store::commands::CommandFilter;

pub struct OperatorService {
    pub ops: Arc<Operations>,
    /// Where the bodies of streamed answers run (shutdown waits for them).
    pub tracker: tokio_util::task::TaskTracker,
}

type ChunkStream = Pin<Box<dyn Stream<Item = Result<pb::QueryReadingsChunk, Status>> + Send>>;
type CommandStream = AnswerStream<pb::CommandInfo>;
type LiveStream = AnswerStream<pb::WatchReadingsEvent>;
type TwinStream = AnswerStream<pb::TwinEvent>;

#[tonic::async_trait]
impl Operator for OperatorService {
    type QueryReadingsStream = ChunkStream;
    type WatchCommandStream = CommandStream;
    type WatchReadingsStream = LiveStream;
    type WatchTwinStream = TwinStream;
    type WatchAlarmsStream = AnswerStream<pb::AlarmEvent>;

    async fn create_job(
        &self,
        request: Request<pb::CreateJobRequest>,
    ) -> Result<Response<pb::Job>, Status> {
        let by = caller(&request);
        let job = self
            .ops
            .create_job_json(&request.into_inner().job_json)
            .await
            .map_err(convert::op_status)?;
        tracing::info!(job = job.id, devices = job.total, by, "job created");
        Ok(Response::new(convert::job(&job)))
    }

    async fn list_jobs(
        &self,
        request: Request<pb::ListJobsRequest>,
    ) -> Result<Response<pb::ListJobsResponse>, Status> {
        let req = request.into_inner();
        let limit = if req.limit == 0 { 100 } else { req.limit };
        let jobs = self
            .ops
            .jobs(req.active, limit)
            .await
            .map_err(convert::op_status)?;
        Ok(Response::new(pb::ListJobsResponse {
            jobs: jobs.iter().map(convert::job).collect(),
        }))
    }

    async fn get_job(
        &self,
        request: Request<pb::GetJobRequest>,
    ) -> Result<Response<pb::Job>, Status> {
        let job = self
            .ops
            .job(request.into_inner().id)
            .await
            .map_err(convert::op_status)?;
        Ok(Response::new(convert::job(&job)))
    }

    async fn list_job_devices(
        &self,
        request: Request<pb::ListJobDevicesRequest>,
    ) -> Result<Response<pb::ListJobDevicesResponse>, Status> {
        let req = request.into_inner();
        let state = match req.state.as_str() {
            "" => None,
            s => Some(crate::jobs::DeviceState::parse(s).ok_or_else(|| {
                Status::invalid_argument(format!(
                    "unknown state {s:?} (pending, in_progress, succeeded, failed, timed_out, cancelled)"
                ))
            })?),
        };
        let limit = if req.limit == 0 { 100 } else { req.limit };
        let devices = self
            .ops
            .job_devices(req.id, state, req.after.unwrap_or(-1), limit)
            .await
            .map_err(convert::op_status)?;
        Ok(Response::new(pb::ListJobDevicesResponse {
            devices: devices.iter().map(convert::job_device).collect(),
        }))
    }

    async fn pause_job(
        &self,
        request: Request<pb::JobActionRequest>,
    ) -> Result<Response<pb::Job>, Status> {
        let by = caller(&request);
        let id = request.into_inner().id;
        let job = self.ops.pause_job(id).await.map_err(convert::op_status)?;
        tracing::info!(job = id, by, "job paused");
        Ok(Response::new(convert::job(&job)))
    }

    async fn resume_job(
        &self,
        request: Request<pb::JobActionRequest>,
    ) -> Result<Response<pb::Job>, Status> {
        let by = caller(&request);
        let id = request.into_inner().id;
        let job = self.ops.resume_job(id).await.map_err(convert::op_status)?;
        tracing::info!(job = id, by, "job resumed");
        Ok(Response::new(convert::job(&job)))
    }

    async fn cancel_job(
        &self,
        request: Request<pb::JobActionRequest>,
    ) -> Result<Response<pb::Job>, Status> {
        let by = caller(&request);
        let id = request.into_inner().id;
        let job = self
            .ops
            .cancel_job(id, &by)
            .await
            .map_err(convert::op_status)?;
        tracing::info!(job = id, by, "job cancelled");
        Ok(Response::new(convert::job(&job)))
    }

    async fn put_alarm_rule(
        &self,
        request: Request<pb::PutAlarmRuleRequest>,
    ) -> Result<Response<pb::AlarmRule>, Status> {
        let by = caller(&request);
        let rule = self
            .ops
            .put_alarm_rule_json(&request.into_inner().rule_json)
            .await
            .map_err(convert::op_status)?;
        tracing::info!(rule = %rule.spec.name, version = rule.version, by, "alarm rule written");
        Ok(Response::new(convert::alarm_rule(&rule)))
    }

    async fn delete_alarm_rule(
        &self,
        request: Request<pb::DeleteAlarmRuleRequest>,
    ) -> Result<Response<pb::AlarmRule>, Status> {
        let by = caller(&request);
        let rule = self
            .ops
            .delete_alarm_rule(&request.into_inner().name)
            .await
            .map_err(convert::op_status)?;
        tracing::info!(rule = %rule.spec.name, by, "alarm rule deleted");
        Ok(Response::new(convert::alarm_rule(&rule)))
    }

    async fn list_alarm_rules(
        &self,
        _request: Request<pb::ListAlarmRulesRequest>,
    ) -> Result<Response<pb::ListAlarmRulesResponse>, Status> {
        let rules = self.ops.alarm_rules().await.map_err(convert::op_status)?;
        Ok(Response::new(pb::ListAlarmRulesResponse {
            rules: rules.iter().map(convert::alarm_rule).collect(),
        }))
    }

    async fn list_alarms(
        &self,
        request: Request<pb::ListAlarmsRequest>,
    ) -> Result<Response<pb::ListAlarmsResponse>, Status> {
        use crate::alarms::{AlarmState, Severity};
        let req = request.into_inner();
        let mut states = Vec::new();
        for s in &req.states {
            match s.as_str() {
                "open" => states.extend([AlarmState::Active, AlarmState::Acknowledged]),
                s => states.push(AlarmState::parse(s).ok_or_else(|| {
                    Status::invalid_argument(format!(
                        "unknown state {s:?} (active, acknowledged, cleared, open)"
                    ))
                })?),
            }
        }
        let severity = match req.severity.as_str() {
            "" => None,
            s => Some(Severity::parse(s).ok_or_else(|| {
                Status::invalid_argument(format!(
                    "unknown severity {s:?} (critical, major, minor, warning)"
                ))
            })?),
        };
        let alarms = self
            .ops
            .alarms(crate::store::alarms::AlarmFilter {
                states,
                device: (!req.device_id.is_empty()).then_some(req.device_id),
                rule: (!req.rule.is_empty()).then_some(req.rule),
                severity,
                before: req.before,
                limit: req.limit,
            })
            .await
            .map_err(convert::op_status)?;
        Ok(Response::new(pb::ListAlarmsResponse {
            alarms: alarms.iter().map(convert::alarm).collect(),
        }))
    }

    async fn ack_alarm(
        &self,
        request: Request<pb::AlarmActionRequest>,
    ) -> Result<Response<pb::Alarm>, Status> {
        let by = caller(&request);
        let req = request.into_inner();
        let alarm = self
            .ops
            .ack_alarm(req.id, &by, &req.note)
            .await
            .map_err(convert::op_status)?;
        Ok(Response::new(convert::alarm(&alarm)))
    }

    async fn clear_alarm(
        &self,
        request: Request<pb::AlarmActionRequest>,
    ) -> Result<Response<pb::Alarm>, Status> {
        let by = caller(&request);
        let req = request.into_inner();
        let alarm = self
            .ops
            .clear_alarm(req.id, &by, &req.note)
            .await
            .map_err(convert::op_status)?;
        Ok(Response::new(convert::alarm(&alarm)))
    }

    async fn watch_alarms(
        &self,
        request: Request<pb::WatchAlarmsRequest>,
    ) -> Result<Response<Self::WatchAlarmsStream>, Status> {
        use crate::operator::alarms::AlarmWatchEvent;
        let req = request.into_inner();
        let device = (!req.device_id.is_empty()).then_some(req.device_id);
        let slot = self.ops.watch_slot().map_err(convert::op_status)?;
        let mut watch = self.ops.watch_alarms(&slot, device.as_deref());
        let stream = spawn_stream(&self.tracker, 16, move |mut tx| async move {
            let _slot = slot;
            let mut skipped = 0u64;
            loop {
                let event = tokio::select! {
                    event = watch.next() => event,
                    _ = tx.closed() => return,
                };
                let e = match event {
                    Some(AlarmWatchEvent::Event(e)) => e,
                    Some(AlarmWatchEvent::Missed(n)) => {
                        skipped += n;
                        continue;
                    }
                    None => return,
                };
                let event = pb::AlarmEvent {
                    id: e.id,
                    kind: e.kind.as_str().to_owned(),
                    at_ms: e.at_ms,
                    alarm: Some(convert::alarm(&e.alarm)),
                    skipped: std::mem::take(&mut skipped),
                };
                if !tx.send(Ok(event)).await {
                    return;
                }
            }
        });
        Ok(Response::new(stream))
    }

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
        let mut run = self.ops.run_query(q).map_err(convert::op_status)?;
        let chunks = spawn_stream(&self.tracker, 4, move |mut out| async move {
            let forward = async {
                while let Some(chunk) = run.chunks.recv().await {
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
                    if !out.send(chunk).await {
                        return;
                    }
                }
                // The channel closed: a query that ended by a panic (not
                // normally) must not pass a cut-short answer off as whole.
                if !run.ended_whole().await {
                    out.send(Err(Status::internal(
                        "the hub failed while answering; the answer is incomplete",
                    )))
                    .await;
                }
            };
            forward.await;
        });
        Ok(Response::new(Box::pin(chunks)))
    }

    async fn list_devices(
        &self,
        request: Request<pb::ListDevicesRequest>,
    ) -> Result<Response<pb::ListDevicesResponse>, Status> {
        let req = request.into_inner();
        let filter = crate::operator::parse_filter(&req.r#where)
            .map_err(|e| Status::invalid_argument(format!("where: {e}")))?;
        let page = self
            .ops
            .find_devices(&req.after, req.limit, &filter)
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

    async fn get_twin(
        &self,
        request: Request<pb::GetTwinRequest>,
    ) -> Result<Response<pb::Twin>, Status> {
        let view = self
            .ops
            .get_twin(&request.into_inner().device_id)
            .await
            .map_err(convert::op_status)?;
        Ok(Response::new(convert::twin(&view)))
    }

    async fn update_desired(
        &self,
        request: Request<pb::UpdateDesiredRequest>,
    ) -> Result<Response<pb::Twin>, Status> {
        let by = caller(&request);
        let req = request.into_inner();
        let view = self
            .ops
            .update_desired(&req.device_id, &req.patch_json, req.if_version)
            .await
            .map_err(convert::op_status)?;
        tracing::info!(device_id = %crate::domain::shown(&req.device_id), version = view.twin.desired_version, by, "desired state changed");
        Ok(Response::new(convert::twin(&view)))
    }

    async fn update_tags(
        &self,
        request: Request<pb::UpdateTagsRequest>,
    ) -> Result<Response<pb::Twin>, Status> {
        let by = caller(&request);
        let req = request.into_inner();
        let view = self
            .ops
            .update_tags(&req.device_id, req.set.into_iter().collect(), req.remove)
            .await
            .map_err(convert::op_status)?;
        tracing::info!(device_id = %crate::domain::shown(&req.device_id), by, "tags changed");
        Ok(Response::new(convert::twin(&view)))
    }

    async fn watch_twin(
        &self,
        request: Request<pb::WatchTwinRequest>,
    ) -> Result<Response<Self::WatchTwinStream>, Status> {
        let req = request.into_inner();
        let device = (!req.device_id.is_empty()).then_some(req.device_id);
        let slot = self.ops.watch_slot().map_err(convert::op_status)?;
        let (now, mut watch) = self
            .ops
            .watch_twin(&slot, device.as_deref())
            .await
            .map_err(convert::op_status)?;
        let stream = spawn_stream(&self.tracker, 16, move |mut tx| async move {
            let _slot = slot;
            if let Some(view) = now {
                let first = pb::TwinEvent {
                    part: pb::TwinPart::Unspecified as i32,
                    twin: Some(convert::twin(&view)),
                    skipped: 0,
                };
                if !tx.send(Ok(first)).await {
                    return;
                }
            }
            let mut skipped = 0u64;
            loop {
                let event = tokio::select! {
                    event = watch.next() => event,
                    _ = tx.closed() => return,
                };
                let change = match event {
                    Some(TwinWatchEvent::Change(change)) => change,
                    Some(TwinWatchEvent::Missed(n)) => {
                        skipped += n;
                        continue;
                    }
                    None => return,
                };
                let event = pb::TwinEvent {
                    part: convert::twin_part(change.part) as i32,
                    twin: Some(convert::twin(&change.view)),
                    skipped: std::mem::take(&mut skipped),
                };
                if !tx.send(Ok(event)).await {
                    return;
                }
            }
        });
        Ok(Response::new(stream))
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
        let slot = self.ops.watch_slot().map_err(convert::op_status)?;
        let timeout =
            (req.timeout_ms > 0).then(|| std::time::Duration::from_millis(req.timeout_ms as u64));
        let mut watch = self
            .ops
            .watch_command(&slot, &req.command_id, timeout)
            .await
            .map_err(convert::op_status)?;
        let stream = spawn_stream(&self.tracker, 8, move |mut tx| async move {
            let _slot = slot;
            loop {
                let next = tokio::select! {
                    next = watch.next() => next,
                    _ = tx.closed() => return,
                };
                let info = match next {
                    Ok(Some(rec)) => Ok(convert::command_info(rec, Vec::new())),
                    Ok(None) => return,
                    Err(e) => Err(convert::op_status(e)),
                };
                let failed = info.is_err();
                if !tx.send(info).await || failed {
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
        let token = self
            .ops
            .add_device(&req.device_id, req.labels.into_iter().collect())
            .await
            .map_err(convert::op_status)?;
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
        let token = self
            .ops
            .rotate_device_token(&req.device_id)
            .await
            .map_err(convert::op_status)?;
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
        let was_online = self
            .ops
            .remove_device(&req.device_id)
            .await
            .map_err(convert::op_status)?;
        tracing::info!(by, device_id = ?req.device_id, was_online, "device removed");
        Ok(Response::new(pb::RemoveDeviceResponse { was_online }))
    }

    async fn pin_device_certificate(
        &self,
        request: Request<pb::PinDeviceCertificateRequest>,
    ) -> Result<Response<pb::PinDeviceCertificateResponse>, Status> {
        let by = caller(&request);
        let req = request.into_inner();
        // The protocol's empty fingerprint means unpin.
        let sha256 = (!req.sha256.is_empty()).then_some(req.sha256.as_str());
        self.ops
            .pin_device_certificate(&req.device_id, sha256)
            .await
            .map_err(convert::op_status)?;
        tracing::info!(by, device_id = ?req.device_id, sha256 = req.sha256, "device certificate pinned");
        Ok(Response::new(pb::PinDeviceCertificateResponse {}))
    }

    async fn revoke_certificate(
        &self,
        request: Request<pb::RevokeCertificateRequest>,
    ) -> Result<Response<pb::RevokeCertificateResponse>, Status> {
        let by = caller(&request);
        let req = request.into_inner();
        let (newly_revoked, streams_ended) = self
            .ops
            .revoke_certificate(&req.sha256)
            .await
            .map_err(convert::op_status)?;
        tracing::info!(
            by,
            sha256 = req.sha256,
            newly_revoked,
            streams_ended,
            "certificate revoked"
        );
        Ok(Response::new(pb::RevokeCertificateResponse {
            newly_revoked,
            streams_ended,
        }))
    }

    async fn backup(
        &self,
        request: Request<pb::BackupRequest>,
    ) -> Result<Response<pb::BackupResponse>, Status> {
        let by = caller(&request);
        let to = request.into_inner().to;
        let report = self.ops.backup(&to).await.map_err(convert::op_status)?;
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
        let slot = self.ops.watch_slot().map_err(convert::op_status)?;
        let mut watch = self.ops.watch_readings(&slot);
        let stream = spawn_stream(&self.tracker, 16, move |mut tx| async move {
            let _slot = slot;
            // What was missed since the last event, told with the next one.
            let (mut skipped, mut skipped_commits) = (0u64, 0u64);
            loop {
                let event = tokio::select! {
                    event = watch.next() => event,
                    _ = tx.closed() => return,
                };
                let batch = match event {
                    Some(LiveEvent::Batch(batch)) => batch,
                    Some(LiveEvent::Missed { readings, commits }) => {
                        match readings {
                            Some(n) => skipped += n,
                            None => skipped_commits += commits,
                        }
                        continue;
                    }
                    None => return,
                };
                let readings = convert::live_readings(&batch, device.as_deref(), sensor.as_deref());
                if readings.is_empty() && skipped == 0 && skipped_commits == 0 {
                    continue;
                }
                let event = pb::WatchReadingsEvent {
                    readings,
                    skipped: std::mem::take(&mut skipped),
                    skipped_commits: std::mem::take(&mut skipped_commits),
                };
                // A slow client makes this wait; meanwhile the broadcast
                // moves on without us, and the watch counts what we missed.
                if !tx.send(Ok(event)).await {
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
