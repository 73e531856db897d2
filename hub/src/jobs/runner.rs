//! Drives active jobs: follows the devices in progress (the command's
//! state, or the twin's reported state, against the timeout), checks the
//! abort thresholds, and starts the next devices as the rate and the
//! concurrency allow. One hub does it: on PostgreSQL the holder of the
//! `jobs` lease (on the database's clock; another hub takes over when it
//! expires). Every decision is written through the writer before (a
//! device started) and after (what was sent, results) the IO it stands
//! for, so a restart resumes where the rows say, sending nothing twice.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::{DeviceState, JobState, Pacer, abort_reason, desired_holds, reported_matches};
use crate::domain::{CommandState, now_ms};
use crate::ingest::jobs::JobOp;
use crate::operator::{OpError, Operations};
use crate::store::Store;
use crate::store::commands::CommandFilter;
use crate::store::jobs::{DeviceResult, Job, JobDevice, Sent};

const LEASE: &str = "jobs";
const LEASE_TTL_MS: i64 = 5_000;
const TICK: Duration = Duration::from_millis(100);
/// Devices in progress followed per job per tick.
const FOLLOW_LIMIT: u32 = 1000;

pub struct Runner {
    pub ops: Arc<Operations>,
    pub store: Store,
    pub hub_id: Arc<str>,
}

