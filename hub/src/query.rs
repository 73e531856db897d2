//! Reading queries over compressed blocks, merged by time or folded into
//! time buckets. Memory holds at most a page of blocks per sensor (each a
//! few KiB, decoded one at a time as the merge reaches it) plus the
//! device's staged readings (bounded by storage.compact_rows), whatever the
//! size of the result, and no read transaction stays open between pages.
//!
//! The staged readings are read first, the blocks after. Compaction and
//! merges may rewrite blocks meanwhile: each page also fetches every block
//! created since the previous page (`BlockCursor::high`), and a reading at
//! or before the last one handed out is dropped, so each reading comes out
//! once and none is missed. A bucket query folds a block that lies inside
//! one bucket, and overlaps nothing else, from its header without decoding
//! it.

use std::collections::VecDeque;

use tokio::sync::mpsc;

use crate::domain::{Bucket, DeviceKey, ReadingQuery, SensorKey, StoredReading};
use crate::store::blocks::{BlockCursor, BlockRow};
use crate::store::codec::{self, BlockStats, Point};
use crate::store::{Store, StoreError};

/// Blocks read from SQLite per page.
const PAGE_BLOCKS: u32 = 16;
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
    let mut cursors: Vec<SensorCursor> = sensors
        .into_iter()
        .map(|(key, name)| {
            // `staged` is ordered by sensor: split off this sensor's run.
            let first = staged.partition_point(|(k, _)| *k < key);
            let end = staged.partition_point(|(k, _)| *k <= key);
            let mine: VecDeque<Point> = staged.drain(first..end).map(|(_, p)| p).collect();
            SensorCursor {
                device: q.device,
                key,
                name,
                since,
                until,
                cursor: BlockCursor::START,
                pending: VecDeque::new(),
                exhausted: false,
                active: Vec::new(),
                staged: mine,
                emitted: None,
            }
        })
        .collect();
    let limit = if q.limit == 0 { u64::MAX } else { q.limit };
    match q.bucket_ms {
        None => merge_rows(store, &mut cursors, limit, out).await,
        Some(width) => fold_buckets(store, &mut cursors, width, limit, out).await,
    }
}

/// One sensor's readings in (ts, seq) order: its staged readings and its
/// blocks, each block decoded once the merge reaches its first reading.
struct SensorCursor {
    device: DeviceKey,
    key: SensorKey,
    name: String,
    since: i64,
    until: i64,
    cursor: BlockCursor,
    /// Blocks fetched and not yet decoded, by (first_ts, id).
    pending: VecDeque<BlockRow>,
    exhausted: bool,
    /// Decoded blocks' readings still to come, each in (ts, seq) order.
    active: Vec<VecDeque<Point>>,
    /// Staged readings, in (ts, seq) order.
    staged: VecDeque<Point>,
    /// The key of the last reading handed out.
    emitted: Option<(i64, u64)>,
}

/// What a bucket fold takes next.
enum Item {
    Point(Point),
    /// A whole block, from its header.
    Block(i64, BlockStats),
}

impl SensorCursor {
    /// The earliest reading of the staged ones and the decoded blocks'
    /// (dropping any at or before the last handed out).
    fn head(&mut self) -> Option<Point> {
        let emitted = self.emitted;
        let seen = |p: &Point| emitted.is_some_and(|e| p.key() <= e);
        let mut best: Option<Point> = None;
        for source in self
            .active
            .iter_mut()
            .chain(std::iter::once(&mut self.staged))
        {
            while source.front().is_some_and(seen) {
                source.pop_front();
            }
            if let Some(p) = source.front()
                && best.is_none_or(|b| p.key() < b.key())
            {
                best = Some(*p);
            }
        }
        self.active.retain(|a| !a.is_empty());
        best
    }

    async fn fetch(&mut self, store: &Store) -> Result<(), StoreError> {
        if self.pending.is_empty() && !self.exhausted {
            let (page, next, full) = store
                .block_page(
                    (self.device, self.key),
                    self.since,
                    self.until,
                    self.cursor,
                    PAGE_BLOCKS,
                )
                .await?;
            self.exhausted = !full;
            self.cursor = next;
            self.pending.extend(page);
        }
        Ok(())
    }

    /// Decodes the front pending block into `active` (its readings inside
    /// the query's range).
    fn activate(&mut self) -> Result<(), StoreError> {
        let Some(block) = self.pending.pop_front() else {
            return Ok(());
        };
        let mut points = codec::decode(&block.data)?;
        let (since, until) = (self.since, self.until);
        points.retain(|p| p.ts_ms >= since && p.ts_ms < until);
        self.active.push(points.into());
        Ok(())
    }

    /// The next reading, not consumed: blocks are decoded until none still
    /// pending can hold an earlier one.
    async fn peek(&mut self, store: &Store) -> Result<Option<Point>, StoreError> {
        loop {
            let head = self.head();
            self.fetch(store).await?;
            match self.pending.front() {
                Some(b) if head.is_none_or(|h| b.first_ts <= h.ts_ms) => self.activate()?,
                _ => return Ok(head),
            }
        }
    }

