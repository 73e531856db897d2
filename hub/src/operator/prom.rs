//! The Prometheus query API's operations: the series catalogue as
//! Prometheus labels, and queries evaluated by [`crate::promql`] over
//! samples this module loads through the same readings queries (and
//! budget) as every other door.

use futures_util::StreamExt;
use promql_parser::label::{MatchOp, Matcher};

use super::{OpError, Operations};
use std::collections::{BTreeMap, HashMap};

use crate::domain::{DeviceKey, ReadingQuery};
use crate::promql::{self, Labels, Loaded, Query, QueryError, Steps, Value};
use crate::query::{self, QueryChunk};

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
            let matching: Vec<&Known> = catalog
                .iter()
                .filter(|k| promql::matches(&window.matchers, &k.labels))
                .collect();
            let mut data = Loaded::default();
            match window.bucket_ms {
                None => {
                    let budget = MAX_SAMPLES.saturating_sub(samples);
                    let read = self
                        .series_samples(&matching, window.from_ms, window.to_ms, budget)
                        .await?;
                    for (k, points) in matching.iter().zip(read) {
                        samples += points.len();
                        data.series.push((k.labels.clone(), points));
                    }
                }
                Some(width) => {
                    // A few series at once (each a readings query of the
                    // shared budget), in catalogue order.
                    let mut reads = Vec::with_capacity(matching.len());
                    for k in &matching {
                        reads.push(self.series_buckets(k, window.from_ms, window.to_ms, width));
                    }
                    let mut reads = futures_util::stream::iter(reads).buffered(SERIES_AT_ONCE);
                    let mut buckets = Vec::with_capacity(matching.len());
                    while let Some(read) = reads.next().await {
                        let (k, aggs) = read?;
                        samples += aggs.len();
                        if samples > MAX_SAMPLES {
                            return Err(too_many().into());
                        }
                        buckets.push(aggs);
                        data.series.push((k.labels.clone(), Vec::new()));
                    }
                    data.buckets = Some(buckets);
                }
            }
            if samples > MAX_SAMPLES {
                return Err(too_many().into());
            }
            loaded.push(data);
        }
        Ok(query.evaluate(&steps, loaded)?)
    }

    /// A series' buckets of `width` from `from_ms` (a multiple of it) up to
    /// the one starting at `to_ms`, in time order (empty ones left out).
    async fn series_buckets<'k>(
        &self,
        k: &'k Known,
        from_ms: i64,
        to_ms: i64,
        width: i64,
    ) -> Result<(&'k Known, Vec<promql::Agg>), OpError> {
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
        Ok((k, aggs))
    }

    /// Each series' readings with from <= ts <= to, in time order (in
    /// the order of `series`), read sensor by sensor: one snapshot of a
    /// few statements for all the devices of a sensor, under one slot of
    /// the readings budget. Refused past `budget` readings in all.
    async fn series_samples(
        &self,
        series: &[&Known],
        from_ms: i64,
        to_ms: i64,
        budget: usize,
    ) -> Result<Vec<Vec<(i64, f64)>>, PromFailure> {
        if series.is_empty() {
            return Ok(Vec::new());
        }
        let _slot = self.query_slot()?;
        let mut by_sensor: BTreeMap<&str, Vec<DeviceKey>> = BTreeMap::new();
        for k in series {
            by_sensor.entry(&k.sensor).or_default().push(k.device);
        }
        let mut read: HashMap<(DeviceKey, &str), Vec<(i64, f64)>> = HashMap::new();
        let mut held = 0usize;
        for (sensor, devices) in by_sensor {
            let Some(key) = self.store.sensor_key(sensor).await? else {
                continue;
            };
            let until = to_ms.saturating_add(1);
            let budget = budget.saturating_sub(held);
            let Some(points) =
                query::sensor_readings(&self.store, key, &devices, from_ms, until, budget).await?
            else {
                return Err(too_many().into());
            };
            for (device, points) in points {
                held += points.len();
                let points = points.into_iter().map(|p| (p.ts_ms, p.value)).collect();
                read.insert((device, sensor), points);
            }
        }
        Ok(series
            .iter()
            .map(|k| {
                read.remove(&(k.device, k.sensor.as_str()))
                    .unwrap_or_default()
            })
            .collect())
    }
}
