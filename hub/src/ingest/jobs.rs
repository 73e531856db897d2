//! Job changes the writer commits: a new job, devices started, what was
//! sent, results, and the job's own state (pause, resume, cancel, abort,
//! finish).

use tokio::sync::oneshot;

use super::IngestError;
use crate::jobs::{JobSpec, JobState};
use crate::store::jobs::{DeviceResult, Start};
use crate::store::{StoreError, WriteTx};

#[derive(Debug, Clone)]
pub enum JobOp {
    Create {
        spec: Box<JobSpec>,
        devices: Vec<String>,
    },
    Start {
        job: i64,
        starts: Vec<Start>,
    },
    Results {
        job: i64,
        results: Vec<DeviceResult>,
    },
    /// Devices in progress were sent their change only now (a crash or a
    /// handover came between the claim and the send): their timeout
    /// counts from now.
    Sent {
        job: i64,
        devices: Vec<String>,
    },
    State {
        job: i64,
        from: Vec<JobState>,
        to: JobState,
        reason: Option<String>,
    },
}

#[derive(Debug, Clone)]
pub enum JobOutcome {
    Created(i64),
    /// The devices a Start claimed.
    Started(Vec<String>),
    Done,
    /// Whether the job's state moved.
    Moved(bool),
}

pub(crate) struct JobMsg {
    pub op: JobOp,
    pub reply: oneshot::Sender<Result<JobOutcome, IngestError>>,
}

pub(crate) async fn run(
    tx: &mut WriteTx<'_>,
    op: &JobOp,
    now: i64,
) -> Result<JobOutcome, StoreError> {
    Ok(match op {
        JobOp::Create { spec, devices } => {
            JobOutcome::Created(tx.create_job(spec, devices, now).await?)
        }
        JobOp::Start { job, starts } => {
            JobOutcome::Started(tx.start_job_devices(*job, starts, now).await?)
        }
        JobOp::Results { job, results } => {
            tx.finish_job_devices(*job, results, now).await?;
            JobOutcome::Done
        }
        JobOp::Sent { job, devices } => {
            tx.restart_job_devices(*job, devices, now).await?;
            JobOutcome::Done
        }
        JobOp::State {
            job,
            from,
            to,
            reason,
        } => JobOutcome::Moved(
            tx.set_job_state(*job, from, *to, reason.as_deref(), now)
                .await?,
        ),
    })
}
