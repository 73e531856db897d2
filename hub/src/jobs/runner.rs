//! Drives active jobs: follows the devices in progress (the command's
//! state, or the twin's reported state, against the timeout), checks the
//! abort thresholds, and starts the next devices as the rate and the
//! concurrency allow. One hub does it: on PostgreSQL the holder of the
//! `jobs` lease (on the database's clock; another hub takes over when it
//! expires), and a round stops before the lease could have run out.
//!
//! A device is claimed with what it will be sent (a command id, or the
//! desired version the change makes) before anything is sent, and sending
//! is idempotent (module docs of [`super`]): whatever a crash or a lease
//! handover interrupts, the next round sends what is missing, once.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::{DeviceState, JobState, Pacer, abort_reason, reported_matches};
use crate::domain::{CommandState, now_ms};
use crate::ingest::jobs::{JobOp, JobOutcome};
use crate::operator::{ErrorCode, OpError, Operations};
use crate::store::Store;
use crate::store::jobs::{DeviceResult, Job, JobDevice, Start};

const LEASE: &str = "jobs";
const LEASE_TTL: Duration = Duration::from_secs(5);
/// A round stops this long before the lease it began under runs out.
const LEASE_MARGIN: Duration = Duration::from_millis(1500);
const TICK: Duration = Duration::from_millis(100);
/// Active jobs driven per round, oldest first.
const JOBS_PER_ROUND: u32 = 1000;

pub struct Runner {
    pub ops: Arc<Operations>,
    pub store: Store,
    pub hub_id: Arc<str>,
}

