//! `hub job create|list|show|pause|resume|cancel`: jobs through the
//! Operator API, printed as JSON lines.

use std::io::Write;

use clap::Subcommand;
use serde_json::{Value, json};
use telemetry_proto::v1 as pb;

use super::{HubAddr, connect, status_error};
use crate::domain::shown;

#[derive(Subcommand, Debug)]
pub enum JobAction {
    /// Create a job from its JSON (README "Jobs"), or `@file.json`:
    /// `hub job create '{"name": "fw-1.4", "target": {"tags": {"site": "a"}},
    /// "desired": {"firmware": "1.4"}, "rollout": {"per_minute": 60},
    /// "concurrency": 10, "abort": {"failed_percent": 10}}'`.
    Create {
        #[command(flatten)]
        addr: HubAddr,
        job: String,
    },
    /// Jobs, newest first, with their progress.
    List {
        #[command(flatten)]
        addr: HubAddr,
        /// Only jobs in progress or paused.
        #[arg(long)]
        active: bool,
    },
    /// A job with its progress, then (with --devices) one line per device.
    Show {
        #[command(flatten)]
        addr: HubAddr,
        id: i64,
        #[arg(long)]
        devices: bool,
        /// Only devices in this state.
        #[arg(long)]
        state: Option<String>,
    },
    /// Start no more devices (those in progress are still followed).
    Pause {
        #[command(flatten)]
        addr: HubAddr,
        id: i64,
    },
    Resume {
        #[command(flatten)]
        addr: HubAddr,
        id: i64,
    },
    /// Cancel a job: its devices not finished are cancelled.
    Cancel {
        #[command(flatten)]
        addr: HubAddr,
        id: i64,
    },
}

fn job_json(j: &pb::Job) -> Value {
    let c = j.counts.unwrap_or_default();
    let spec: Value = serde_json::from_str(&j.job_json).unwrap_or(Value::Null);
    json!({
        "id": j.id, "name": j.name, "state": j.state, "reason": j.reason, "total": j.total,
        "counts": {"pending": c.pending, "in_progress": c.in_progress, "succeeded": c.succeeded,
                   "failed": c.failed, "timed_out": c.timed_out, "cancelled": c.cancelled},
        "created_ms": j.created_ms, "updated_ms": j.updated_ms, "finished_ms": j.finished_ms,
        "job": spec,
    })
}

fn device_json(d: &pb::JobDevice) -> Value {
    json!({
        "device_id": d.device_id, "position": d.position, "state": d.state,
        "started_ms": d.started_ms, "finished_ms": d.finished_ms, "command_id": d.command_id,
        "desired_version": d.desired_version, "detail": d.detail,
    })
}

fn line(out: &mut impl Write, v: &Value) -> std::io::Result<()> {
    writeln!(out, "{}", shown(&v.to_string()))
}

pub async fn run(action: &JobAction, out: &mut impl Write) -> anyhow::Result<()> {
    match action {
        JobAction::Create { addr, job } => {
            let text = match job.strip_prefix('@') {
                Some(path) => std::fs::read_to_string(path)
                    .map_err(|e| anyhow::anyhow!("cannot read {path}: {e}"))?,
                None => job.clone(),
            };
            let j = connect(addr)
                .await?
                .create_job(pb::CreateJobRequest { job_json: text })
                .await
                .map_err(status_error)?
                .into_inner();
            line(out, &job_json(&j))?;
        }
        JobAction::List { addr, active } => {
            let jobs = connect(addr)
                .await?
                .list_jobs(pb::ListJobsRequest {
                    active: *active,
                    limit: 0,
                })
                .await
                .map_err(status_error)?
                .into_inner();
            for j in &jobs.jobs {
                line(out, &job_json(j))?;
            }
        }
        JobAction::Show {
            addr,
            id,
            devices,
            state,
        } => {
            let mut client = connect(addr).await?;
            let j = client
                .get_job(pb::GetJobRequest { id: *id })
                .await
                .map_err(status_error)?
                .into_inner();
            line(out, &job_json(&j))?;
            if *devices {
                let mut after = -1;
                loop {
                    let page = client
                        .list_job_devices(pb::ListJobDevicesRequest {
                            id: *id,
                            state: state.clone().unwrap_or_default(),
                            after: Some(after),
                            limit: 1000,
                        })
                        .await
                        .map_err(status_error)?
                        .into_inner();
                    for d in &page.devices {
                        line(out, &device_json(d))?;
                    }
                    match page.devices.last() {
                        Some(last) if page.devices.len() == 1000 => after = last.position,
                        _ => break,
                    }
                }
            }
        }
        JobAction::Pause { addr, id }
        | JobAction::Resume { addr, id }
        | JobAction::Cancel { addr, id } => {
            let mut client = connect(addr).await?;
            let request = pb::JobActionRequest { id: *id };
            let j = match action {
                JobAction::Pause { .. } => client.pause_job(request).await,
                JobAction::Resume { .. } => client.resume_job(request).await,
                _ => client.cancel_job(request).await,
            }
            .map_err(status_error)?
            .into_inner();
            line(out, &job_json(&j))?;
        }
    }
    out.flush()?;
    Ok(())
}
