//! Jobs: one change (a desired-state patch or a command) rolled out to the
//! devices a selector matched when the job was created, at a rate, at most
//! `concurrency` devices in progress at once, stopped when too many fail.
//!
//! - This module is plain code: what a job is ([`JobSpec`], checked once
//!   for every door), how fast it may start devices ([`Pacer`]), when it
//!   aborts ([`abort_reason`]) and when a device's twin counts as done
//!   ([`reported_matches`]).
//! - Every state change is written by the ingest writer (`store::jobs`);
//!   [`runner`] drives active jobs (one hub: on PostgreSQL the holder of the
//!   `jobs` lease). A device is claimed (pending -> in progress) *before*
//!   anything is sent to it, together with what will be sent: a command
//!   under an id chosen then (the commands core creates a command once per
//!   id), or the desired change that makes the version after the one read
//!   then (sent with that `if_version`). Sending is idempotent: a runner
//!   that finds a device in progress whose command is not there, or whose
//!   desired version is behind, sends again, and a second copy is refused
//!   by the id or the version. A restart, or two runners at once during a
//!   lease handover, sends nothing twice.

pub mod runner;

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::twin::doc::{self, Doc};

/// Most devices one job may target.
pub const MAX_JOB_DEVICES: usize = crate::operator::MAX_SELECTOR_DEVICES;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    InProgress,
    Paused,
    /// Every device succeeded.
    Succeeded,
    /// Finished, some devices failed or timed out.
    Failed,
    /// Stopped at its abort threshold.
    Aborted,
    Cancelled,
}

impl JobState {
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::InProgress => "in_progress",
            JobState::Paused => "paused",
            JobState::Succeeded => "succeeded",
            JobState::Failed => "failed",
            JobState::Aborted => "aborted",
            JobState::Cancelled => "cancelled",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "in_progress" => JobState::InProgress,
            "paused" => JobState::Paused,
            "succeeded" => JobState::Succeeded,
            "failed" => JobState::Failed,
            "aborted" => JobState::Aborted,
            "cancelled" => JobState::Cancelled,
            _ => return None,
        })
    }

    pub fn is_final(self) -> bool {
        !matches!(self, JobState::InProgress | JobState::Paused)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeviceState {
    Pending,
    InProgress,
    Succeeded,
    Failed,
    TimedOut,
    Cancelled,
}

impl DeviceState {
    pub fn as_str(self) -> &'static str {
        match self {
            DeviceState::Pending => "pending",
            DeviceState::InProgress => "in_progress",
            DeviceState::Succeeded => "succeeded",
            DeviceState::Failed => "failed",
            DeviceState::TimedOut => "timed_out",
            DeviceState::Cancelled => "cancelled",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "pending" => DeviceState::Pending,
            "in_progress" => DeviceState::InProgress,
            "succeeded" => DeviceState::Succeeded,
            "failed" => DeviceState::Failed,
            "timed_out" => DeviceState::TimedOut,
            "cancelled" => DeviceState::Cancelled,
            _ => return None,
        })
    }
}

/// Which devices: those with all these tags and matching the fleet
/// filter, as they are when the job is created.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobTarget {
    #[serde(default)]
    pub tags: BTreeMap<String, String>,
    #[serde(default, rename = "where", skip_serializing_if = "Option::is_none")]
    pub filter: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobCommand {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub params: Option<serde_json::Value>,
    #[serde(
        default,
        with = "humantime_serde",
        skip_serializing_if = "Option::is_none"
    )]
    pub ttl: Option<Duration>,
}

/// Grows the rate by `factor` each time `every_succeeded` more devices
/// succeeded, up to `max_per_minute`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Exponential {
    pub factor: f64,
    pub every_succeeded: u64,
    pub max_per_minute: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rollout {
    /// Devices started per minute (at first, with `exponential`).
    pub per_minute: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exponential: Option<Exponential>,
}

impl Default for Rollout {
    fn default() -> Self {
        Self {
            per_minute: 60.0,
            exponential: None,
        }
    }
}

