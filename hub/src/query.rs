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

use std::collections::{HashMap, VecDeque};

use tokio::sync::mpsc;

use crate::domain::{Bucket, DeviceKey, ReadingQuery, SensorKey, StoredReading, now_ms};
use crate::store::blocks::{BlockCursor, BlockRow};
use crate::store::codec::{self, BlockStats, Point};
use crate::store::rollups::{self, Agg, ReadyRollup};
use crate::store::snapshot::{RollupSpan, SnapshotItem, SnapshotRead};
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
            SensorCursor::new(q.device, key, name, since, until, mine)
        })
        .collect();
    let limit = if q.limit == 0 { u64::MAX } else { q.limit };
    match q.bucket_ms {
        None => merge_rows(store, &mut cursors, limit, out).await,
        Some(width) => {
            let plan = RollupPlan::choose(store, width, since, until, now_ms()).await?;
            if let Some(plan) = &plan {
                tracing::debug!(
                    every_ms = plan.every_ms,
                    width,
                    "bucket query reads a rollup"
                );
            }
            let mut emit = Emitter {
                out,
                chunk: Vec::with_capacity(CHUNK_ROWS),
                emitted: 0,
                limit,
            };
            for cursor in cursors {
                if !fold_sensor(store, cursor, width, plan, &mut emit).await? {
                    return Ok(());
                }
            }
            emit.flush().await;
            Ok(())
        }
    }
}

/// Why a snapshot read stopped early.
enum Stop {
    Store(StoreError),
    /// More than the caller's budget.
    Budget,
}

impl From<StoreError> for Stop {
    fn from(e: StoreError) -> Self {
        Stop::Store(e)
    }
}

impl From<codec::CodecError> for Stop {
    fn from(e: codec::CodecError) -> Self {
        Stop::Store(e.into())
    }
}

/// The snapshot read's result: None when it went over the budget.
fn within_budget<T>(read: Result<T, Stop>) -> Result<Option<T>, StoreError> {
    match read {
        Ok(t) => Ok(Some(t)),
        Err(Stop::Store(e)) => Err(e),
        Err(Stop::Budget) => Ok(None),
    }
}

/// One sensor's readings of each of `devices` stamped in [since, until),
/// each device's in (ts, seq) order: what [`run`] gives per series, read
/// from one snapshot with a few statements for them all
/// ([`Store::sensor_snapshot`]). None when they are more than `budget`
/// (the read stops there).
pub async fn sensor_readings(
    store: &Store,
    sensor: SensorKey,
    devices: &[DeviceKey],
    since: i64,
    until: i64,
    budget: usize,
) -> Result<Option<HashMap<DeviceKey, Vec<Point>>>, StoreError> {
    let mut series: HashMap<DeviceKey, Vec<Point>> =
        devices.iter().map(|d| (*d, Vec::new())).collect();
    let mut held = 0usize;
    let mut scratch = Vec::new();
    let read = SnapshotRead {
        sensor,
        since_ms: since,
        until_ms: until,
        bucket_ms: None,
    };
    let done = store
        .sensor_snapshot(
            &read,
            devices,
            |_| None,
            |item| {
                match item {
                    SnapshotItem::Staged(device, p) => {
                        series.entry(device).or_default().push(p);
                        held += 1;
                    }
                    SnapshotItem::Block { device, data, .. } => {
                        scratch.clear();
                        codec::decode_into(&data, &mut scratch)?;
                        let in_range = scratch
                            .iter()
                            .filter(|p| p.ts_ms >= since && p.ts_ms < until);
                        let points = series.entry(device).or_default();
                        let had = points.len();
                        points.extend(in_range);
                        held += points.len() - had;
                    }
                    SnapshotItem::Chunk { .. }
                    | SnapshotItem::StagedBucket { .. }
                    | SnapshotItem::Rollup(_) => {}
                }
                if held > budget {
                    return Err(Stop::Budget);
                }
                Ok(())
            },
        )
        .await;
    if within_budget(done)?.is_none() {
        return Ok(None);
    }
    for points in series.values_mut() {
        // Blocks of one series may overlap in time (late readings): one
        // order, and each reading once.
        points.sort_unstable_by_key(Point::key);
        points.dedup_by_key(|p| p.key());
    }
    Ok(Some(series))
}

