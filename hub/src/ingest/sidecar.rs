//! PostgreSQL: the ingest writer's second connection, for block work.
//!
//! On PostgreSQL a compaction takes its part as the database holds it
//! (`COPY (DELETE … RETURNING …)`), whichever hub staged the rows, so it
//! needs nothing of the writer's memory, and staging goes on safely while
//! it runs (other hubs stage into the same tables meanwhile anyway). Run on
//! the writer's own connection, every compaction held the next group
//! commit for as long as it took: 150-200 ms for a part of 100,000 rows,
//! two thirds of the writer's time at saturation. The sidecar runs
//! compactions and merge steps on a connection of its own, one job at a
//! time, on a thread of its own (a compaction's decoding and encoding
//! would hold one of the shared runtime's workers, and its statements'
//! wake-ups would queue behind the sessions', as the writer's did), while
//! the writer goes on committing groups. The writer
//! decides what to run and applies what comes back (its staging counts,
//! the merge plan, the retry waits); see `Writer::start_block_work`.

use anyhow::Context;
use tokio::runtime::Handle;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::config::{Backend, StorageSettings};
use crate::store::blocks::{Merged, Series};
use crate::store::{self, StoreError, StoreWriter};

/// Work for the sidecar's connection.
pub(crate) enum Job {
    /// Compact one staging part.
    Compact(usize),
    /// Merge these (series, level) in one transaction.
    Merge(Vec<(Series, u8)>),
}

/// What a job did.
pub(crate) enum Done {
    /// The (series, level) of the blocks written.
    Compacted(Result<Vec<(Series, u8)>, StoreError>),
    Merged(Result<Vec<Merged>, StoreError>),
}

pub(crate) struct Sidecar {
    /// The sidecar thread's runtime: the connection was opened on it, and
    /// jobs run on it.
    runtime: Handle,
    /// Dropped with the sidecar: the thread then ends.
    _thread: oneshot::Sender<()>,
    /// The connection while no job runs...
    idle: Option<StoreWriter>,
    /// ...and the job holding it otherwise (it hands it back).
    running: Option<JoinHandle<(StoreWriter, Done)>>,
    /// The last job started was a compaction.
    last_compacted: bool,
}

impl Sidecar {
    /// PostgreSQL: starts the sidecar's thread and opens its connection
    /// there. None on SQLite.
    pub(crate) async fn open(settings: &StorageSettings) -> anyhow::Result<Option<Self>> {
        if settings.backend != Backend::Postgres {
            return Ok(None);
        }
        let settings = settings.clone();
        let (opened_tx, opened) = oneshot::channel();
        let (keep, ended) = oneshot::channel::<()>();
        // Detached: the thread ends once `keep` is dropped with the sidecar.
        let _thread = crate::app::spawn_on_own_thread("hub-blocks", async move {
            let store = store::open_sidecar(&settings).await;
            let open = matches!(store, Ok(Some(_)));
            let store = store
                .map_err(anyhow::Error::from)
                .and_then(|s| s.context("not a PostgreSQL store"))
                .map(|s| (s, Handle::current()));
            let _ = opened_tx.send(store);
            if open {
                // Jobs run on this runtime until the sidecar is dropped.
                let _ = ended.await;
            }
        })
        .context("cannot start the block work's thread")?;
        let (store, runtime) = opened
            .await
            .context("the block work's thread ended before it started")??;
        Ok(Some(Self {
            runtime,
            _thread: keep,
            idle: Some(store),
            running: None,
            last_compacted: false,
        }))
    }

    pub fn is_idle(&self) -> bool {
        self.idle.is_some()
    }

    pub fn is_running(&self) -> bool {
        self.running.is_some()
    }

    /// False once a job panicked and took the connection with it: the
    /// writer does the block work itself from then on.
    pub fn is_alive(&self) -> bool {
        self.idle.is_some() || self.running.is_some()
    }

    pub fn last_compacted(&self) -> bool {
        self.last_compacted
    }

    /// Starts `job` if the connection is free; false if a job runs.
    pub fn start(&mut self, job: Job) -> bool {
        let Some(mut store) = self.idle.take() else {
            return false;
        };
        self.last_compacted = matches!(job, Job::Compact(_));
        self.running = Some(self.runtime.spawn(async move {
            let done = match job {
                Job::Compact(part) => Done::Compacted(store.compact_taking(part).await),
                Job::Merge(jobs) => Done::Merged(store.merge(&jobs).await),
            };
            if matches!(&done, Done::Compacted(Err(_)) | Done::Merged(Err(_))) {
                store.abort().await;
            }
            (store, done)
        }));
        true
    }

    /// The running job's outcome once it ends; None at once if no job
    /// runs, or if it panicked. Cancel-safe: dropped before the job ends,
    /// it leaves the job running.
    pub async fn finished(&mut self) -> Option<Done> {
        let job = self.running.as_mut()?;
        let ended = job.await;
        self.running = None;
        match ended {
            Ok((store, done)) => {
                self.idle = Some(store);
                Some(done)
            }
            Err(e) => {
                tracing::error!(error = %e, "the block work's task ended abnormally; the writer takes the work over");
                None
            }
        }
    }

    /// The job's outcome if it has ended, without waiting.
    pub async fn try_finished(&mut self) -> Option<Done> {
        if self.running.as_ref().is_some_and(JoinHandle::is_finished) {
            self.finished().await
        } else {
            None
        }
    }

    /// Waits for a running job, then closes the connection (on its own
    /// runtime) and ends the thread.
    pub async fn close(mut self) -> Option<Done> {
        let done = self.finished().await;
        if let Some(store) = self.idle.take() {
            match self.runtime.spawn(store.close()).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "closing the block work's connection failed")
                }
                Err(e) => tracing::warn!(error = %e, "closing the block work's connection failed"),
            }
        }
        done
    }
}

/// `sidecar`'s running job's outcome; never ready while no job runs (for
/// `select!`).
pub(super) async fn job_ended(sidecar: &mut Option<Sidecar>) -> Option<Done> {
    match sidecar {
        Some(s) if s.is_running() => s.finished().await,
        _ => std::future::pending().await,
    }
}
