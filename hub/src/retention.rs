//! Retention: readings older than `storage.retention` are deleted in the
//! background, a few thousand at a time, each step a small part of one of
//! the writer's group commits (the one writer), so ingest never waits for
//! a long delete. Final commands older than `commands.retention` are
//! deleted by the commands task the same way.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::domain::now_ms;
use crate::ingest::{IngestError, IngestQueue, RetainTarget};
use crate::store::Store;

/// Readings deleted per step.
pub const STEP: u32 = 2_000;

/// How often a retention pass runs: a tenth of the retention, 1 s to 60 s.
pub fn interval(retention: Duration) -> Duration {
    (retention / 10).clamp(Duration::from_secs(1), Duration::from_secs(60))
}

/// Deletes readings older than `retention` until `stop`.
pub async fn run(ingest: IngestQueue, store: Store, retention: Duration, stop: CancellationToken) {
    let every = interval(retention);
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = stop.cancelled() => return,
        }
        let cutoff = now_ms().saturating_sub(retention.as_millis() as i64);
        match pass(&ingest, &store, cutoff, &stop).await {
            Ok(0) => {}
            Ok(deleted) => tracing::info!(deleted, "retention deleted old readings"),
            Err(PassError::Closed) => return,
            Err(PassError::Failed(e)) => {
                tracing::warn!(error = %e, "retention pass failed; tried again later")
            }
        }
    }
}

enum PassError {
    Closed,
    Failed(String),
}

/// One pass: the staging table, then every series with old readings.
async fn pass(
    ingest: &IngestQueue,
    store: &Store,
    cutoff_ms: i64,
    stop: &CancellationToken,
) -> Result<u64, PassError> {
    let step = |target| async move {
        match ingest.retain(target, cutoff_ms, STEP).await {
            Ok(n) => Ok(n),
            Err(IngestError::Closed) => Err(PassError::Closed),
            Err(e) => Err(PassError::Failed(e.to_string())),
        }
    };
    let mut deleted = 0;
    let series = store
        .series_older_than(cutoff_ms)
        .await
        .map_err(|e| PassError::Failed(e.to_string()))?;
    let targets = std::iter::once(RetainTarget::Staged)
        .chain(series.into_iter().map(|(d, s)| RetainTarget::Series(d, s)));
    for target in targets {
        loop {
            if stop.is_cancelled() {
                return Ok(deleted);
            }
            let n = step(target).await?;
            deleted += n;
            if n < u64::from(STEP) {
                break;
            }
        }
    }
    Ok(deleted)
}