/// One sensor's buckets of `width` over [since, until) (`since` a multiple
/// of it) for each of `devices`, each device's in time order, empty ones
/// left out: what [`run`] gives per series, read from one snapshot. A
/// ready rollup whose interval divides `width` answers where it can (its
/// intervals plus the staged readings, which no rollup holds yet); the
/// rest is folded from blocks, from a block's header where it lies inside
/// one bucket and overlaps no other reading. None when the buckets are
/// more than `budget`.
pub async fn sensor_buckets(
    store: &Store,
    sensor: SensorKey,
    devices: &[DeviceKey],
    (since, until): (i64, i64),
    width: i64,
    budget: usize,
) -> Result<Option<HashMap<DeviceKey, Vec<Bucket>>>, StoreError> {
    let width = width.max(1);
    let now = now_ms();
    let mut folds: HashMap<DeviceKey, SeriesFold> = HashMap::new();
    let mut scratch = Vec::new();
    let mut held = 0usize;
    let read = SnapshotRead {
        sensor,
        since_ms: since,
        until_ms: until,
        bucket_ms: Some(width),
    };
    let mut range = Range {
        since,
        until,
        width,
        span: None,
    };
    // The device whose blocks came last (they come device by device).
    let mut last_device: Option<DeviceKey> = None;
    let choose = |ready: &[ReadyRollup]| RollupPlan::pick(ready, width, since, until, now);
    let done = store
        .sensor_snapshot(&read, devices, choose, |item| {
            match item {
                SnapshotItem::Rollup(span) => range.span = span,
                SnapshotItem::StagedBucket {
                    device,
                    start_ms,
                    agg,
                } => {
                    let fold = folds.entry(device).or_default();
                    fold.staged.push((agg.first_key.0, agg.last_key.0));
                    held += fold.add(width, start_ms, &agg);
                }
                SnapshotItem::Staged(device, p) => {
                    let fold = folds.entry(device).or_default();
                    fold.staged.push((p.ts_ms, p.ts_ms));
                    held += fold.add(width, p.ts_ms, &Agg::of(&p));
                }
                SnapshotItem::Block {
                    device,
                    first_ts,
                    last_ts,
                    data,
                } => {
                    // The previous device's blocks are all in: its last one
                    // held back can be judged.
                    if let Some(previous) = last_device.filter(|d| *d != device)
                        && let Some(fold) = folds.get_mut(&previous)
                        && let Some(before) = fold.waiting.take()
                    {
                        held += fold.block(&range, before, None, &mut scratch)?;
                    }
                    last_device = Some(device);
                    let fold = folds.entry(device).or_default();
                    // The block before this one can be judged now: every
                    // later block starts at or after this one.
                    if let Some(before) = fold.waiting.take() {
                        held += fold.block(&range, before, Some(first_ts), &mut scratch)?;
                    }
                    let block = Waiting {
                        first_ts,
                        last_ts,
                        data,
                    };
                    // Only a block that may be folded from its header waits
                    // for the next (is it overlapped?); others are decoded now.
                    if range.header_candidate(first_ts, last_ts) {
                        fold.waiting = Some(block);
                    } else {
                        held += fold.block(&range, block, None, &mut scratch)?;
                    }
                }
                SnapshotItem::Chunk {
                    device,
                    chunk_ms,
                    data,
                } => {
                    let Some(s) = range.span else { return Ok(()) };
                    let fold = folds.entry(device).or_default();
                    for (start, agg) in rollups::decode_chunk(chunk_ms, s.every_ms, data)? {
                        if start >= s.from_ms && start < s.until_ms {
                            held += fold.add(width, start, &agg);
                        }
                    }
                }
            }
            if held > budget {
                return Err(Stop::Budget);
            }
            Ok(())
        })
        .await;
    // The last block held back of each series.
    let done = done.and_then(|()| {
        for fold in folds.values_mut() {
            if let Some(last) = fold.waiting.take() {
                held += fold.block(&range, last, None, &mut scratch)?;
            }
        }
        if held > budget {
            return Err(Stop::Budget);
        }
        Ok(())
    });
    if within_budget(done)?.is_none() {
        return Ok(None);
    }
    Ok(Some(
        folds
            .into_iter()
            .map(|(device, fold)| (device, fold.buckets()))
            .collect(),
    ))
}

