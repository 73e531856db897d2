//! Jobs as operators see them: create (the selector is resolved now, in
//! device id order), list, show with progress, a job's devices, pause,
//! resume, cancel. Every door calls these.

use super::{OpError, Operations};
use crate::ingest::jobs::{JobOp, JobOutcome};
use crate::jobs::{DeviceState, JobSpec, JobState};
use crate::store::jobs::{Job, JobDevice};

/// Most jobs or job devices one list returns.
pub const MAX_JOBS_PAGE: u32 = 1000;

impl Operations {
    /// Creates a job over the devices its target matches now; it starts
    /// at once (the job runner drives it).
    pub async fn create_job(&self, spec: JobSpec) -> Result<Job, OpError> {
        spec.check().map_err(|e| OpError::Invalid(e.to_string()))?;
        super::twin::check_tags(&spec.target.tags)?;
        if let Some(patch) = &spec.desired {
            crate::twin::doc::parse_patch(
                &serde_json::Value::Object(patch.clone()).to_string(),
                &self.twin_limits,
            )
            .map_err(|e| OpError::Invalid(format!("desired patch: {e}")))?;
        }
        let mut filter = crate::twin::filter::Filter::tags(&spec.target.tags);
        if let Some(text) = &spec.target.filter {
            filter = filter.and(super::parse_filter(text).map_err(OpError::Invalid)?);
        }
        let devices = self.selector_targets(&filter).await?;
        let id = match self
            .job_op(JobOp::Create {
                spec: Box::new(spec),
                devices,
            })
            .await?
        {
            JobOutcome::Created(id) => id,
            other => return Err(unexpected(other)),
        };
        self.job(id).await
    }

    /// [`Operations::create_job`] from a job's JSON.
    pub async fn create_job_json(&self, json: &str) -> Result<Job, OpError> {
        let spec = JobSpec::from_json(json).map_err(|e| OpError::Invalid(e.to_string()))?;
        self.create_job(spec).await
    }

    pub async fn job(&self, id: i64) -> Result<Job, OpError> {
        self.store
            .job(id)
            .await?
            .ok_or_else(|| OpError::NotFound(format!("no job {id}")))
    }

    /// Jobs, newest first (only in progress or paused with `active`).
    pub async fn jobs(&self, active: bool, limit: u32) -> Result<Vec<Job>, OpError> {
        Ok(self
            .store
            .jobs(active, limit.clamp(1, MAX_JOBS_PAGE))
            .await?)
    }

    /// A job's devices in rollout order, after position `after` (-1: from
    /// the start), of one state or all.
    pub async fn job_devices(
        &self,
        id: i64,
        state: Option<DeviceState>,
        after: i64,
        limit: u32,
    ) -> Result<Vec<JobDevice>, OpError> {
        self.job(id).await?;
        Ok(self
            .store
            .job_devices(id, state, after, limit.clamp(1, MAX_JOBS_PAGE))
            .await?)
    }

    /// Stops starting devices (those in progress are still followed).
    pub async fn pause_job(&self, id: i64) -> Result<Job, OpError> {
        self.move_job(
            id,
            &[JobState::InProgress, JobState::Paused],
            JobState::Paused,
            None,
        )
        .await
    }

    pub async fn resume_job(&self, id: i64) -> Result<Job, OpError> {
        self.move_job(
            id,
            &[JobState::Paused, JobState::InProgress],
            JobState::InProgress,
            None,
        )
        .await
    }

    /// Cancels a job: its devices not finished are cancelled (a command
    /// already sent stays sent).
    pub async fn cancel_job(&self, id: i64, by: &str) -> Result<Job, OpError> {
        let reason = format!("cancelled by {by}");
        self.move_job(
            id,
            &[JobState::InProgress, JobState::Paused],
            JobState::Cancelled,
            Some(reason),
        )
        .await
    }

    async fn move_job(
        &self,
        id: i64,
        from: &[JobState],
        to: JobState,
        reason: Option<String>,
    ) -> Result<Job, OpError> {
        let job = self.job(id).await?;
        if job.state == to {
            return Ok(job);
        }
        let op = JobOp::State {
            job: id,
            from: from.to_vec(),
            to,
            reason,
        };
        match self.job_op(op).await? {
            JobOutcome::Moved(true) => self.job(id).await,
            JobOutcome::Moved(false) => Err(OpError::Precondition(format!(
                "job {id} is {}: it cannot become {}",
                self.job(id).await?.state.as_str(),
                to.as_str()
            ))),
            other => Err(unexpected(other)),
        }
    }

    pub(crate) async fn job_op(&self, op: JobOp) -> Result<JobOutcome, OpError> {
        self.ingest.job(op).await.map_err(|e| {
            tracing::warn!(error = %e, "a job change failed");
            OpError::Unavailable(format!("the change was not stored: {e}; try again"))
        })
    }
}

fn unexpected(outcome: JobOutcome) -> OpError {
    tracing::error!(
        ?outcome,
        "the writer answered a job change with something else"
    );
    OpError::Internal("the hub failed while answering; see its log".into())
}
