//! Reading queries: keyset paging per sensor, merged by time, or folded into
//! time buckets. Memory holds at most one page per sensor, whatever the size
//! of the result, and no read transaction stays open between pages.

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
    let sensors = match &q.sensor {
        Some(name) => match store.sensor_key(name).await? {
            Some(key) => vec![(key, name.clone())],
            None => Vec::new(),
        },
        None => store.device_sensors(q.device).await?,
    };
    let start = ReadingCursor {
        ts_ms: q.since_ms.unwrap_or(i64::MIN),
        seq: 0,
    };
    let mut cursors: Vec<SensorCursor> = sensors
        .into_iter()
        .map(|(key, name)| SensorCursor {
            key,
            name,
            after: start,
            page: VecDeque::new(),
            exhausted: false,
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
    page: VecDeque<ReadingPoint>,
    exhausted: bool,
}

impl SensorCursor {
    /// The next reading, fetching a page when the buffer is empty.
    async fn peek(
        &mut self,
        store: &Store,
        q: &ReadingQuery,
    ) -> Result<Option<ReadingPoint>, StoreError> {
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
        Ok(self.page.front().copied())
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
        cursors[i].page.pop_front();
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
            cursor.page.pop_front();
            let start = p.ts_ms.div_euclid(width) * width;
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