/// What a bucket read covers: [since, until) in buckets of `width`, and
/// where a rollup answers.
struct Range {
    since: i64,
    until: i64,
    width: i64,
    span: Option<RollupSpan>,
}

impl Range {
    /// Whether readings at `ts` are the rollup's.
    fn in_span(&self, ts: i64) -> bool {
        self.span
            .is_some_and(|s| ts >= s.from_ms && ts < s.until_ms)
    }

    /// Whether a block spanning [first, last] may be folded from its
    /// header: inside the range and one bucket, clear of the rollup's span
    /// (whether anything overlaps it is known later).
    fn header_candidate(&self, first: i64, last: i64) -> bool {
        let clear_of_span = self
            .span
            .is_none_or(|s| last < s.from_ms || first >= s.until_ms);
        clear_of_span
            && first >= self.since
            && last < self.until
            && Bucket::start_of(first, self.width) == Bucket::start_of(last, self.width)
    }
}

/// A block held back until the next one of its series shows whether the
/// two overlap.
struct Waiting {
    first_ts: i64,
    last_ts: i64,
    data: Vec<u8>,
}

/// One series' buckets being folded by [`sensor_buckets`], from parts in
/// any order (first and last go by (ts, seq)).
#[derive(Default)]
struct SeriesFold {
    /// Parts of buckets: (start, aggregates of some of its readings).
    parts: Vec<(i64, Agg)>,
    /// The staged readings' spans (first ts, last ts), in order (read
    /// first), one per bucket or reading.
    staged: Vec<(i64, i64)>,
    /// The latest last_ts of the blocks judged so far.
    blocks_until: Option<i64>,
    waiting: Option<Waiting>,
}

impl SeriesFold {
    /// Adds some readings of the bucket holding `ts`; 1 when that makes
    /// another part (a run of readings in one bucket makes one).
    fn add(&mut self, width: i64, ts: i64, agg: &Agg) -> usize {
        let start = Bucket::start_of(ts, width);
        match self.parts.last_mut() {
            Some((s, a)) if *s == start => {
                a.merge(agg);
                0
            }
            _ => {
                self.parts.push((start, *agg));
                1
            }
        }
    }

    /// Folds a block: from its header when it lies inside one bucket and
    /// the range, clear of the rollup's span, and no other block (before
    /// it, or the next, starting at `next_first`) or staged reading
    /// overlaps it; else its readings outside the span, one by one.
    fn block(
        &mut self,
        range: &Range,
        block: Waiting,
        next_first: Option<i64>,
        scratch: &mut Vec<Point>,
    ) -> Result<usize, Stop> {
        let (first, last, width) = (block.first_ts, block.last_ts, range.width);
        let clear =
            self.blocks_until.is_none_or(|u| u < first) && next_first.is_none_or(|n| n > last) && {
                let i = self.staged.partition_point(|(_, hi)| *hi < first);
                self.staged.get(i).is_none_or(|(lo, _)| *lo > last)
            };
        self.blocks_until = Some(self.blocks_until.map_or(last, |u| u.max(last)));
        if clear && range.header_candidate(first, last) {
            let stats = codec::stats(&block.data)?;
            return Ok(self.add(width, first, &Agg::of_block(first, &stats)));
        }
        scratch.clear();
        codec::decode_into(&block.data, scratch)?;
        let mut added = 0;
        for p in scratch.iter() {
            if p.ts_ms >= range.since && p.ts_ms < range.until && !range.in_span(p.ts_ms) {
                added += self.add(width, p.ts_ms, &Agg::of(p));
            }
        }
        Ok(added)
    }