/// Stop the job when more than `failed_count` devices, or more than
/// `failed_percent` % of those finished (once `min_finished` have), failed
/// or timed out.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Abort {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failed_count: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failed_percent: Option<f64>,
    #[serde(default = "one")]
    pub min_finished: u64,
}

fn one() -> u64 {
    1
}

fn ten() -> u32 {
    10
}

fn ten_minutes() -> Duration {
    Duration::from_secs(600)
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobSpec {
    pub name: String,
    pub target: JobTarget,
    /// A merge patch of the desired document: a device succeeds when its
    /// reported state matches it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub desired: Option<Doc>,
    /// Or a command: a device succeeds when it succeeds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<JobCommand>,
    #[serde(default)]
    pub rollout: Rollout,
    /// Devices in progress at once, at most.
    #[serde(default = "ten")]
    pub concurrency: u32,
    /// A device not done within this after it was started times out.
    #[serde(default = "ten_minutes", with = "humantime_serde")]
    pub timeout: Duration,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub abort: Option<Abort>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct JobError(pub String);

impl JobSpec {
    pub fn from_json(text: &str) -> Result<JobSpec, JobError> {
        let spec: JobSpec =
            serde_json::from_str(text).map_err(|e| JobError(format!("bad job: {e}")))?;
        spec.check()?;
        Ok(spec)
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }

    /// What every door checks (the target's tags and filter, the command
    /// and the patch are checked again by the core that sends them).
    pub fn check(&self) -> Result<(), JobError> {
        let bad = |m: &str| Err(JobError(m.to_owned()));
        if self.name.is_empty() || self.name.len() > 64 || self.name.chars().any(char::is_control) {
            return bad("a job name is 1 to 64 bytes without control characters");
        }
        if self.desired.is_some() == self.command.is_some() {
            return bad("a job has exactly one of desired or command");
        }
        if self.target.tags.is_empty() {
            return bad("a job's target names at least one tag");
        }
        let r = &self.rollout;
        if !(r.per_minute.is_finite() && r.per_minute > 0.0 && r.per_minute <= 600_000.0) {
            return bad("rollout.per_minute is above 0 and at most 600000");
        }
        if let Some(e) = &r.exponential
            && !(e.factor.is_finite()
                && e.factor > 1.0
                && e.factor <= 100.0
                && e.every_succeeded >= 1
                && e.max_per_minute.is_finite()
                && e.max_per_minute >= r.per_minute
                && e.max_per_minute <= 600_000.0)
        {
            return bad(
                "rollout.exponential: factor above 1 (at most 100), every_succeeded at least 1, \
                 max_per_minute from per_minute to 600000",
            );
        }
        if !(1..=1_000).contains(&self.concurrency) {
            return bad("concurrency is 1 to 1000");
        }
        if self.timeout < Duration::from_secs(1) || self.timeout > Duration::from_secs(7 * 86_400) {
            return bad("timeout is 1s to 7d");
        }
        if let Some(a) = &self.abort {
            if a.failed_count.is_none() && a.failed_percent.is_none() {
                return bad("abort names failed_count or failed_percent");
            }
            if let Some(p) = a.failed_percent
                && !(p.is_finite() && (0.0..=100.0).contains(&p))
            {
                return bad("abort.failed_percent is 0 to 100");
            }
        }
        Ok(())
    }

    /// The rate now: grown by the exponential rollout with the devices that
    /// succeeded so far.
    pub fn per_minute(&self, succeeded: u64) -> f64 {
        let r = &self.rollout;
        match &r.exponential {
            None => r.per_minute,
            Some(e) => {
                let steps = (succeeded / e.every_succeeded).min(1000) as i32;
                (r.per_minute * e.factor.powi(steps)).min(e.max_per_minute)
            }
        }
    }
}

/// A job's devices by state.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Counts {
    pub pending: u64,
    pub in_progress: u64,
    pub succeeded: u64,
    pub failed: u64,
    pub timed_out: u64,
    pub cancelled: u64,
}

impl Counts {
    pub fn add(&mut self, state: DeviceState, n: u64) {
        match state {
            DeviceState::Pending => self.pending += n,
            DeviceState::InProgress => self.in_progress += n,
            DeviceState::Succeeded => self.succeeded += n,
            DeviceState::Failed => self.failed += n,
            DeviceState::TimedOut => self.timed_out += n,
            DeviceState::Cancelled => self.cancelled += n,
        }
    }

    pub fn finished(&self) -> u64 {
        self.succeeded + self.failed + self.timed_out
    }

    pub fn bad(&self) -> u64 {
        self.failed + self.timed_out
    }
}

/// Why the job stops here, if it does.
pub fn abort_reason(abort: Option<&Abort>, c: &Counts) -> Option<String> {
    let a = abort?;
    if let Some(n) = a.failed_count
        && c.bad() > n
    {
        return Some(format!(
            "{} devices failed or timed out (more than {n})",
            c.bad()
        ));
    }
    if let Some(p) = a.failed_percent
        && c.finished() >= a.min_finished.max(1)
        && (c.bad() as f64) * 100.0 > p * c.finished() as f64
    {
        return Some(format!(
            "{} of {} finished devices failed or timed out (more than {p} %)",
            c.bad(),
            c.finished()
        ));
    }
    None
}

/// How many devices a job may start: a token bucket at the job's rate,
/// holding at most half a second's worth (at least one), so a rollout
/// never bursts past its rate by more than that.
#[derive(Debug, Clone, Default)]
pub struct Pacer {
    last_ms: Option<i64>,
    tokens: f64,
}

impl Pacer {
    /// Up to `want` devices may start at `now_ms` at `per_minute`.
    pub fn take(&mut self, now_ms: i64, per_minute: f64, want: u64) -> u64 {
        let per_ms = per_minute / 60_000.0;
        let cap = (per_ms * 500.0).max(1.0);
        let tokens = match self.last_ms {
            // The first device starts at once.
            None => 1.0,
            Some(last) => self.tokens + (now_ms - last).max(0) as f64 * per_ms,
        };
        self.last_ms = Some(now_ms);
        self.tokens = tokens.min(cap);
        let n = (self.tokens.floor() as u64).min(want);
        self.tokens -= n as f64;
        n
    }
}

/// Whether a device's reported document holds what the patch sets (and
/// lacks what it deletes).
pub fn reported_matches(patch: &Doc, reported: &Doc) -> bool {
    patch.iter().all(|(k, want)| match (want, reported.get(k)) {
        (serde_json::Value::Null, got) => got.is_none(),
        (serde_json::Value::Object(inner), Some(serde_json::Value::Object(got))) => {
            reported_matches(inner, got)
        }
        (want, Some(got)) => want == got,
        (_, None) => false,
    })
}

/// Whether a desired document already holds a patch (applying it would
/// change nothing).
pub fn desired_holds(patch: &Doc, desired: &Doc) -> bool {
    let mut next = desired.clone();
    doc::merge(&mut next, patch);
    next == *desired
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn spec(v: serde_json::Value) -> Result<JobSpec, JobError> {
        JobSpec::from_json(&v.to_string())
    }

    #[test]
    fn specs_parse_and_bad_ones_say_why() {
        let s = spec(json!({"name": "fw", "target": {"tags": {"site": "a"}},
            "command": {"name": "reboot"}, "rollout": {"per_minute": 600}, "concurrency": 5,
            "abort": {"failed_count": 3}}))
        .unwrap();
        assert_eq!(s.timeout, Duration::from_secs(600));
        assert_eq!(JobSpec::from_json(&s.to_json()).unwrap(), s);
        for (v, why) in [
            (
                json!({"name": "x", "target": {"tags": {"a": "b"}}}),
                "exactly one",
            ),
            (
                json!({"name": "x", "target": {}, "command": {"name": "p"}}),
                "tag",
            ),
            (
                json!({"name": "x", "target": {"tags": {"a": "b"}}, "command": {"name": "p"}, "concurrency": 0}),
                "concurrency",
            ),
            (
                json!({"name": "x", "target": {"tags": {"a": "b"}}, "command": {"name": "p"}, "rollout": {"per_minute": 0}}),
                "per_minute",
            ),
            (
                json!({"name": "x", "target": {"tags": {"a": "b"}}, "command": {"name": "p"}, "abort": {}}),
                "abort",
            ),
            (
                json!({"name": "x", "target": {"tags": {"a": "b"}}, "command": {"name": "p"}, "bogus": 1}),
                "unknown field",
            ),
        ] {
            let err = spec(v.clone()).unwrap_err().to_string();
            assert!(err.contains(why), "{v}: {err}");
        }
    }

    #[test]
    fn the_pacer_keeps_the_rate_and_bursts_half_a_second_at_most() {
        let mut p = Pacer::default();
        // 600/min = 10/s, asked for plenty every 100 ms for 10 s.
        let mut started = 0;
        for tick in 0..=100 {
            started += p.take(tick * 100, 600.0, 1000);
        }
        assert!((100..=102).contains(&started), "{started}");
        // Idle for a minute: at most half a second's worth at once.
        assert_eq!(p.take(70_000, 600.0, 1000), 5);
        // Slow rates still start the first device at once.
        let mut slow = Pacer::default();
        assert_eq!(slow.take(0, 1.0, 10), 1);
        assert_eq!(slow.take(30_000, 1.0, 10), 0);
        assert_eq!(slow.take(60_000, 1.0, 10), 1);
    }

    #[test]
    fn exponential_rollouts_grow_to_their_cap() {
        let s = spec(json!({"name": "x", "target": {"tags": {"a": "b"}}, "command": {"name": "p"},
            "rollout": {"per_minute": 10, "exponential": {"factor": 2, "every_succeeded": 5, "max_per_minute": 50}}}))
        .unwrap();
        assert_eq!(s.per_minute(0), 10.0);
        assert_eq!(s.per_minute(5), 20.0);
        assert_eq!(s.per_minute(12), 40.0);
        assert_eq!(s.per_minute(1000), 50.0);
    }

    #[test]
    fn abort_thresholds() {
        let by_count = Abort {
            failed_count: Some(2),
            failed_percent: None,
            min_finished: 1,
        };
        let mut c = Counts {
            succeeded: 10,
            failed: 2,
            ..Counts::default()
        };
        assert_eq!(abort_reason(Some(&by_count), &c), None);
        c.timed_out = 1;
        assert!(abort_reason(Some(&by_count), &c).is_some());
        let by_percent = Abort {
            failed_count: None,
            failed_percent: Some(20.0),
            min_finished: 10,
        };
        let c = Counts {
            succeeded: 1,
            failed: 2,
            ..Counts::default()
        };
        assert_eq!(
            abort_reason(Some(&by_percent), &c),
            None,
            "too few finished"
        );
        let c = Counts {
            succeeded: 8,
            failed: 3,
            ..Counts::default()
        };
        assert!(abort_reason(Some(&by_percent), &c).is_some());
        assert_eq!(abort_reason(None, &c), None);
    }

    #[test]
    fn reported_state_matches_a_patch() {
        let d = |v: serde_json::Value| v.as_object().unwrap().clone();
        let patch = d(json!({"fw": "1.4", "led": {"on": true}, "old": null}));
        assert!(reported_matches(
            &patch,
            &d(json!({"fw": "1.4", "led": {"on": true, "c": 1}}))
        ));
        assert!(!reported_matches(
            &patch,
            &d(json!({"fw": "1.3", "led": {"on": true}}))
        ));
        assert!(!reported_matches(
            &patch,
            &d(json!({"fw": "1.4", "led": {"on": true}, "old": 1}))
        ));
        assert!(desired_holds(
            &d(json!({"a": 1, "b": null})),
            &d(json!({"a": 1}))
        ));
        assert!(!desired_holds(&d(json!({"a": 2})), &d(json!({"a": 1}))));
    }
}
