//! Live views an operator holds open, whichever door they came through:
//! committed readings as they commit, one command's changes, and the
//! readings answers streamed to a caller. Each holds a slot of one budget
//! shared by every door (`server.max_watches`, `server.max_queries`): over
//! it the caller is told to come back later, never queued.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::broadcast::error::RecvError;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, broadcast, mpsc};
use tokio::time::Instant;

use super::{OpError, Operations};
use crate::commands::Commands;
use crate::domain::{CommandRecord, CommittedBatch, ReadingQuery};
use crate::query::{self, QueryChunk};
use crate::store::StoreError;

/// The hub's budgets of long-lived operator calls.
pub(super) struct Budgets {
    watches: Arc<Semaphore>,
    max_watches: usize,
    queries: Arc<Semaphore>,
    max_queries: usize,
}

impl Budgets {
    pub(super) fn new(max_watches: usize, max_queries: usize) -> Self {
        Self {
            watches: Arc::new(Semaphore::new(max_watches)),
            max_watches,
            queries: Arc::new(Semaphore::new(max_queries)),
            max_queries,
        }
    }
}

/// A slot of `server.max_watches`, held for as long as a live stream is
/// open; given back when dropped.
#[derive(Debug)]
pub struct WatchSlot(#[allow(dead_code)] OwnedSemaphorePermit);

/// What a readings watcher sees next.
#[derive(Debug, Clone)]
pub enum LiveEvent {
    /// A commit's readings (all of them: the door applies its filter).
    Batch(Arc<CommittedBatch>),
    /// The watcher fell behind and missed readings: how many (of every
    /// device), or, when it fell behind before its first batch gave it an
    /// index to count from, only how many commits.
    Missed { readings: Option<u64>, commits: u64 },
}

/// Committed readings from the moment it was made.
pub struct ReadingsWatch {
    batches: broadcast::Receiver<Arc<CommittedBatch>>,
    shutdown: tokio_util::sync::CancellationToken,
    /// Index of the next committed reading expected: a gap is what this
    /// watcher missed.
    expected: Option<u64>,
    /// A batch that came after a gap, told after the gap.
    pending: Option<Arc<CommittedBatch>>,
}

impl ReadingsWatch {
    /// The next event; None once the hub stops publishing or shuts down.
    pub async fn next(&mut self) -> Option<LiveEvent> {
        if let Some(batch) = self.pending.take() {
            return Some(LiveEvent::Batch(batch));
        }
        loop {
            let received = tokio::select! {
                received = self.batches.recv() => received,
                _ = self.shutdown.cancelled() => return None,
            };
            match received {
                Ok(batch) => {
                    let gap = self
                        .expected
                        .filter(|expected| batch.first_index > *expected)
                        .map(|expected| batch.first_index - expected);
                    self.expected = Some(batch.first_index + batch.count);
                    return Some(match gap {
                        Some(readings) => {
                            self.pending = Some(batch);
                            LiveEvent::Missed {
                                readings: Some(readings),
                                commits: 0,
                            }
                        }
                        None => LiveEvent::Batch(batch),
                    });
                }
                Err(RecvError::Lagged(commits)) if self.expected.is_none() => {
                    return Some(LiveEvent::Missed {
                        readings: None,
                        commits,
                    });
                }
                // The gap shows in the next batch's index.
                Err(RecvError::Lagged(_)) => continue,
                Err(RecvError::Closed) => return None,
            }
        }
    }
}

/// One command's state, then each change until it is final (or the
/// caller's timeout, or the hub stops).
pub struct CommandWatch {
    commands: Commands,
    events: broadcast::Receiver<CommandRecord>,
    /// What the watcher was told last; None before the first answer.
    current: Option<CommandRecord>,
    /// The command's state as read when the watch began.
    first: Option<CommandRecord>,
    deadline: Option<Instant>,
    shutdown: tokio_util::sync::CancellationToken,
}

impl CommandWatch {
    /// The command as it is now, then each change; None once it was told
    /// final, at the timeout or when the hub stops.
    pub async fn next(&mut self) -> Result<Option<CommandRecord>, OpError> {
        if let Some(first) = self.first.take() {
            self.current = Some(first.clone());
            return Ok(Some(first));
        }
        let Some(last) = &self.current else {
            return Ok(None);
        };
        if last.state.is_final() {
            return Ok(None);
        }
        let id = last.command_id.clone();
        loop {
            let far = Instant::now() + Duration::from_secs(86_400);
            let next = tokio::select! {
                event = self.events.recv() => event,
                _ = tokio::time::sleep_until(self.deadline.unwrap_or(far)) => return Ok(None),
                _ = self.shutdown.cancelled() => return Ok(None),
            };
            let rec = match next {
                Ok(rec) if rec.command_id == id => rec,
                Ok(_) => continue,
                // Missed changes: the log has the truth.
                Err(RecvError::Lagged(_)) => match self.commands.get(&id).await {
                    Ok((rec, _)) if self.current.as_ref() != Some(&rec) => rec,
                    Ok(_) => continue,
                    Err(e) => return Err(e.into()),
                },
                Err(RecvError::Closed) => return Ok(None),
            };
            self.current = Some(rec.clone());
            return Ok(Some(rec));
        }
    }
}

/// A readings answer being produced: its chunks in order, then the end of
/// the channel. Its task holds a slot of `server.max_queries` until it
/// ends (a dropped `QueryRun` ends it at its next chunk).
pub struct QueryRun {
    pub chunks: mpsc::Receiver<Result<QueryChunk, StoreError>>,
    /// The query's task: whether it ended normally (not by a panic) tells a
    /// whole answer from a cut-short one.
    task: Option<tokio::task::JoinHandle<()>>,
}

impl QueryRun {
    /// Once `chunks` has closed: whether the query ended normally, so the
    /// answer is whole (a panic cut it short; that is logged here).
    pub async fn ended_whole(&mut self) -> bool {
        match self.task.take() {
            Some(task) => match task.await {
                Ok(()) => true,
                Err(e) => {
                    tracing::error!(error = %e, "a readings query failed");
                    false
                }
            },
            None => true,
        }
    }
}

impl Operations {
    /// A slot for a live stream, or Busy when every one is taken.
    pub fn watch_slot(&self) -> Result<WatchSlot, OpError> {
        Arc::clone(&self.budgets.watches)
            .try_acquire_owned()
            .map(WatchSlot)
            .map_err(|_| {
                OpError::Busy(format!(
                    "{} live streams are open (server.max_watches, over every door); try again later",
                    self.budgets.max_watches
                ))
            })
    }

    /// Committed readings from now on, for the holder of `_slot`.
    pub fn watch_readings(&self, _slot: &WatchSlot) -> ReadingsWatch {
        ReadingsWatch {
            batches: self.fanout.subscribe(),
            shutdown: self.shutdown.clone(),
            expected: None,
            pending: None,
        }
    }

    /// A command's state and its changes until final, for the holder of
    /// `_slot`; `timeout` ends the watch early.
    pub async fn watch_command(
        &self,
        _slot: &WatchSlot,
        command_id: &str,
        timeout: Option<Duration>,
    ) -> Result<CommandWatch, OpError> {
        // Subscribe before reading the current state, so no change falls
        // in between.
        let events = self.commands.subscribe();
        let (first, _) = self.commands.get(command_id).await?;
        Ok(CommandWatch {
            commands: self.commands.clone(),
            events,
            current: None,
            first: Some(first),
            deadline: timeout.map(|t| Instant::now() + t),
            shutdown: self.shutdown.clone(),
        })
    }

    /// A slot of `server.max_queries`, for a readings read made here
    /// rather than by [`Operations::run_query`]; Busy when none is free.
    pub(super) fn query_slot(&self) -> Result<OwnedSemaphorePermit, OpError> {
        Arc::clone(&self.budgets.queries)
            .try_acquire_owned()
            .map_err(|_| {
                OpError::Busy(format!(
                    "{} readings answers are being sent (server.max_queries, over every door); \
                     try again shortly",
                    self.budgets.max_queries
                ))
            })
    }

    /// Starts answering a checked readings query (see
    /// [`Operations::readings_query`]) on the hub's tracker; Busy when
    /// `server.max_queries` answers are being sent already.
    pub fn run_query(&self, q: ReadingQuery) -> Result<QueryRun, OpError> {
        let slot = self.query_slot()?;
        let (tx, chunks) = mpsc::channel(4);
        let store = self.store.clone();
        let task = self.tracker.spawn(async move {
            let _slot = slot;
            query::run(store, q, tx).await;
        });
        Ok(QueryRun {
            chunks,
            task: Some(task),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::DeviceReadings;

    fn batch(first_index: u64, count: u64) -> Arc<CommittedBatch> {
        Arc::new(CommittedBatch {
            first_index,
            count,
            devices: Vec::<DeviceReadings>::new(),
        })
    }

    fn watch(capacity: usize) -> (broadcast::Sender<Arc<CommittedBatch>>, ReadingsWatch) {
        let (tx, rx) = broadcast::channel(capacity);
        let watch = ReadingsWatch {
            batches: rx,
            shutdown: tokio_util::sync::CancellationToken::new(),
            expected: None,
            pending: None,
        };
        (tx, watch)
    }

    #[tokio::test]
    async fn a_watcher_is_told_what_it_missed_then_goes_on() {
        let (tx, mut w) = watch(2);
        tx.send(batch(0, 10)).unwrap();
        assert!(matches!(w.next().await, Some(LiveEvent::Batch(b)) if b.first_index == 0));
        // Three more commits into a buffer of two: one is lost.
        for i in 1..=3 {
            tx.send(batch(i * 10, 10)).unwrap();
        }
        assert!(matches!(
            w.next().await,
            Some(LiveEvent::Missed {
                readings: Some(10),
                commits: 0
            })
        ));
        assert!(matches!(w.next().await, Some(LiveEvent::Batch(b)) if b.first_index == 20));
        assert!(matches!(w.next().await, Some(LiveEvent::Batch(b)) if b.first_index == 30));
        drop(tx);
        assert!(w.next().await.is_none());
    }

    #[tokio::test]
    async fn lag_before_the_first_batch_is_told_in_commits() {
        let (tx, mut w) = watch(1);
        tx.send(batch(0, 5)).unwrap();
        tx.send(batch(5, 5)).unwrap();
        assert!(matches!(
            w.next().await,
            Some(LiveEvent::Missed {
                readings: None,
                commits: 1
            })
        ));
        assert!(matches!(w.next().await, Some(LiveEvent::Batch(b)) if b.first_index == 5));
    }
}