impl Runner {
    pub async fn run(self, stop: CancellationToken) {
        let mut pacers: HashMap<i64, Pacer> = HashMap::new();
        let mut leading = false;
        let mut renewed: Option<tokio::time::Instant> = None;
        loop {
            if renewed.is_none_or(|t| t.elapsed() >= Duration::from_secs(1)) {
                renewed = Some(tokio::time::Instant::now());
                let held = matches!(
                    self.store
                        .lease(LEASE, &self.hub_id, now_ms(), LEASE_TTL_MS)
                        .await,
                    Ok(true)
                );
                if held != leading {
                    tracing::info!(leading = held, "job runner lease");
                    // A new leader starts its pacing afresh.
                    pacers.clear();
                }
                leading = held;
            }
            if leading {
                match self.store.jobs(true, 100).await {
                    Ok(jobs) => {
                        pacers.retain(|id, _| jobs.iter().any(|j| j.id == *id));
                        for job in jobs {
                            let pacer = pacers.entry(job.id).or_default();
                            if let Err(e) = self.step(&job, pacer).await {
                                tracing::warn!(job = job.id, error = %e, "job step failed");
                            }
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "cannot read the active jobs"),
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(TICK) => {}
                _ = stop.cancelled() => break,
            }
        }
        if leading && let Err(e) = self.store.release(LEASE, &self.hub_id).await {
            tracing::warn!(error = %e, "cannot release the job runner lease");
        }
    }

    /// One round of one job.
    async fn step(&self, job: &Job, pacer: &mut Pacer) -> Result<(), OpError> {
        let now = now_ms();
        let spec = &job.spec;
        let following = self
            .ops
            .job_devices(job.id, Some(DeviceState::InProgress), -1, FOLLOW_LIMIT)
            .await?;
        let mut sent = Vec::new();
        let mut results = Vec::new();
        for d in &following {
            if d.command_id.is_none() && d.desired_version.is_none() {
                // Started, nothing recorded as sent: a crash (or a failed
                // write) between the two. Look before sending.
                match self.adopt_or_send(job, d).await {
                    Ok(s) => sent.push(s),
                    Err(why) => results.push(failed(&d.device, DeviceState::Failed, why)),
                }
                continue;
            }
            let started = d.started_ms.unwrap_or(now);
            if let Some(r) = self.outcome(job, d).await {
                results.push(r);
            } else if now - started >= spec.timeout.as_millis() as i64 {
                results.push(failed(&d.device, DeviceState::TimedOut, "timed out".into()));
            }
        }
        self.record(job.id, sent, results).await?;
        let job = self.ops.job(job.id).await?;
        let c = job.counts;
        if let Some(reason) = abort_reason(spec.abort.as_ref(), &c) {
            tracing::warn!(job = job.id, %reason, "job aborted");
            self.finish(job.id, JobState::Aborted, Some(reason)).await?;
            return Ok(());
        }
        if c.pending == 0 && c.in_progress == 0 {
            let to = if c.bad() == 0 {
                JobState::Succeeded
            } else {
                JobState::Failed
            };
            self.finish(job.id, to, None).await?;
            return Ok(());
        }
        if job.state != JobState::InProgress {
            return Ok(());
        }
        let free = u64::from(spec.concurrency).saturating_sub(c.in_progress);
        let n = pacer.take(now, spec.per_minute(c.succeeded), free.min(c.pending));
        if n == 0 {
            return Ok(());
        }
        let next = self
            .ops
            .job_devices(job.id, Some(DeviceState::Pending), -1, n as u32)
            .await?;
        let devices: Vec<String> = next.iter().map(|d| d.device.clone()).collect();
        // Written before anything is sent: a crash from here on finds
        // them in progress and looks before sending again.
        self.ops
            .job_op(JobOp::Start {
                job: job.id,
                devices: devices.clone(),
            })
            .await?;
        let mut sent = Vec::new();
        let mut results = Vec::new();
        for device in devices {
            match self.send(&job, &device).await {
                Ok(s) => sent.push(s),
                Err(why) => results.push(failed(&device, DeviceState::Failed, why)),
            }
        }
        self.record(job.id, sent, results).await
    }

    async fn record(
        &self,
        job: i64,
        sent: Vec<Sent>,
        results: Vec<DeviceResult>,
    ) -> Result<(), OpError> {
        if !sent.is_empty() {
            self.ops.job_op(JobOp::Sent { job, sent }).await?;
        }
        if !results.is_empty() {
            self.ops.job_op(JobOp::Results { job, results }).await?;
        }
        Ok(())
    }

    async fn finish(&self, job: i64, to: JobState, reason: Option<String>) -> Result<(), OpError> {
        self.ops
            .job_op(JobOp::State {
                job,
                from: vec![JobState::InProgress, JobState::Paused],
                to,
                reason,
            })
            .await?;
        Ok(())
    }

    /// A device's result, if it has one yet.
    async fn outcome(&self, job: &Job, d: &JobDevice) -> Option<DeviceResult> {
        if let Some(id) = &d.command_id {
            let (rec, _) = self.ops.get_command(id).await.ok()?;
            let state = match rec.state {
                CommandState::Succeeded => DeviceState::Succeeded,
                CommandState::Failed
                | CommandState::Rejected
                | CommandState::Expired
                | CommandState::Cancelled => DeviceState::Failed,
                _ => return None,
            };
            let detail = if rec.detail.is_empty() {
                rec.state.as_str().to_owned()
            } else {
                format!("{}: {}", rec.state.as_str(), rec.detail)
            };
            return Some(failed(&d.device, state, detail));
        }
        let patch = job.spec.desired.as_ref()?;
        let twin = self.ops.get_twin(&d.device).await.ok()?;
        reported_matches(patch, &twin.twin.reported).then(|| {
            failed(
                &d.device,
                DeviceState::Succeeded,
                "reported state matches".into(),
            )
        })
    }

    async fn send(&self, job: &Job, device: &str) -> Result<Sent, String> {
        if let Some(cmd) = &job.spec.command {
            let params = cmd
                .params
                .as_ref()
                .map(|p| p.to_string())
                .unwrap_or_default();
            let rec = self
                .ops
                .send_command(device.to_owned(), cmd.name.clone(), params, cmd.ttl)
                .await
                .map_err(|e| e.public_message())?;
            return Ok(Sent {
                device: device.to_owned(),
                command_id: Some(rec.command_id),
                desired_version: None,
            });
        }
        let patch = job.spec.desired.clone().unwrap_or_default();
        let view = self
            .ops
            .update_desired(device, &serde_json::Value::Object(patch).to_string(), None)
            .await
            .map_err(|e| e.public_message())?;
        Ok(Sent {
            device: device.to_owned(),
            command_id: None,
            desired_version: Some(view.twin.desired_version),
        })
    }

    /// A device started whose sending was not recorded: what was sent, if
    /// it was; else sends now.
    async fn adopt_or_send(&self, job: &Job, d: &JobDevice) -> Result<Sent, String> {
        let started = d.started_ms.unwrap_or(0);
        if let Some(cmd) = &job.spec.command {
            let sent = self
                .ops
                .list_commands(CommandFilter {
                    device_id: Some(d.device.clone()),
                    state: None,
                    since_ms: Some(started - 1_000),
                    until_ms: None,
                    limit: 100,
                })
                .await
                .map_err(|e| e.public_message())?;
            if let Some(rec) = sent.into_iter().find(|r| r.name == cmd.name) {
                tracing::info!(job = job.id, device = %d.device, command = %rec.command_id,
                    "job resumed: the command was sent before");
                return Ok(Sent {
                    device: d.device.clone(),
                    command_id: Some(rec.command_id),
                    desired_version: None,
                });
            }
        } else if let Some(patch) = &job.spec.desired {
            let twin = self
                .ops
                .get_twin(&d.device)
                .await
                .map_err(|e| e.public_message())?;
            if desired_holds(patch, &twin.twin.desired) {
                tracing::info!(job = job.id, device = %d.device,
                    "job resumed: the desired change was made before");
                return Ok(Sent {
                    device: d.device.clone(),
                    command_id: None,
                    desired_version: Some(twin.twin.desired_version),
                });
            }
        }
        self.send(job, &d.device).await
    }
}

fn failed(device: &str, state: DeviceState, detail: String) -> DeviceResult {
    DeviceResult {
        device: device.to_owned(),
        state,
        detail,
    }
}