    /// The buckets, in time order.
    fn buckets(mut self) -> Vec<Bucket> {
        // Mostly in order already (chunks, blocks and staged readings each
        // come in time order).
        self.parts.sort_by_key(|(start, _)| *start);
        let mut merged: Vec<(i64, Agg)> = Vec::with_capacity(self.parts.len());
        for (start, a) in self.parts {
            match merged.last_mut() {
                Some((s, m)) if *s == start => m.merge(&a),
                _ => merged.push((start, a)),
            }
        }
        merged
            .into_iter()
            .map(|(start, a)| bucket_of(String::new(), start, &a))
            .collect()
    }
}

/// Where a bucket query reads a rollup: its interval, and the part of the
/// query's range it answers exactly (whole intervals, inside what its
/// retention keeps). The snapshot read takes it as it is.
type RollupPlan = RollupSpan;

/// At most this many separate stretches of staged readings are read raw
/// inside a rollup's range; past it, everything from the first one on is.
const MAX_RAW_STRETCHES: usize = 64;

impl RollupPlan {
    /// The coarsest ready rollup whose interval divides `width`, if it
    /// answers some of [since, until).
    async fn choose(
        store: &Store,
        width: i64,
        since: i64,
        until: i64,
        now: i64,
    ) -> Result<Option<Self>, StoreError> {
        let ready = store.ready_rollups().await?;
        Ok(Self::pick(&ready, width, since, until, now))
    }

    /// [`RollupPlan::choose`] among `ready`.
    fn pick(ready: &[ReadyRollup], width: i64, since: i64, until: i64, now: i64) -> Option<Self> {
        ready
            .iter()
            .rev()
            .find(|r| r.every_ms > 0 && width % r.every_ms == 0)
            .and_then(|r| Self::over(r, since, until, now))
    }

    fn over(rollup: &ReadyRollup, since: i64, until: i64, now: i64) -> Option<Self> {
        let every_ms = rollup.every_ms;
        let align_up = |t: i64| {
            let start = Bucket::start_of(t, every_ms);
            if start == t {
                t
            } else {
                start.saturating_add(every_ms)
            }
        };
        let mut from_ms = if since == i64::MIN {
            i64::MIN
        } else {
            align_up(since)
        };
        // Whatever its retention may have deleted is read raw.
        if rollup.keep_ms > 0 {
            from_ms = from_ms.max(align_up(now.saturating_sub(rollup.keep_ms)));
        }
        from_ms = from_ms.max(align_up(rollup.pruned_before));
        let until_ms = if until == i64::MAX {
            i64::MAX
        } else {
            Bucket::start_of(until, every_ms)
        };
        (from_ms < until_ms).then_some(Self {
            every_ms,
            from_ms,
            until_ms,
        })
    }

