//! Reading queries: keyset paging per sensor, merged by time, or folded into
//! time buckets. Memory holds at most one page per sensor plus the device's
//! staged readings (bounded by storage.compact_rows), whatever the size of
//! the result, and no read transaction stays open between pages.
//!
//! The staged readings are read first, the clustered pages after: a reading
//! a compaction moves in between shows up in both and is merged once (same
//! (ts, seq)); none can be missed.

use std::collections::VecDeque;

use tokio::sync::mpsc;

use crate::domain::{Bucket, ReadingQuery, SensorKey, StoredReading};
use crate::store::{ReadingCursor, ReadingPoint, Store, StoreError};

/// Rows read from SQLite per query.
const PAGE_ROWS: u32 = 2048;
/// Rows or buckets per chunk sent to the client.
const CHUNK_ROWS: usize = 1024;

#[derive(Debug)]
pub enum QueryChunk {
    Rows(Vec<StoredReading>),
    Buckets(Vec<Bucket>),
}

/// Runs a query, sending chunks until done, the limit is reached or the
/// receiver is gone. The caller resolved `q.device` already.
pub async fn run(store: Store, q: ReadingQuery, out: mpsc::Sender<Result<QueryChunk, StoreError>>) {
    if let Err(e) = stream(&store, &q, &out).await {
        let _ = out.send(Err(e)).await;
    }
}

async fn stream(
    store: &Store,
    q: &ReadingQuery,
    out: &mpsc::Sender<Result<QueryChunk, StoreError>>,
) -> Result<(), StoreError> {
    let only = match &q.sensor {
        Some(name) => match store.sensor_key(name).await? {
            Some(key) => Some(key),
            None => return Ok(()),
        },
        None => None,
    };
    let since = q.since_ms.unwrap_or(i64::MIN);
    let until = q.until_ms.unwrap_or(i64::MAX);
    let mut staged = store.staged_readings(q.device, only, since, until).await?;
    let sensors = match (only, &q.sensor) {
        (Some(key), Some(name)) => vec![(key, name.clone())],
        _ => store.device_sensors(q.device).await?,
    };
    let start = ReadingCursor {
        ts_ms: since,
        seq: 0,
    };
    let mut cursors: Vec<SensorCursor> = sensors
        .into_iter()
        .map(|(key, name)| {
            // `staged` is ordered by sensor: split off this sensor's run.
            let first = staged.partition_point(|(k, _)| *k < key);
            let end = staged.partition_point(|(k, _)| *k <= key);
            let mine: VecDeque<ReadingPoint> = staged.drain(first..end).map(|(_, p)| p).collect();
            SensorCursor {
                key,
                name,
                after: start,
                page: VecDeque::new(),
                exhausted: false,
                staged: mine,
            }
        })
        .collect();
    let limit = if q.limit == 0 { u64::MAX } else { q.limit };
    match q.bucket_ms {
        None => merge_rows(store, q, &mut cursors, limit, out).await,
        Some(width) => fold_buckets(store, q, &mut cursors, width, limit, out).await,
    }
}

struct SensorCursor {
    key: SensorKey,
    name: String,
    after: ReadingCursor,
    /// The current page of the clustered table.
    page: VecDeque<ReadingPoint>,
    exhausted: bool,
    /// This sensor's staged readings, ordered by (ts, seq).
    staged: VecDeque<ReadingPoint>,
}

fn key(p: &ReadingPoint) -> (i64, u64) {
    (p.ts_ms, p.seq)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    Clustered,
    Staged,
}

/// The earlier of the two heads. A staged reading equal to the clustered
/// head was moved by a compaction after we read it: it is dropped, so each
/// reading comes out once.
fn merged_head(
    page: &VecDeque<ReadingPoint>,
    staged: &mut VecDeque<ReadingPoint>,
) -> Option<(ReadingPoint, Side)> {
    while let (Some(p), Some(s)) = (page.front(), staged.front())
        && key(p) == key(s)
    {
        staged.pop_front();
    }
    match (page.front(), staged.front()) {
        (Some(p), Some(s)) if key(s) < key(p) => Some((*s, Side::Staged)),
        (Some(p), _) => Some((*p, Side::Clustered)),
        (None, Some(s)) => Some((*s, Side::Staged)),
        (None, None) => None,
    }
}

impl SensorCursor {
    /// The next reading (clustered and staged merged), fetching a page when
    /// the buffer is empty.
    async fn peek(
        &mut self,
        store: &Store,
        q: &ReadingQuery,
    ) -> Result<Option<ReadingPoint>, StoreError> {
        self.fill(store, q).await?;
        Ok(merged_head(&self.page, &mut self.staged).map(|(p, _)| p))
    }

    /// Consumes what [`SensorCursor::peek`] returned.
    fn advance(&mut self) {
        match merged_head(&self.page, &mut self.staged) {
            Some((_, Side::Staged)) => self.staged.pop_front(),
            _ => self.page.pop_front(),
        };
    }

