//! The Prometheus query API's operations: the series catalogue as
//! Prometheus labels, and queries evaluated by [`crate::promql`] over
//! samples or buckets this module loads sensor by sensor, each sensor's
//! devices in one snapshot ([`crate::query::sensor_readings`],
//! [`crate::query::sensor_buckets`]), under the readings budget every
//! door shares.

use std::collections::{BTreeMap, HashMap};

use promql_parser::label::{MatchOp, Matcher};

use super::{OpError, Operations};
use crate::domain::DeviceKey;
use crate::promql::{self, Labels, Loaded, Query, QueryError, Steps, Value};
use crate::query;

/// Samples one query may load (16 bytes each): past it the query is
/// refused, not answered in part.
pub const MAX_SAMPLES: usize = 20_000_000;

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

/// What one window read, by (device, sensor): samples, or buckets for a
/// window with `bucket_ms`; and how many of them.
struct WindowRead {
    samples: HashMap<(DeviceKey, String), Vec<(i64, f64)>>,
    buckets: Option<HashMap<(DeviceKey, String), Vec<promql::Agg>>>,
    held: usize,
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
            let budget = MAX_SAMPLES.saturating_sub(samples);
            let mut read = self.load(&matching, &window, budget).await?;
            samples += read.held;
            let key = |k: &Known| (k.device, k.sensor.clone());
            let data = Loaded {
                series: matching
                    .iter()
                    .map(|k| {
                        let points = read.samples.remove(&key(k)).unwrap_or_default();
                        (k.labels.clone(), points)
                    })
                    .collect(),
                buckets: read.buckets.map(|mut buckets| {
                    matching
                        .iter()
                        .map(|k| buckets.remove(&key(k)).unwrap_or_default())
                        .collect()
                }),
            };
            loaded.push(data);
        }
        Ok(query.evaluate(&steps, loaded)?)
    }

    /// A window's series (`series`, of the catalogue), read sensor by
    /// sensor: one snapshot of a few statements for all the devices of a
    /// sensor ([`query::sensor_readings`], or [`query::sensor_buckets`]
    /// for a window with `bucket_ms`), under one slot of the readings
    /// budget. Refused past `budget` samples or buckets in all.
    async fn load(
        &self,
        series: &[&Known],
        window: &promql::Window,
        budget: usize,
    ) -> Result<WindowRead, PromFailure> {
        let mut read = WindowRead {
            samples: HashMap::new(),
            buckets: window.bucket_ms.map(|_| HashMap::new()),
            held: 0,
        };
        if series.is_empty() {
            return Ok(read);
        }
        let _slot = self.query_slot()?;
        let mut by_sensor: BTreeMap<&str, Vec<DeviceKey>> = BTreeMap::new();
        for k in series {
            by_sensor
                .entry(k.sensor.as_str())
                .or_default()
                .push(k.device);
        }
        for (sensor, devices) in by_sensor {
            let Some(key) = self.store.sensor_key(sensor).await? else {
                continue;
            };
            let left = budget.saturating_sub(read.held);
            match (window.bucket_ms, &mut read.buckets) {
                (Some(width), Some(out)) => {
                    let range = (window.from_ms, window.to_ms.saturating_add(width));
                    let Some(buckets) =
                        query::sensor_buckets(&self.store, key, &devices, range, width, left)
                            .await?
                    else {
                        return Err(too_many().into());
                    };
                    for (device, buckets) in buckets {
                        read.held += buckets.len();
                        let aggs = buckets.into_iter().map(|b| promql::Agg {
                            start_ms: b.start_ms,
                            count: b.count,
                            sum: b.sum,
                            min: b.min,
                            max: b.max,
                            first: b.first,
                            first_ts_ms: b.first_ts_ms,
                        });
                        out.insert((device, sensor.to_owned()), aggs.collect());
                    }
                }
                _ => {
                    let until = window.to_ms.saturating_add(1);
                    let Some(points) = query::sensor_readings(
                        &self.store,
                        key,
                        &devices,
                        window.from_ms,
                        until,
                        left,
                    )
                    .await?
                    else {
                        return Err(too_many().into());
                    };
                    for (device, points) in points {
                        read.held += points.len();
                        let points = points.into_iter().map(|p| (p.ts_ms, p.value)).collect();
                        read.samples.insert((device, sensor.to_owned()), points);
                    }
                }
            }
            if read.held > budget {
                return Err(too_many().into());
            }
        }
        Ok(read)
    }
}