    /// The stretches of [since, until) in time order, each read raw
    /// (false) or from the rollup (true): the rollup's range but for the
    /// intervals that hold staged readings (not in the rollup yet).
    fn segments(&self, staged: &VecDeque<Point>, since: i64, until: i64) -> Vec<(i64, i64, bool)> {
        let every = self.every_ms;
        let (a, b) = (self.from_ms, self.until_ms);
        let mut dirty: Vec<(i64, i64)> = Vec::new();
        for p in staged.iter().filter(|p| p.ts_ms >= a && p.ts_ms < b) {
            let start = Bucket::start_of(p.ts_ms, every);
            let end = start.saturating_add(every);
            match dirty.last_mut() {
                Some(last) if last.1 >= start => last.1 = last.1.max(end),
                _ => dirty.push((start, end)),
            }
        }
        if dirty.len() > MAX_RAW_STRETCHES {
            dirty = vec![(dirty[0].0, b)];
        }
        let mut out: Vec<(i64, i64, bool)> = Vec::new();
        let mut push = |from: i64, to: i64, rollup: bool| {
            if from >= to {
                return;
            }
            match out.last_mut() {
                Some(last) if last.2 == rollup && last.1 == from => last.1 = to,
                _ => out.push((from, to, rollup)),
            }
        };
        push(since, a, false);
        let mut at = a;
        for (start, end) in dirty {
            push(at, start, true);
            push(start, end, false);
            at = end;
        }
        push(at, b, true);
        push(b, until, false);
        out
    }
}

/// Buckets on their way to the client, in chunks, up to the limit.
struct Emitter<'a> {
    out: &'a mpsc::Sender<Result<QueryChunk, StoreError>>,
    chunk: Vec<Bucket>,
    emitted: u64,
    limit: u64,
}