    /// Fetches the next page of the clustered table when the current one is
    /// used up.
    async fn fill(&mut self, store: &Store, q: &ReadingQuery) -> Result<(), StoreError> {
        if self.page.is_empty() && !self.exhausted {
            let until = q.until_ms.unwrap_or(i64::MAX);
            let page = store
                .reading_page(q.device, self.key, self.after, until, PAGE_ROWS)
                .await?;
            self.exhausted = page.len() < PAGE_ROWS as usize;
            if let Some(last) = page.last() {
                self.after = ReadingCursor {
                    ts_ms: last.ts_ms,
                    seq: last.seq as i64,
                };
            }
            self.page.extend(page);
        }
        Ok(())
    }
}

/// Sends a chunk; false when the client has gone.
async fn send(out: &mpsc::Sender<Result<QueryChunk, StoreError>>, chunk: QueryChunk) -> bool {
    out.send(Ok(chunk)).await.is_ok()
}

async fn merge_rows(
    store: &Store,
    q: &ReadingQuery,
    cursors: &mut [SensorCursor],
    limit: u64,
    out: &mpsc::Sender<Result<QueryChunk, StoreError>>,
) -> Result<(), StoreError> {
    let mut chunk = Vec::with_capacity(CHUNK_ROWS);
    let mut emitted = 0u64;
    while emitted < limit {
        // Few sensors per device: a linear scan for the earliest head is
        // cheaper than a heap.
        let mut best: Option<(usize, ReadingPoint)> = None;
        for (i, cursor) in cursors.iter_mut().enumerate() {
            if let Some(p) = cursor.peek(store, q).await?
                && best.is_none_or(|(_, b)| (p.ts_ms, p.seq) < (b.ts_ms, b.seq))
            {
                best = Some((i, p));
            }
        }
        let Some((i, point)) = best else { break };
        cursors[i].advance();
        chunk.push(StoredReading {
            sensor: cursors[i].name.clone(),
            seq: point.seq,
            ts_ms: point.ts_ms,
            value: point.value,
        });
        emitted += 1;
        if chunk.len() == CHUNK_ROWS
            && !send(out, QueryChunk::Rows(std::mem::take(&mut chunk))).await
        {
            return Ok(());
        }
    }
    if !chunk.is_empty() {
        send(out, QueryChunk::Rows(chunk)).await;
    }
    Ok(())
}

async fn fold_buckets(
    store: &Store,
    q: &ReadingQuery,
    cursors: &mut [SensorCursor],
    width: i64,
    limit: u64,
    out: &mpsc::Sender<Result<QueryChunk, StoreError>>,
) -> Result<(), StoreError> {
    let mut chunk = Vec::with_capacity(CHUNK_ROWS);
    let mut emitted = 0u64;
    'sensors: for cursor in cursors.iter_mut() {
        let mut current: Option<Bucket> = None;
        while let Some(p) = cursor.peek(store, q).await? {
            cursor.advance();
            let start = Bucket::start_of(p.ts_ms, width);
            match &mut current {
                Some(b) if b.start_ms == start => {
                    b.count += 1;
                    b.sum += p.value;
                    b.min = b.min.min(p.value);
                    b.max = b.max.max(p.value);
                    b.last = p.value;
                }
                _ => {
                    let fresh = Bucket {
                        sensor: cursor.name.clone(),
                        start_ms: start,
                        count: 1,
                        sum: p.value,
                        min: p.value,
                        max: p.value,
                        first: p.value,
                        last: p.value,
                    };
                    if let Some(done) = current.replace(fresh) {
                        chunk.push(done);
                        emitted += 1;
                        if emitted >= limit {
                            break 'sensors;
                        }
                        if chunk.len() == CHUNK_ROWS
                            && !send(out, QueryChunk::Buckets(std::mem::take(&mut chunk))).await
                        {
                            return Ok(());
                        }
                    }
                }
            }
        }
        if let Some(done) = current {
            chunk.push(done);
            emitted += 1;
            if emitted >= limit {
                break;
            }
        }
    }
    if !chunk.is_empty() {
        send(out, QueryChunk::Buckets(chunk)).await;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn points(keys: &[(i64, u64)]) -> VecDeque<ReadingPoint> {
        keys.iter()
            .map(|&(ts_ms, seq)| ReadingPoint {
                seq,
                ts_ms,
                value: seq as f64,
            })
            .collect()
    }

    #[test]
    fn clustered_and_staged_merge_in_order_and_once() {
        // (20,2) and (30,3) were compacted after the staged rows were read.
        let mut page = points(&[(10, 1), (20, 2), (30, 3), (50, 5)]);
        let mut staged = points(&[(20, 2), (30, 3), (40, 4), (60, 6)]);
        let mut out = Vec::new();
        while let Some((p, side)) = merged_head(&page, &mut staged) {
            out.push(p.seq);
            match side {
                Side::Staged => staged.pop_front(),
                Side::Clustered => page.pop_front(),
            };
        }
        assert_eq!(out, vec![1, 2, 3, 4, 5, 6]);
    }
}
