//! Retention: readings older than `storage.retention`, and rollup chunks
//! older than their rollup's `keep`, are deleted in the background, a few
//! thousand at a time, each step a small part of one of the writer's group
//! commits (the one writer), so ingest never waits for a long delete.
//! Final commands older than `commands.retention` are deleted by the
//! commands task the same way.

use std::collections::VecDeque;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::domain::now_ms;
use crate::ingest::{IngestError, IngestQueue, RetainStep};
use crate::store::Store;

/// Readings deleted per step at most, and series visited per step: a
/// step is part of one group commit, so it stays small.
pub const STEP_ROWS: u32 = 20_000;
pub const STEP_SERIES: usize = 512;
/// Rollup chunks (32 intervals of a series each) deleted per step at most.
pub const STEP_CHUNKS: u32 = 1024;

/// How often a retention pass runs: a tenth of the retention, 1 s to 60 s.
pub fn interval(retention: Duration) -> Duration {
    (retention / 10).clamp(Duration::from_secs(1), Duration::from_secs(60))
}

/// Deletes readings older than `retention` (if not zero) and rollup rows
/// older than their `keep` (`rollups`: (every_ms, keep_ms), keep > 0)
/// until `stop`.
pub async fn run(
    ingest: IngestQueue,
    store: Store,
    retention: Duration,
    rollups: Vec<(i64, i64)>,
    stop: CancellationToken,
) {
    let every = rollups
        .iter()
        .map(|&(_, keep)| interval(Duration::from_millis(keep as u64)))
        .chain((!retention.is_zero()).then(|| interval(retention)))
        .min()
        .unwrap_or(Duration::from_secs(60));
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = stop.cancelled() => return,
        }
        match tick(&ingest, &store, retention, &rollups, &stop).await {
            Ok(()) => {}
            Err(PassError::Closed) => return,
            Err(PassError::Failed(e)) => {
                tracing::warn!(error = %e, "retention pass failed; tried again later")
            }
        }
    }
}

/// One round: old rollup chunks, then old readings.
async fn tick(
    ingest: &IngestQueue,
    store: &Store,
    retention: Duration,
    rollups: &[(i64, i64)],
    stop: &CancellationToken,
) -> Result<(), PassError> {
    let now = now_ms();
    let chunks = prune_rollups(ingest, rollups, now, stop).await?;
    if chunks > 0 {
        tracing::debug!(chunks, "retention deleted old rollup chunks");
    }
    if !retention.is_zero() {
        let cutoff = now.saturating_sub(retention.as_millis() as i64);
        let deleted = pass(ingest, store, cutoff, stop).await?;
        if deleted > 0 {
            tracing::debug!(deleted, "retention deleted old readings");
        }
    }
    Ok(())
}

/// Deletes rollup chunks older than their rollup's `keep`, in steps.
async fn prune_rollups(
    ingest: &IngestQueue,
    rollups: &[(i64, i64)],
    now: i64,
    stop: &CancellationToken,
) -> Result<u64, PassError> {
    if rollups.is_empty() {
        return Ok(0);
    }
    let cutoffs: Vec<(i64, i64)> = rollups
        .iter()
        // Whole intervals older than `keep` go.
        .map(|&(every, keep)| (every, now.saturating_sub(keep).saturating_sub(every)))
        .collect();
    let mut deleted = 0;
    while !stop.is_cancelled() {
        let step = RetainStep {
            cutoff_ms: i64::MIN,
            limit: STEP_CHUNKS,
            staged: false,
            series: Vec::new(),
            rollups: cutoffs.clone(),
        };
        let done = match ingest.retain(step).await {
            Ok(done) => done,
            Err(IngestError::Closed) => return Err(PassError::Closed),
            Err(e) => return Err(PassError::Failed(e.to_string())),
        };
        deleted += done.rollup_chunks;
        if done.rollups_done {
            break;
        }
    }
    Ok(deleted)
}

enum PassError {
    Closed,
    Failed(String),
}

/// One pass: the staging table, then every series with old readings, in
/// steps of at most `STEP_SERIES` series and `STEP_ROWS` readings.
async fn pass(
    ingest: &IngestQueue,
    store: &Store,
    cutoff_ms: i64,
    stop: &CancellationToken,
) -> Result<u64, PassError> {
    // PostgreSQL: whole months first, beside ingest (nothing on SQLite).
    let mut deleted = match store.drop_old_partitions(cutoff_ms).await {
        Ok(n) => n,
        Err(e) => {
            tracing::warn!(error = %e, "cannot drop old months of blocks; tried again next pass");
            0
        }
    };
    let mut series: VecDeque<_> = store
        .series_older_than(cutoff_ms)
        .await
        .map_err(|e| PassError::Failed(e.to_string()))?
        .into();
    let mut staged = true;
    while staged || !series.is_empty() {
        if stop.is_cancelled() {
            break;
        }
        let step = RetainStep {
            cutoff_ms,
            limit: STEP_ROWS,
            staged,
            series: series.iter().take(STEP_SERIES).copied().collect(),
            rollups: Vec::new(),
        };
        let done = match ingest.retain(step).await {
            Ok(done) => done,
            Err(IngestError::Closed) => return Err(PassError::Closed),
            Err(e) => return Err(PassError::Failed(e.to_string())),
        };
        deleted += done.deleted;
        staged &= !done.staged_done;
        series.drain(..done.series_done.min(series.len()));
    }
    Ok(deleted)
}
