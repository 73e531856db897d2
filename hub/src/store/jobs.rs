//! Jobs and their devices: writes for the ingest writer, reads for the
//! operator core and the job runner.

use serde::Serialize;

use super::db::{Val, with_conn, with_pool};
use super::write::{Batched, WriteTx};
use super::{Store, StoreError};
use crate::jobs::{Counts, DeviceState, JobSpec, JobState};

/// A job as stored, with its devices' counts.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Job {
    pub id: i64,
    pub name: String,
    pub state: JobState,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    pub total: u64,
    pub counts: Counts,
    pub created_ms: i64,
    pub updated_ms: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub finished_ms: Option<i64>,
    pub spec: JobSpec,
}

row_struct! {
    /// One device of a job.
    #[derive(Debug, Clone, PartialEq, Serialize)]
    pub struct JobDevice {
        pub device: String,
        pub position: i64,
        pub state: String,
        pub started_ms: Option<i64>,
        pub finished_ms: Option<i64>,
        pub command_id: Option<String>,
        pub desired_version: Option<i64>,
        pub detail: Option<String>,
    }
}

type JobRow = (
    i64,
    String,
    String,
    String,
    Option<String>,
    i64,
    i64,
    i64,
    Option<i64>,
);

const JOB_COLS: &str = "id, name, spec, state, reason, total, created_ms, updated_ms, finished_ms";
const DEVICE_COLS: &str =
    "device, position, state, started_ms, finished_ms, command_id, desired_version, detail";

fn decode_job(row: JobRow, counts: Counts) -> Option<Job> {
    let (id, name, spec, state, reason, total, created_ms, updated_ms, finished_ms) = row;
    let (Some(state), Ok(spec)) = (
        JobState::parse(&state),
        serde_json::from_str::<JobSpec>(&spec),
    ) else {
        tracing::error!(
            job = id,
            "a stored job cannot be read (written by another version?); it is skipped"
        );
        return None;
    };
    Some(Job {
        id,
        name,
        state,
        reason,
        total: total as u64,
        counts,
        created_ms,
        updated_ms,
        finished_ms,
        spec,
    })
}

/// What a device's result is recorded as.
#[derive(Debug, Clone)]
pub struct DeviceResult {
    pub device: String,
    pub state: DeviceState,
    pub detail: String,
}

/// A device to start, with what it will be sent: a command under this id,
/// or the desired change that makes this version.
#[derive(Debug, Clone)]
pub struct Start {
    pub device: String,
    pub command_id: Option<String>,
    pub desired_version: Option<u64>,
}

impl WriteTx<'_> {
    /// A new job over `devices` (in rollout order); its id.
    pub async fn create_job(
        &mut self,
        spec: &JobSpec,
        devices: &[String],
        now: i64,
    ) -> Result<i64, StoreError> {
        let id: i64 = with_conn!(self.conn.conn(), c => sqlx::query_scalar(
            "INSERT INTO jobs (name, spec, state, total, created_ms, updated_ms) \
             VALUES ($1, $2, 'in_progress', $3, $4, $4) RETURNING id",
        )
        .bind(&spec.name)
        .bind(spec.to_json())
        .bind(devices.len() as i64)
        .bind(now)
        .fetch_one(c)
        .await?);
        let rows: Vec<(i64, &str)> = devices
            .iter()
            .enumerate()
            .map(|(i, d)| (i as i64, d.as_str()))
            .collect();
        self.execute_batched(Batched::JobDevices, &rows, |(position, device), out| {
            out.extend([
                Val::I(id),
                Val::T(device),
                Val::I(*position),
                Val::T("pending"),
            ]);
        })
        .await?;
        Ok(id)
    }

    /// Claims pending devices of an in-progress job (before anything is
    /// sent to them), with what will be sent: the command's id, or the
    /// desired version the change will make. The devices claimed: a device
    /// no longer pending (another runner, a cancel) is left alone.
    pub async fn start_job_devices(
        &mut self,
        job: i64,
        starts: &[Start],
        now: i64,
    ) -> Result<Vec<String>, StoreError> {
        let mut claimed = Vec::with_capacity(starts.len());
        for s in starts {
            let got: Option<String> = with_conn!(self.conn.conn(), c => sqlx::query_scalar(
                "UPDATE job_devices SET state = 'in_progress', started_ms = $3, command_id = $4, \
                 desired_version = $5 WHERE job_id = $1 AND device = $2 AND state = 'pending' \
                 AND EXISTS (SELECT 1 FROM jobs WHERE id = $1 AND state = 'in_progress') \
                 RETURNING device",
            )
            .bind(job)
            .bind(&s.device)
            .bind(now)
            .bind(s.command_id.as_deref())
            .bind(s.desired_version.map(|v| v as i64))
            .fetch_optional(c)
            .await?);
            claimed.extend(got);
        }
        Ok(claimed)
    }

    /// Devices still in progress start their timeout again at `now`.
    pub async fn restart_job_devices(
        &mut self,
        job: i64,
        devices: &[String],
        now: i64,
    ) -> Result<(), StoreError> {
        for d in devices {
            with_conn!(self.conn.conn(), c => sqlx::query(
                "UPDATE job_devices SET started_ms = $3 \
                 WHERE job_id = $1 AND device = $2 AND state = 'in_progress'",
            )
            .bind(job)
            .bind(d)
            .bind(now)
            .execute(c)
            .await
            .map(|_| ())?);
        }
        Ok(())
    }

    /// Records devices' results (only of devices still in progress).
    pub async fn finish_job_devices(
        &mut self,
        job: i64,
        results: &[DeviceResult],
        now: i64,
    ) -> Result<(), StoreError> {
        for r in results {
            with_conn!(self.conn.conn(), c => sqlx::query(
                "UPDATE job_devices SET state = $3, detail = $4, finished_ms = $5 \
                 WHERE job_id = $1 AND device = $2 AND state IN ('in_progress', 'pending')",
            )
            .bind(job)
            .bind(&r.device)
            .bind(r.state.as_str())
            .bind(&r.detail)
            .bind(now)
            .execute(c)
            .await
            .map(|_| ())?);
        }
        Ok(())
    }

    /// Moves a job from one of `from` to `to`; a final state cancels its
    /// devices not finished yet. Whether it moved.
    pub async fn set_job_state(
        &mut self,
        job: i64,
        from: &[JobState],
        to: JobState,
        reason: Option<&str>,
        now: i64,
    ) -> Result<bool, StoreError> {
        let from: Vec<String> = from.iter().map(|s| format!("'{}'", s.as_str())).collect();
        let sql = format!(
            "UPDATE jobs SET state = $2, reason = COALESCE($3, reason), updated_ms = $4, \
             finished_ms = $5 WHERE id = $1 AND state IN ({})",
            from.join(", ")
        );
        let finished = to.is_final().then_some(now);
        let moved = with_conn!(self.conn.conn(), c => sqlx::query(&sql)
            .bind(job)
            .bind(to.as_str())
            .bind(reason)
            .bind(now)
            .bind(finished)
            .execute(c)
            .await?
            .rows_affected());
        if moved > 0 && to.is_final() {
            with_conn!(self.conn.conn(), c => sqlx::query(
                "UPDATE job_devices SET state = 'cancelled', finished_ms = $2, \
                 detail = COALESCE(detail, 'the job ended') \
                 WHERE job_id = $1 AND state IN ('pending', 'in_progress')",
            )
            .bind(job)
            .bind(now)
            .execute(c)
            .await
            .map(|_| ())?);
        }
        Ok(moved > 0)
    }
}

