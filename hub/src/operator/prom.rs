//! The Prometheus query API's operations: the series catalogue as
//! Prometheus labels, and queries evaluated by [`crate::promql`] over
//! samples this module loads through the same readings queries (and
//! budget) as every other door.

use futures_util::StreamExt;
use promql_parser::label::{MatchOp, Matcher};

use super::{OpError, Operations};
use crate::domain::{ReadingQuery, StoredReading};
use crate::promql::{self, Labels, Loaded, Query, QueryError, Steps, Value};
use crate::query::QueryChunk;

/// Samples one query may load (16 bytes each): past it the query is
/// refused, not answered in part.
pub const MAX_SAMPLES: usize = 20_000_000;
/// Series one query reads at once.
const SERIES_AT_ONCE: usize = 4;

/// Why a Prometheus query failed: the query (Prometheus' error types), or
/// the hub.
#[derive(Debug, thiserror::Error)]
pub enum PromFailure {
    #[error(transparent)]
    Query(#[from] QueryError),
    #[error(transparent)]
    Op(#[from] OpError),
}

impl From<crate::store::StoreError> for PromFailure {
    fn from(e: crate::store::StoreError) -> Self {
        Self::Op(e.into())
    }
}

fn too_many() -> QueryError {
    QueryError::BadData(format!(
        "query processing would load more than {MAX_SAMPLES} samples; narrow the selectors or the range"
    ))
}

/// A series as read: its samples or its buckets.
type SeriesRead<'k> = (&'k Known, Vec<(i64, f64)>, Option<Vec<promql::Agg>>);

/// A catalogued series: its labels and where its readings are.
struct Known {
    labels: Labels,
    device: crate::domain::DeviceKey,
    sensor: String,
}

impl Operations {
    /// The catalogue, of one device when `only` names it.
    async fn prom_catalog(&self, only: Option<&str>) -> Result<Vec<Known>, OpError> {
        Ok(self
            .store
            .series_catalog(only)
            .await?
            .into_iter()
            .map(|c| Known {
                labels: promql::series_labels(&c.device_id, &c.tags, &c.sensor),
                device: c.device,
                sensor: c.sensor,
            })
            .collect())
    }

    /// The label sets of every series matching any of `selectors` (every
    /// series when none is given).
    pub async fn prom_series(&self, selectors: &[Vec<Matcher>]) -> Result<Vec<Labels>, OpError> {
        Ok(self
            .prom_catalog(None)
            .await?
            .into_iter()
            .map(|k| k.labels)
            .filter(|l| selectors.is_empty() || selectors.iter().any(|m| promql::matches(m, l)))
            .collect())
    }

    /// Evaluates `query` over `steps`.
    pub async fn prom_query(&self, query: &str, steps: Steps) -> Result<Value, PromFailure> {
        let query = Query::parse(query)?;
        let windows = query.windows(&steps);
        // Every selector names one device (a dashboard's panel): only its
        // series are catalogued.
        let devices: Vec<Option<&str>> = windows
            .iter()
            .map(|w| {
                w.matchers
                    .iter()
                    .find(|m| m.name == promql::DEVICE && matches!(m.op, MatchOp::Equal))
                    .map(|m| m.value.as_str())
            })
            .collect();
        let only = match devices.first() {
            Some(Some(first)) if devices.iter().all(|d| *d == Some(*first)) => Some(*first),
            _ => None,
        };
        let catalog = if windows.is_empty() {
            Vec::new()
        } else {
            self.prom_catalog(only).await?
        };
        let mut loaded = Vec::with_capacity(windows.len());
        let mut samples = 0usize;
        for window in windows {
            let mut data = Loaded::default();
            let mut buckets = Vec::new();
            // A few series at once (each a readings query of the shared
            // budget), in catalogue order.
            let mut reads = Vec::new();
            for k in &catalog {
                if promql::matches(&window.matchers, &k.labels) {
                    reads.push(self.read_series(k, &window));
                }
            }
            let mut reads = futures_util::stream::iter(reads).buffered(SERIES_AT_ONCE);
            while let Some(read) = reads.next().await {
                let (k, points, aggs) = read?;
                if let Some(aggs) = aggs {
                    samples += aggs.len();
                    buckets.push(aggs);
                }
                samples += points.len();
                if samples > MAX_SAMPLES {
                    return Err(too_many().into());
                }
                data.series.push((k.labels.clone(), points));
            }
            if window.bucket_ms.is_some() {
                data.buckets = Some(buckets);
            }
            loaded.push(data);
        }
        Ok(query.evaluate(&steps, loaded)?)
    }

    /// A series' samples, or its buckets for a window with `bucket_ms`.
    async fn read_series<'k>(
        &self,
        k: &'k Known,
        window: &promql::Window,
    ) -> Result<SeriesRead<'k>, PromFailure> {
        Ok(match window.bucket_ms {
            Some(width) => {
                let aggs = self
                    .series_buckets(k, window.from_ms, window.to_ms, width)
                    .await?;
                (k, Vec::new(), Some(aggs))
            }
            None => (
                k,
                self.series_samples(k, window.from_ms, window.to_ms, MAX_SAMPLES)
                    .await?,
                None,
            ),
        })
    }

    /// A series' buckets of `width` from `from_ms` (a multiple of it) up to
    /// the one starting at `to_ms`, in time order (empty ones left out).
    async fn series_buckets(
        &self,
        k: &Known,
        from_ms: i64,
        to_ms: i64,
        width: i64,
    ) -> Result<Vec<promql::Agg>, OpError> {
        let mut run = self.run_query(ReadingQuery {
            device: k.device,
            sensor: Some(k.sensor.clone()),
            since_ms: Some(from_ms),
            until_ms: Some(to_ms.saturating_add(width)),
            limit: 0,
            bucket_ms: Some(width),
        })?;
        let mut aggs = Vec::new();
        while let Some(chunk) = run.chunks.recv().await {
            if let QueryChunk::Buckets(buckets) = chunk? {
                aggs.extend(buckets.into_iter().map(|b| promql::Agg {
                    start_ms: b.start_ms,
                    count: b.count,
                    sum: b.sum,
                    min: b.min,
                    max: b.max,
                    first: b.first,
                    first_ts_ms: b.first_ts_ms,
                }));
            }
        }
        if !run.ended_whole().await {
            return Err(OpError::Internal(
                "a readings query failed; see the hub's log".into(),
            ));
        }
        Ok(aggs)
    }

    /// A series' readings with from <= ts <= to, in time order; refused
    /// (the read stopped) past `budget` of them.
    async fn series_samples(
        &self,
        k: &Known,
        from_ms: i64,
        to_ms: i64,
        budget: usize,
    ) -> Result<Vec<(i64, f64)>, PromFailure> {
        let mut run = self.run_query(ReadingQuery {
            device: k.device,
            sensor: Some(k.sensor.clone()),
            since_ms: Some(from_ms),
            until_ms: Some(to_ms.saturating_add(1)),
            limit: 0,
            bucket_ms: None,
        })?;
        let mut points = Vec::new();
        while let Some(chunk) = run.chunks.recv().await {
            match chunk? {
                QueryChunk::Rows(rows) => {
                    points.extend(rows.into_iter().map(|r: StoredReading| (r.ts_ms, r.value)));
                    if points.len() > budget {
                        // Dropping the run ends its query.
                        return Err(too_many().into());
                    }
                }
                QueryChunk::Buckets(_) => {}
            }
        }
        if !run.ended_whole().await {
            return Err(PromFailure::Op(OpError::Internal(
                "a readings query failed; see the hub's log".into(),
            )));
        }
        Ok(points)
    }
}