impl Runner {
    pub async fn run(self, stop: CancellationToken) {
        let mut pacers: HashMap<i64, Pacer> = HashMap::new();
        let mut leading = false;
        let mut renewed = Instant::now();
        let mut first = true;
        let mut led_since = i64::MIN;
        let mut lost_at: Option<Instant> = None;
        loop {
            if first || renewed.elapsed() >= Duration::from_secs(1) {
                first = false;
                renewed = Instant::now();
                let ttl = LEASE_TTL.as_millis() as i64;
                let held = matches!(
                    self.store.lease(LEASE, &self.hub_id, now_ms(), ttl).await,
                    Ok(true)
                );
                if held != leading {
                    tracing::info!(leading = held, "job runner lease");
                    // A new leader starts its pacing afresh, and counts
                    // devices' timeouts from now at the earliest, unless
                    // it only missed a renewal or two (a database blip):
                    // then nobody else drove the jobs meanwhile.
                    pacers.clear();
                    if held && lost_at.is_none_or(|t| t.elapsed() >= LEASE_TTL) {
                        led_since = now_ms();
                    }
                    lost_at = (!held).then(Instant::now);
                }
                leading = held;
            }
            if leading {
                let deadline = renewed + LEASE_TTL - LEASE_MARGIN;
                match self.store.active_jobs(JOBS_PER_ROUND).await {
                    Ok(jobs) => {
                        pacers.retain(|id, _| jobs.iter().any(|j| j.id == *id));
                        for job in jobs {
                            if Instant::now() >= deadline {
                                break;
                            }
                            let pacer = pacers.entry(job.id).or_default();
                            if let Err(e) = self.step(&job, pacer, deadline, led_since).await {
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
    /// `led_since`: when this hub took the lease (hub clock, ms).
    async fn step(
        &self,
        job: &Job,
        pacer: &mut Pacer,
        deadline: Instant,
        led_since: i64,
    ) -> Result<(), OpError> {
        let spec = &job.spec;
        let timeout = spec.timeout.as_millis() as i64;
        // Concurrency is at most 1000 (JobSpec::check): one page.
        let following = self
            .store
            .job_devices(job.id, Some(DeviceState::InProgress), -1, 1000)
            .await?;
        let mut results = Vec::new();
        let mut sent = Vec::new();
        for d in &following {
            if Instant::now() >= deadline {
                break;
            }
            // Time while no hub drove the job does not count.
            let since = d.started_ms.unwrap_or(i64::MAX).max(led_since);
            match self.follow(job, d).await {
                Followed::Done(r) => results.push(r),
                Followed::Sent => sent.push(d.device.clone()),
                Followed::Waiting if now_ms() - since >= timeout => {
                    results.push(result(&d.device, DeviceState::TimedOut, "timed out".into()));
                }
                Followed::Waiting => {}
            }
        }
        self.record(job.id, results).await?;
        if !sent.is_empty() {
            self.ops
                .job_op(JobOp::Sent {
                    job: job.id,
                    devices: sent,
                })
                .await?;
        }
        let job = self.ops.job(job.id).await?;
        let c = job.counts;
        if let Some(reason) = abort_reason(spec.abort.as_ref(), &c) {
            tracing::warn!(job = job.id, %reason, "job aborted");
            return self.finish(job.id, JobState::Aborted, Some(reason)).await;
        }
        if c.pending == 0 && c.in_progress == 0 {
            let to = if c.bad() == 0 {
                JobState::Succeeded
            } else {
                JobState::Failed
            };
            return self.finish(job.id, to, None).await;
        }
        if job.state != JobState::InProgress || Instant::now() >= deadline {
            return Ok(());
        }
        let free = u64::from(spec.concurrency).saturating_sub(c.in_progress);
        let n = pacer.take(now_ms(), spec.per_minute(c.succeeded), free.min(c.pending));
        if n == 0 {
            return Ok(());
        }
        let next = self
            .store
            .job_devices(job.id, Some(DeviceState::Pending), -1, n as u32)
            .await?;
        let mut starts = Vec::with_capacity(next.len());
        let mut results = Vec::new();
        for d in &next {
            match self.plan_start(&job, &d.device).await {
                Ok(s) => starts.push(s),
                Err(why) => results.push(result(&d.device, DeviceState::Failed, why)),
            }
        }
        self.record(job.id, results).await?;
        // Claimed before anything is sent: a crash from here on finds them
        // in progress with what to send, and sends what is missing.
        let claimed = match self
            .ops
            .job_op(JobOp::Start {
                job: job.id,
                starts: starts.clone(),
            })
            .await?
        {
            JobOutcome::Started(claimed) => claimed,
            _ => return Ok(()),
        };
        let mut results = Vec::new();
        for s in starts.iter().filter(|s| claimed.contains(&s.device)) {
            if Instant::now() >= deadline {
                // The next round (this hub's or the next leader's) sends.
                break;
            }
            if let Err(why) = self.send(&job, s).await {
                results.push(result(&s.device, DeviceState::Failed, why));
            }
        }
        self.record(job.id, results).await
    }

    async fn record(&self, job: i64, results: Vec<DeviceResult>) -> Result<(), OpError> {
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

    /// What a device will be sent: a command under a new id, or the
    /// desired change that makes the version after the one it has now.
    async fn plan_start(&self, job: &Job, device: &str) -> Result<Start, String> {
        if job.spec.command.is_some() {
            return Ok(Start {
                device: device.to_owned(),
                command_id: Some(uuid::Uuid::new_v4().to_string()),
                desired_version: None,
            });
        }
        let twin = self
            .ops
            .get_twin(device)
            .await
            .map_err(|e| e.public_message())?;
        Ok(Start {
            device: device.to_owned(),
            command_id: None,
            desired_version: Some(twin.twin.desired_version + 1),
        })
    }

    /// Sends a started device its change; a second copy is refused by the
    /// command id or the desired version. Ok(true): sent now; Ok(false):
    /// nothing sent (made before, or a transient failure: the next round
    /// finds it unsent and tries again); Err: why it failed for good.
    async fn send(&self, job: &Job, s: &Start) -> Result<bool, String> {
        let sent = if let (Some(cmd), Some(id)) = (&job.spec.command, &s.command_id) {
            let params = cmd
                .params
                .as_ref()
                .map(|p| p.to_string())
                .unwrap_or_default();
            self.ops
                .send_command_once(
                    id.clone(),
                    s.device.clone(),
                    cmd.name.clone(),
                    params,
                    cmd.ttl,
                )
                .await
                .map(|_| true)
        } else {
            let patch = job.spec.desired.clone().unwrap_or_default();
            let base = s.desired_version.unwrap_or(1).saturating_sub(1);
            match self
                .ops
                .update_desired(
                    &s.device,
                    &serde_json::Value::Object(patch).to_string(),
                    Some(base),
                )
                .await
            {
                // Made before (or by someone else since): nothing to send.
                Err(e) if e.code() == ErrorCode::FailedPrecondition => Ok(false),
                other => other.map(|_| true),
            }
        };
        match sent {
            Ok(sent) => Ok(sent),
            Err(e)
                if matches!(
                    e.code(),
                    ErrorCode::Unavailable | ErrorCode::Busy | ErrorCode::Internal
                ) =>
            {
                tracing::warn!(job = job.id, device = %s.device, error = %e, "a job send failed; tried again");
                Ok(false)
            }
            Err(e) => Err(e.public_message()),
        }
    }

    /// A device's result, if it has one yet; sends what a crash or a
    /// handover left unsent.
    async fn follow(&self, job: &Job, d: &JobDevice) -> Followed {
        match self.follow_device(job, d).await {
            Ok(Some(r)) => Followed::Done(r),
            Ok(None) => Followed::Waiting,
            Err(Unsent) => match self.send(job, &start_of(d)).await {
                Ok(true) => Followed::Sent,
                // Not sent after all: its timeout goes on counting.
                Ok(false) => Followed::Waiting,
                Err(why) => Followed::Done(result(&d.device, DeviceState::Failed, why)),
            },
        }
    }

    /// A device's result if it has one yet (Err: its change was claimed
    /// but never sent).
    async fn follow_device(
        &self,
        job: &Job,
        d: &JobDevice,
    ) -> Result<Option<DeviceResult>, Unsent> {
        if let Some(id) = &d.command_id {
            let rec = match self.ops.get_command(id).await {
                Ok((rec, _)) => rec,
                Err(e) if e.code() == ErrorCode::NotFound => return Err(Unsent),
                Err(_) => return Ok(None),
            };
            let state = match rec.state {
                CommandState::Succeeded => DeviceState::Succeeded,
                CommandState::Failed
                | CommandState::Rejected
                | CommandState::Expired
                | CommandState::Cancelled => DeviceState::Failed,
                _ => return Ok(None),
            };
            let detail = if rec.detail.is_empty() {
                rec.state.as_str().to_owned()
            } else {
                format!("{}: {}", rec.state.as_str(), rec.detail)
            };
            return Ok(Some(result(&d.device, state, detail)));
        }
        let Some(patch) = job.spec.desired.as_ref() else {
            return Ok(None);
        };
        let Ok(twin) = self.ops.get_twin(&d.device).await else {
            return Ok(None);
        };
        if twin.twin.desired_version < d.desired_version.unwrap_or(0) as u64 {
            return Err(Unsent);
        }
        Ok(reported_matches(patch, &twin.twin.reported).then(|| {
            result(
                &d.device,
                DeviceState::Succeeded,
                "reported state matches".into(),
            )
        }))
    }
}

/// A device in progress whose change was claimed but never sent.
struct Unsent;

/// What following a device in progress found.
enum Followed {
    Done(DeviceResult),
    /// Its change was sent only now: its timeout starts again.
    Sent,
    Waiting,
}

fn start_of(d: &JobDevice) -> Start {
    Start {
        device: d.device.clone(),
        command_id: d.command_id.clone(),
        desired_version: d.desired_version.map(|v| v as u64),
    }
}

fn result(device: &str, state: DeviceState, detail: String) -> DeviceResult {
    DeviceResult {
        device: device.to_owned(),
        state,
        detail,
    }
}