impl Emitter<'_> {
    /// False when the query is done: the limit reached or the client gone.
    async fn push(&mut self, bucket: Bucket) -> bool {
        self.chunk.push(bucket);
        self.emitted += 1;
        if self.emitted >= self.limit {
            self.flush().await;
            return false;
        }
        if self.chunk.len() == CHUNK_ROWS {
            return send(
                self.out,
                QueryChunk::Buckets(std::mem::take(&mut self.chunk)),
            )
            .await;
        }
        true
    }

    async fn flush(&mut self) {
        if !self.chunk.is_empty() {
            send(
                self.out,
                QueryChunk::Buckets(std::mem::take(&mut self.chunk)),
            )
            .await;
        }
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
    /// A cursor over [since, until) of one sensor, whose staged readings
    /// there are `staged` (in (ts, seq) order); no block read yet.
    fn new(
        device: DeviceKey,
        key: SensorKey,
        name: String,
        since: i64,
        until: i64,
        staged: VecDeque<Point>,
    ) -> Self {
        Self {
            device,
            key,
            name,
            since,
            until,
            cursor: BlockCursor::START,
            pending: VecDeque::new(),
            exhausted: false,
            active: Vec::new(),
            staged,
            emitted: None,
        }
    }

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

    /// A cursor over [since, until) of this one's sensor, taking this
    /// one's staged readings before `until` (stretches are read in time
    /// order).
    fn stretch(&mut self, since: i64, until: i64) -> SensorCursor {
        let end = self.staged.partition_point(|p| p.ts_ms < until);
        let staged: VecDeque<Point> = self
            .staged
            .drain(..end)
            .filter(|p| p.ts_ms >= since)
            .collect();
        SensorCursor::new(
            self.device,
            self.key,
            self.name.clone(),
            since,
            until,
            staged,
        )
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

/// Folds one sensor's readings into buckets of `width`: from its blocks
/// and staged readings, or where `plan` says so from a rollup. False when
/// the query is done.
async fn fold_sensor(
    store: &Store,
    mut base: SensorCursor,
    width: i64,
    plan: Option<RollupPlan>,
    emit: &mut Emitter<'_>,
) -> Result<bool, StoreError> {
    let segments = match plan {
        Some(plan) => plan.segments(&base.staged, base.since, base.until),
        None => vec![(base.since, base.until, false)],
    };
    let mut current: Option<Bucket> = None;
    for (from, to, rollup) in segments {
        if rollup {
            let every = plan.map_or(width, |p| p.every_ms);
            let mut at = Some(from);
            while let Some(since) = at {
                let (page, next) = store
                    .rollup_page((base.device, base.key), every, since, to, ROLLUP_PAGE)
                    .await?;
                for (start, agg) in &page {
                    if let Some(done) = fold(&mut current, &base.name, width, *start, agg)
                        && !emit.push(done).await
                    {
                        return Ok(false);
                    }
                }
                at = next;
            }
        } else {
            let mut cursor = base.stretch(from, to);
            while let Some(item) = cursor.next_item(store, width).await? {
                let (ts, part) = match item {
                    Item::Point(p) => (p.ts_ms, Agg::of(&p)),
                    Item::Block(first_ts, stats) => (first_ts, Agg::of_block(first_ts, &stats)),
                };
                if let Some(done) = fold(&mut current, &base.name, width, ts, &part)
                    && !emit.push(done).await
                {
                    return Ok(false);
                }
            }
        }
    }
    match current {
        Some(done) => Ok(emit.push(done).await),
        None => Ok(true),
    }
}

/// Rollup chunks read per statement.
const ROLLUP_PAGE: u32 = 64;

/// Adds `part` (readings from `ts` on, after everything folded so far) to
/// the current bucket; returns the bucket it completed, if any.
fn fold(
    current: &mut Option<Bucket>,
    name: &str,
    width: i64,
    ts: i64,
    part: &Agg,
) -> Option<Bucket> {
    let start = Bucket::start_of(ts, width);
    match current {
        Some(b) if b.start_ms == start => {
            b.count += part.count;
            b.sum += part.sum;
            b.min = b.min.min(part.min);
            b.max = b.max.max(part.max);
            b.last = part.last;
            None
        }
        _ => current.replace(bucket_of(name.to_owned(), start, part)),
    }
}

/// The bucket of `sensor` starting at `start` that holds the readings `a`
/// aggregates.
fn bucket_of(sensor: String, start: i64, a: &Agg) -> Bucket {
    Bucket {
        sensor,
        start_ms: start,
        count: a.count,
        sum: a.sum,
        min: a.min,
        max: a.max,
        first: a.first,
        last: a.last,
        first_ts_ms: a.first_key.0,
    }
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

    #[test]
    fn a_rollup_answers_whole_intervals_inside_what_it_keeps() {
        let m = 60_000;
        let r = |keep_ms: i64, pruned_before: i64| ReadyRollup {
            every_ms: m,
            keep_ms,
            pruned_before,
        };
        // Unaligned ends are read raw.
        let p = RollupPlan::over(&r(0, 0), 10 * m + 5, 20 * m + 7, 0).unwrap();
        assert_eq!((p.from_ms, p.until_ms), (11 * m, 20 * m));
        // Unbounded ends stay bounded by what was never pruned.
        let p = RollupPlan::over(&r(0, 0), i64::MIN, i64::MAX, 0).unwrap();
        assert_eq!((p.from_ms, p.until_ms), (0, i64::MAX));
        // What its retention may have deleted is read raw: by its keep...
        let p = RollupPlan::over(&r(5 * m, 0), 0, 100 * m, 100 * m - 30_000).unwrap();
        assert_eq!(p.from_ms, 95 * m);
        // ...and by what a pruning with a shorter keep deleted before.
        let p = RollupPlan::over(&r(50 * m, 97 * m + 1), 0, 100 * m, 100 * m).unwrap();
        assert_eq!(p.from_ms, 98 * m);
        // Less than one whole interval: no rollup.
        assert_eq!(RollupPlan::over(&r(0, 0), 10 * m + 5, 11 * m + 5, 0), None);
    }

    #[test]
    fn intervals_with_staged_readings_are_read_raw() {
        let m = 60_000;
        let plan = RollupPlan {
            every_ms: m,
            from_ms: 10 * m,
            until_ms: 20 * m,
        };
        let staged = |ts: &[i64]| -> VecDeque<Point> {
            ts.iter()
                .map(|&ts_ms| Point {
                    ts_ms,
                    seq: 0,
                    value: 0.0,
                })
                .collect()
        };
        let since = 10 * m - 3;
        let until = 20 * m + 3;
        assert_eq!(
            plan.segments(&staged(&[]), since, until),
            vec![
                (since, 10 * m, false),
                (10 * m, 20 * m, true),
                (20 * m, until, false)
            ]
        );
        // Staged readings in minutes 12 and 13 (one stretch), 19, and
        // outside the rollup's range (read raw anyway).
        let s = staged(&[
            5,
            12 * m + 1,
            13 * m,
            13 * m + 9,
            19 * m + 59_999,
            20 * m + 1,
        ]);
        assert_eq!(
            plan.segments(&s, since, until),
            vec![
                (since, 10 * m, false),
                (10 * m, 12 * m, true),
                (12 * m, 14 * m, false),
                (14 * m, 19 * m, true),
                (19 * m, until, false),
            ]
        );
        // Too many stretches: raw from the first on.
        let many: Vec<i64> = (0..MAX_RAW_STRETCHES as i64 + 1)
            .map(|i| 10 * m + 2 * i * 1000)
            .collect();
        let wide = RollupPlan {
            every_ms: 1000,
            from_ms: 10 * m,
            until_ms: 20 * m,
        };
        assert_eq!(
            wide.segments(&staged(&many), since, until),
            vec![(since, until, false)]
        );
    }

    /// A store on a temp file (with a 1-minute rollup, built), holding
    /// three devices' readings of sensor "t": small blocks inside one
    /// minute, long blocks, late readings in blocks overlapping them, and
    /// staged readings inside and outside the blocks' spans.
    async fn fleet_store(rollup: bool) -> (tempfile::TempDir, Store, i64) {
        use crate::store::{RowToInsert, STAGING_PARTS, staging_part};
        let dir = tempfile::tempdir().unwrap();
        let mut settings = crate::config::Settings::defaults().unwrap().storage;
        settings.path = dir.path().join("hub.db");
        if rollup {
            settings.rollups = vec![crate::config::RollupSetting {
                every: std::time::Duration::from_secs(60),
                keep: std::time::Duration::ZERO,
            }];
        }
        let (store, mut writer) = crate::store::open(&settings).await.unwrap();
        while writer.build_rollup_step().await.unwrap() {}
        let mut tx = writer.begin().await.unwrap();
        assert_eq!(tx.sensor_key("t").await.unwrap(), SensorKey(1));
        tx.commit().await.unwrap();
        let m = 60_000;
        let t0 = 1_800_000_000_000 / m * m;
        let mut seq = [0i64; 4];
        // (first ts, step, count) per round; each but the last compacted.
        let rounds: [&[(i64, i64, i64)]; 5] = [
            &[(t0 + 1_000, 1_000, 5)],
            &[(t0 + m, 7_000, 200)],
            &[(t0 + 3 * m + 500, 9_000, 10)],
            &[(t0 + 40 * m + 10, 5_000, 3)],
            &[(t0 + 10 * m + 3, 1_000, 4), (t0 + 50 * m, 2_000, 6)],
        ];
        for (round, runs) in rounds.iter().enumerate() {
            let mut parts = vec![Vec::new(); STAGING_PARTS];
            for device in 1..=3i64 {
                for &(first, step, count) in *runs {
                    for k in 0..count {
                        seq[device as usize] += 1;
                        let ts_ms = first + k * step + device;
                        parts[staging_part(DeviceKey(device))].push(RowToInsert {
                            device: DeviceKey(device),
                            sensor: SensorKey(1),
                            ts_ms,
                            seq: seq[device as usize],
                            value: ((ts_ms % 977) as f64 - 300.0) / 7.0 * device as f64,
                        });
                    }
                }
            }
            let mut tx = writer.begin().await.unwrap();
            tx.insert_readings(&parts).await.unwrap();
            tx.commit().await.unwrap();
            if round == rounds.len() - 1 {
                break;
            }
            for (part, mut rows) in writer.staged_rows().await.unwrap().into_iter().enumerate() {
                if rows.is_empty() {
                    continue;
                }
                let blocks = crate::store::blocks::blocks_of(&mut rows);
                writer.compact(part, &blocks, &rows).await.unwrap();
            }
        }
        (dir, store, t0)
    }

    /// What [`run`] answers for one series.
    async fn per_series(
        store: &Store,
        device: i64,
        since: i64,
        until: i64,
        bucket_ms: Option<i64>,
    ) -> Vec<QueryChunk> {
        let (tx, mut rx) = mpsc::channel(4);
        let q = ReadingQuery {
            device: DeviceKey(device),
            sensor: Some("t".into()),
            since_ms: Some(since),
            until_ms: Some(until),
            limit: 0,
            bucket_ms,
        };
        run(store.clone(), q, tx).await;
        let mut out = Vec::new();
        while let Some(chunk) = rx.recv().await {
            out.push(chunk.unwrap());
        }
        out
    }

    #[tokio::test]
    async fn one_snapshot_of_many_series_answers_as_each_series_query_does() {
        let m = 60_000;
        let devices = [DeviceKey(1), DeviceKey(2), DeviceKey(3)];
        for rollup in [false, true] {
            let (_dir, store, t0) = fleet_store(rollup).await;
            for (since, until) in [
                (t0, t0 + 60 * m),
                (t0 + 3 * m, t0 + 45 * m + 17),
                (t0 - 60 * m, t0 + 49 * m),
            ] {
                let raw = sensor_readings(&store, SensorKey(1), &devices, since, until, usize::MAX)
                    .await
                    .unwrap()
                    .unwrap();
                for d in devices {
                    let want: Vec<(u64, i64, u64)> = per_series(&store, d.0, since, until, None)
                        .await
                        .into_iter()
                        .flat_map(|c| match c {
                            QueryChunk::Rows(rows) => rows,
                            QueryChunk::Buckets(_) => Vec::new(),
                        })
                        .map(|r| (r.seq, r.ts_ms, r.value.to_bits()))
                        .collect();
                    let got: Vec<(u64, i64, u64)> = raw[&d]
                        .iter()
                        .map(|p| (p.seq, p.ts_ms, p.value.to_bits()))
                        .collect();
                    assert!(!want.is_empty());
                    assert_eq!(got, want, "raw, device {d:?}, rollup {rollup}");
                }
                for width in [m, 5 * m, 60 * m] {
                    let since = Bucket::start_of(since, width);
                    let got = sensor_buckets(
                        &store,
                        SensorKey(1),
                        &devices,
                        (since, until),
                        width,
                        usize::MAX,
                    )
                    .await
                    .unwrap()
                    .unwrap();
                    for d in devices {
                        let want: Vec<Bucket> = per_series(&store, d.0, since, until, Some(width))
                            .await
                            .into_iter()
                            .flat_map(|c| match c {
                                QueryChunk::Buckets(b) => b,
                                QueryChunk::Rows(_) => Vec::new(),
                            })
                            .collect();
                        let got = &got[&d];
                        assert_eq!(
                            got.len(),
                            want.len(),
                            "width {width}, device {d:?}, rollup {rollup}"
                        );
                        for (g, w) in got.iter().zip(&want) {
                            let same = (
                                g.start_ms,
                                g.count,
                                g.min.to_bits(),
                                g.max.to_bits(),
                                g.first.to_bits(),
                                g.last.to_bits(),
                                g.first_ts_ms,
                            ) == (
                                w.start_ms,
                                w.count,
                                w.min.to_bits(),
                                w.max.to_bits(),
                                w.first.to_bits(),
                                w.last.to_bits(),
                                w.first_ts_ms,
                            );
                            assert!(
                                same && (g.sum - w.sum).abs() <= 1e-9 * w.sum.abs().max(1.0),
                                "width {width}, device {d:?}, rollup {rollup}: {g:?} against {w:?}"
                            );
                        }
                    }
                }
            }
        }
    }
}