impl Store {
    async fn job_counts(&self, job: i64) -> Result<Counts, StoreError> {
        let rows: Vec<(String, i64)> = with_pool!(&self.read, pool, _Db => sqlx::query_as(
            "SELECT state, count(*) FROM job_devices WHERE job_id = $1 GROUP BY state",
        )
        .bind(job)
        .fetch_all(pool)
        .await?);
        let mut counts = Counts::default();
        for (state, n) in rows {
            if let Some(s) = DeviceState::parse(&state) {
                counts.add(s, n as u64);
            }
        }
        Ok(counts)
    }

    pub async fn job(&self, id: i64) -> Result<Option<Job>, StoreError> {
        let sql = format!("SELECT {JOB_COLS} FROM jobs WHERE id = $1");
        let row: Option<JobRow> = with_pool!(&self.read, pool, _Db => sqlx::query_as(&sql)
            .bind(id)
            .fetch_optional(pool)
            .await?);
        let Some(row) = row else { return Ok(None) };
        let counts = self.job_counts(id).await?;
        Ok(decode_job(row, counts))
    }

    /// Jobs, newest first; only active ones with `active`.
    pub async fn jobs(&self, active: bool, limit: u32) -> Result<Vec<Job>, StoreError> {
        self.jobs_ordered(active, "DESC", limit).await
    }

    /// Active jobs, oldest first (the runner's round).
    pub async fn active_jobs(&self, limit: u32) -> Result<Vec<Job>, StoreError> {
        self.jobs_ordered(true, "ASC", limit).await
    }

    async fn jobs_ordered(
        &self,
        active: bool,
        order: &str,
        limit: u32,
    ) -> Result<Vec<Job>, StoreError> {
        let filter = if active {
            "WHERE state IN ('in_progress', 'paused')"
        } else {
            ""
        };
        let sql = format!("SELECT {JOB_COLS} FROM jobs {filter} ORDER BY id {order} LIMIT $1");
        let rows: Vec<JobRow> = with_pool!(&self.read, pool, _Db => sqlx::query_as(&sql)
            .bind(i64::from(limit))
            .fetch_all(pool)
            .await?);
        let mut out = Vec::with_capacity(rows.len());
        for row in rows {
            let counts = self.job_counts(row.0).await?;
            out.extend(decode_job(row, counts));
        }
        Ok(out)
    }

    /// A job's devices in rollout order (of one state), after `after`.
    pub async fn job_devices(
        &self,
        job: i64,
        state: Option<DeviceState>,
        after: i64,
        limit: u32,
    ) -> Result<Vec<JobDevice>, StoreError> {
        let sql = format!(
            "SELECT {DEVICE_COLS} FROM job_devices WHERE job_id = $1 AND position > $2 \
             AND ($3 = '' OR state = $3) ORDER BY position LIMIT $4"
        );
        Ok(with_pool!(&self.read, pool, _Db => sqlx::query_as(&sql)
            .bind(job)
            .bind(after)
            .bind(state.map_or("", DeviceState::as_str))
            .bind(i64::from(limit))
            .fetch_all(pool)
            .await?))
    }
}