    /// The next reading, or a whole block that lies inside one bucket of
    /// `width` and overlaps nothing still to come; consumed.
    async fn next_item(&mut self, store: &Store, width: i64) -> Result<Option<Item>, StoreError> {
        loop {
            let head = self.head();
            self.fetch(store).await?;
            let whole = match self.pending.front() {
                Some(b) if head.is_none_or(|h| b.first_ts <= h.ts_ms) => {
                    head.is_none_or(|h| h.ts_ms > b.last_ts) && self.whole_block_fits(b, width)
                }
                _ => return Ok(head.map(|p| self.take(p))),
            };
            if !whole {
                self.activate()?;
            } else if let Some(block) = self.pending.pop_front() {
                let stats = codec::stats(&block.data)?;
                self.emitted = Some((stats.last_ts, stats.last_seq));
                return Ok(Some(Item::Block(block.first_ts, stats)));
            }
        }
    }

    /// Whether `block` (the front of `pending`) can be folded whole: inside
    /// the query's range and one bucket, after what was handed out, and
    /// clear of the next block.
    fn whole_block_fits(&self, block: &BlockRow, width: i64) -> bool {
        let clear_of_next = match self.pending.get(1) {
            Some(next) => next.first_ts > block.last_ts,
            None => false,
        };
        clear_of_next
            && block.first_ts >= self.since
            && block.last_ts < self.until
            && self.emitted.is_none_or(|(ts, _)| block.first_ts > ts)
            && Bucket::start_of(block.first_ts, width) == Bucket::start_of(block.last_ts, width)
    }

    /// Hands out `p` (the head): later copies of it are dropped.
    fn take(&mut self, p: Point) -> Item {
        self.emitted = Some(p.key());
        Item::Point(p)
    }
}

/// Sends a chunk; false when the client has gone.
async fn send(out: &mpsc::Sender<Result<QueryChunk, StoreError>>, chunk: QueryChunk) -> bool {
    out.send(Ok(chunk)).await.is_ok()
}

async fn merge_rows(
    store: &Store,
    cursors: &mut [SensorCursor],
    limit: u64,
    out: &mpsc::Sender<Result<QueryChunk, StoreError>>,
) -> Result<(), StoreError> {
    let mut chunk = Vec::with_capacity(CHUNK_ROWS);
    let mut emitted = 0u64;
    while emitted < limit {
        // Few sensors per device: a linear scan for the earliest head is
        // cheaper than a heap.
        let mut best: Option<(usize, Point)> = None;
        for (i, cursor) in cursors.iter_mut().enumerate() {
            if let Some(p) = cursor.peek(store).await?
                && best.is_none_or(|(_, b)| p.key() < b.key())
            {
                best = Some((i, p));
            }
        }
        let Some((i, point)) = best else { break };
        cursors[i].take(point);
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
    cursors: &mut [SensorCursor],
    width: i64,
    limit: u64,
    out: &mpsc::Sender<Result<QueryChunk, StoreError>>,
) -> Result<(), StoreError> {
    let mut chunk = Vec::with_capacity(CHUNK_ROWS);
    let mut emitted = 0u64;
    'sensors: for cursor in cursors.iter_mut() {
        let mut current: Option<Bucket> = None;
        while let Some(item) = cursor.next_item(store, width).await? {
            let (ts, part) = match item {
                Item::Point(p) => (
                    p.ts_ms,
                    BlockStats {
                        count: 1,
                        last_ts: p.ts_ms,
                        last_seq: p.seq,
                        min: p.value,
                        max: p.value,
                        sum: p.value,
                        first: p.value,
                        last: p.value,
                    },
                ),
                Item::Block(first_ts, stats) => (first_ts, stats),
            };
            let start = Bucket::start_of(ts, width);
            match &mut current {
                Some(b) if b.start_ms == start => {
                    b.count += u64::from(part.count);
                    b.sum += part.sum;
                    b.min = b.min.min(part.min);
                    b.max = b.max.max(part.max);
                    b.last = part.last;
                }
                _ => {
                    let fresh = Bucket {
                        sensor: cursor.name.clone(),
                        start_ms: start,
                        count: u64::from(part.count),
                        sum: part.sum,
                        min: part.min,
                        max: part.max,
                        first: part.first,
                        last: part.last,
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

    fn points(keys: &[(i64, u64)]) -> VecDeque<Point> {
        keys.iter()
            .map(|&(ts_ms, seq)| Point {
                seq,
                ts_ms,
                value: seq as f64,
            })
            .collect()
    }

    #[test]
    fn blocks_and_staged_merge_in_order_and_once() {
        // (20,2) and (30,3) were compacted after the staged rows were read;
        // a merged block repeats (10,1) and (50,5).
        let mut cursor = SensorCursor {
            device: DeviceKey(1),
            key: SensorKey(1),
            name: "t".into(),
            since: i64::MIN,
            until: i64::MAX,
            cursor: BlockCursor::START,
            pending: VecDeque::new(),
            exhausted: true,
            active: vec![
                points(&[(10, 1), (20, 2), (30, 3), (50, 5)]),
                points(&[(10, 1), (50, 5), (70, 7)]),
            ],
            staged: points(&[(20, 2), (30, 3), (40, 4), (60, 6)]),
            emitted: None,
        };
        let mut out = Vec::new();
        while let Some(p) = cursor.head() {
            cursor.take(p);
            out.push(p.seq);
        }
        assert_eq!(out, vec![1, 2, 3, 4, 5, 6, 7]);
    }
}
