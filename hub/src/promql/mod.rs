//! The Prometheus query API's plain core: how the hub's series look to
//! PromQL ([`series_labels`]), which subset of PromQL is answered
//! ([`Query::parse`], which refuses the rest), what data a query needs
//! ([`Query::windows`]) and its evaluation over loaded samples
//! ([`Query::evaluate`], in [`eval`]). No IO here: the operator core loads
//! the samples each window asks for and hands them back.
//!
//! Semantics follow Prometheus 2.x (the version the comparison test runs):
//! an instant vector takes a series' last sample in [t - lookback, t], a
//! range selector the samples in [t - range, t], `rate`, `increase` and
//! `delta` extrapolate as Prometheus does.

mod eval;

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use promql_parser::label::{MatchOp, Matcher};
use promql_parser::parser::{AtModifier, Expr, Offset, VectorSelector};

pub use eval::{Series, Value};

/// A series' labels, `__name__` included.
pub type Labels = BTreeMap<String, String>;

pub const NAME: &str = "__name__";
/// The label naming the device.
pub const DEVICE: &str = "device";
/// Set when a sensor's name is not a valid metric name: its real name.
pub const SENSOR: &str = "sensor";

/// Prometheus' default lookback of an instant vector.
pub const LOOKBACK_MS: i64 = 5 * 60 * 1000;
/// Series x steps a query's vectors may hold (refused beyond).
pub const MAX_POINTS: usize = 20_000_000;
/// Points a range query may return per series (Prometheus' limit).
pub const MAX_STEPS: usize = 11_000;

/// A sensor's name as a metric name (`[a-zA-Z_:][a-zA-Z0-9_:]*`): every
/// other character becomes `_`, and a leading digit gets a `_` before it.
pub fn metric_name(sensor: &str) -> String {
    sanitize(sensor, true)
}

/// A tag's key as a label name (`[a-zA-Z_][a-zA-Z0-9_]*`), likewise.
pub fn label_name(key: &str) -> String {
    sanitize(key, false)
}

fn sanitize(raw: &str, colons: bool) -> String {
    let mut out = String::with_capacity(raw.len() + 1);
    for (i, c) in raw.chars().enumerate() {
        let ok = c.is_ascii_alphabetic() || c == '_' || (colons && c == ':');
        if i == 0 && c.is_ascii_digit() {
            out.push('_');
        }
        out.push(if ok || c.is_ascii_digit() { c } else { '_' });
    }
    if out.is_empty() {
        out.push('_');
    }
    out
}

/// The labels of a device's sensor: `__name__` (the sensor as a metric
/// name), `device`, the device's tags (keys as label names; a tag named
/// like either of those two is left out), and `sensor` with the sensor's
/// own name when the metric name had to change it.
pub fn series_labels(device_id: &str, tags: &BTreeMap<String, String>, sensor: &str) -> Labels {
    let mut labels = Labels::new();
    for (key, value) in tags {
        let key = label_name(key);
        if key != NAME && key != DEVICE && key != SENSOR && !key.starts_with("__") {
            labels.insert(key, value.clone());
        }
    }
    let name = metric_name(sensor);
    if name != sensor {
        labels.insert(SENSOR.to_owned(), sensor.to_owned());
    }
    labels.insert(NAME.to_owned(), name);
    labels.insert(DEVICE.to_owned(), device_id.to_owned());
    labels
}

/// Whether `labels` satisfy every matcher (a missing label is "").
pub fn matches(matchers: &[Matcher], labels: &Labels) -> bool {
    matchers
        .iter()
        .all(|m| m.is_match(labels.get(&m.name).map_or("", String::as_str)))
}

/// Why a query is not answered: Prometheus' error types.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum QueryError {
    /// The query or a parameter is malformed, or outside the subset.
    #[error("{0}")]
    BadData(String),
    /// Well-formed, but failed while evaluating (e.g. many-to-many matches).
    #[error("{0}")]
    Execution(String),
}

/// Query times are within ±2^53 ms (±285,000 years) of the epoch, so
/// every offset and range arithmetic on them stays in range.
pub const MAX_TIME_MS: i64 = 1 << 53;

fn check_time(t: i64) -> Result<(), QueryError> {
    if t.abs() > MAX_TIME_MS {
        return Err(bad(format!("the time {t} ms is out of range")));
    }
    Ok(())
}

/// Operators and brackets a query may hold: evaluation recurses over
/// them, so a deeper one could overflow a worker's stack.
pub const MAX_OPERATORS: usize = 200;
/// Bytes of query text.
pub const MAX_QUERY_BYTES: usize = 16 * 1024;

/// Refuses queries too long or too deeply built to evaluate safely:
/// operators and brackets outside quoted strings are counted.
fn check_size(text: &str) -> Result<(), QueryError> {
    if text.len() > MAX_QUERY_BYTES {
        return Err(bad(format!(
            "the query is longer than {MAX_QUERY_BYTES} bytes"
        )));
    }
    let (mut quote, mut escaped, mut operators) = (None, false, 0usize);
    for c in text.chars() {
        match quote {
            Some(q) => {
                if escaped {
                    escaped = false;
                } else if c == '\\' {
                    escaped = true;
                } else if c == q {
                    quote = None;
                }
            }
            None if matches!(c, '"' | '\'' | '`') => quote = Some(c),
            None if matches!(
                c,
                '(' | '[' | '+' | '-' | '*' | '/' | '%' | '^' | '<' | '>' | '=' | '!'
            ) =>
            {
                operators += 1;
            }
            None => {}
        }
    }
    // Keywords (and, or, unless, by, ...) count too, roughly.
    operators += text.split_whitespace().count() / 2;
    if operators > MAX_OPERATORS {
        return Err(bad(format!(
            "the query has more than {MAX_OPERATORS} operators and brackets"
        )));
    }
    Ok(())
}

/// Parses with promql-parser, which panics on some out-of-range numbers
/// (a duration of 1e30 s): a panic is a bad query, not a failed hub.
pub fn parse_expr(text: &str) -> Result<Expr, QueryError> {
    check_size(text)?;
    std::panic::catch_unwind(|| promql_parser::parser::parse(text))
        .map_err(|_| bad("the query holds a number out of range"))?
        .map_err(|e| bad(format!("invalid parameter \"query\": {e}")))
}

fn bad(message: impl Into<String>) -> QueryError {
    QueryError::BadData(message.into())
}

/// When a query is evaluated: every `step_ms` from `start_ms` through
/// `end_ms` (an instant query is one step).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Steps {
    pub start_ms: i64,
    pub end_ms: i64,
    pub step_ms: i64,
}

impl Steps {
    pub fn instant(at_ms: i64) -> Result<Self, QueryError> {
        check_time(at_ms)?;
        Ok(Self {
            start_ms: at_ms,
            end_ms: at_ms,
            step_ms: 1,
        })
    }

    pub fn range(start_ms: i64, end_ms: i64, step_ms: i64) -> Result<Self, QueryError> {
        for t in [start_ms, end_ms] {
            check_time(t)?;
        }
        if end_ms < start_ms {
            return Err(bad("end timestamp must not be before start time"));
        }
        if step_ms <= 0 {
            return Err(bad(
                "zero or negative query resolution step widths are not accepted. Try a positive integer",
            ));
        }
        // Prometheus refuses more than 11,000 intervals (11,001 points).
        if (end_ms - start_ms) / step_ms > MAX_STEPS as i64 {
            return Err(bad(format!(
                "exceeded maximum resolution of {MAX_STEPS} points per timeseries. Try decreasing the query resolution (?step=XX)"
            )));
        }
        Ok(Self {
            start_ms,
            end_ms,
            step_ms,
        })
    }

    /// How many steps there are.
    pub fn times_len(&self) -> usize {
        ((self.end_ms - self.start_ms) / self.step_ms.max(1) + 1) as usize
    }

    pub fn times(&self) -> Vec<i64> {
        let n = (self.end_ms - self.start_ms) / self.step_ms.max(1) + 1;
        (0..n).map(|i| self.start_ms + i * self.step_ms).collect()
    }
}

/// The samples a selector needs: series matching `matchers`, samples with
/// `from_ms <= ts <= to_ms`.
#[derive(Debug, Clone)]
pub struct Window {
    pub matchers: Vec<Matcher>,
    pub from_ms: i64,
    pub to_ms: i64,
    /// Some(width): the window is only aggregated (`avg|min|max|sum|count
    /// _over_time` over a range equal to the step, the steps' ends on
    /// multiples of it), so time buckets of this width, aligned to the
    /// epoch, from `from_ms` up to `to_ms + width`, answer it exactly (the
    /// store folds blocks from their headers and reads rollups) in place
    /// of samples.
    pub bucket_ms: Option<i64>,
}

/// What was loaded for a window: each matching series and its samples,
/// in time order, or (for a window with `bucket_ms`) its buckets.
#[derive(Debug, Clone, Default)]
pub struct Loaded {
    pub series: Vec<(Labels, Vec<(i64, f64)>)>,
    /// Per series (same order), when loaded as buckets.
    pub buckets: Option<Vec<Vec<Agg>>>,
}

/// The aggregates of one series over one bucket [start, start + width).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Agg {
    pub start_ms: i64,
    pub count: u64,
    pub sum: f64,
    pub min: f64,
    pub max: f64,
    /// The bucket's first reading and when it was taken.
    pub first: f64,
    pub first_ts_ms: i64,
}

/// Range functions a window of buckets answers.
const BUCKET_FUNCTIONS: &[&str] = &[
    "avg_over_time",
    "min_over_time",
    "max_over_time",
    "sum_over_time",
    "count_over_time",
];

/// A parsed query inside the answered subset.
#[derive(Debug)]
pub struct Query {
    expr: Expr,
}

/// Range functions answered (each takes one range vector; quantile's φ
/// comes first).
const RANGE_FUNCTIONS: &[&str] = &[
    "rate",
    "increase",
    "delta",
    "deriv",
    "avg_over_time",
    "min_over_time",
    "max_over_time",
    "sum_over_time",
    "count_over_time",
    "last_over_time",
    "quantile_over_time",
];
const AGGREGATIONS: &[&str] = &["sum", "avg", "min", "max", "count", "topk", "bottomk"];
const BINARY: &[&str] = &[
    "+", "-", "*", "/", "%", "^", "atan2", "==", "!=", ">", "<", ">=", "<=", "and", "or", "unless",
];

impl Query {
    /// Parses `text` and checks it is inside the subset: anything else is
    /// refused as bad_data, never answered approximately.
    pub fn parse(text: &str) -> Result<Self, QueryError> {
        let expr = parse_expr(text)?;
        check(&expr)?;
        Ok(Self { expr })
    }

    /// The selectors' windows over `steps`, in the order
    /// [`Query::evaluate`] takes their data.
    pub fn windows(&self, steps: &Steps) -> Vec<Window> {
        let mut out = Vec::new();
        collect_windows(&self.expr, steps, &mut out);
        out
    }

    /// Evaluates over `steps` with the data of [`Query::windows`], in order.
    pub fn evaluate(&self, steps: &Steps, loaded: Vec<Loaded>) -> Result<Value, QueryError> {
        eval::evaluate(&self.expr, steps, loaded)
    }
}

fn is_scalar(expr: &Expr) -> bool {
    match expr {
        Expr::NumberLiteral(_) => true,
        Expr::Paren(p) => is_scalar(&p.expr),
        Expr::Unary(u) => is_scalar(&u.expr),
        Expr::Binary(b) => is_scalar(&b.lhs) && is_scalar(&b.rhs),
        _ => false,
    }
}

fn check(expr: &Expr) -> Result<(), QueryError> {
    match expr {
        Expr::NumberLiteral(_) => Ok(()),
        Expr::VectorSelector(_) => Ok(()),
        Expr::Paren(p) => check(&p.expr),
        Expr::Unary(u) => check(&u.expr),
        Expr::Binary(b) => {
            let op = b.op.to_string();
            if !BINARY.contains(&op.as_str()) {
                return Err(bad(format!("the operator {op:?} is not supported")));
            }
            if let Some(m) = &b.modifier {
                use promql_parser::parser::VectorMatchCardinality as C;
                if matches!(m.card, C::ManyToOne(_) | C::OneToMany(_)) {
                    return Err(bad("group_left and group_right are not supported"));
                }
                if m.fill_values.lhs.is_some() || m.fill_values.rhs.is_some() {
                    return Err(bad("fill modifiers are not supported"));
                }
            }
            check(&b.lhs)?;
            check(&b.rhs)
        }
        Expr::Aggregate(a) => {
            let op = a.op.to_string();
            if !AGGREGATIONS.contains(&op.as_str()) {
                return Err(bad(format!("the aggregation {op:?} is not supported")));
            }
            if let Some(p) = &a.param {
                check(p)?;
            }
            check(&a.expr)
        }
        Expr::Call(call) => {
            let name = call.func.name;
            if !RANGE_FUNCTIONS.contains(&name) {
                return Err(bad(format!("the function {name}() is not supported")));
            }
            let args = &call.args.args;
            let (params, range) = match args.as_slice() {
                [range] => (&[][..], range),
                [params @ .., range] => (params, range),
                [] => return Err(bad(format!("{name}() needs an argument"))),
            };
            if !matches!(**range, Expr::MatrixSelector(_)) {
                return Err(bad(format!(
                    "{name}() is supported over a range selector (metric[5m]) only; subqueries are not supported"
                )));
            }
            for p in params {
                if !is_scalar(p) {
                    return Err(bad(format!("{name}()'s parameter must be a number")));
                }
            }
            Ok(())
        }
        Expr::MatrixSelector(_) => Ok(()),
        Expr::Subquery(_) => Err(bad("subqueries are not supported")),
        Expr::StringLiteral(_) => Err(bad("string values are not supported")),
        Expr::Extension(_) => Err(bad("extensions are not supported")),
    }
}

/// The selector's matchers, its metric name as a `__name__` matcher.
fn selector_matchers(vs: &VectorSelector) -> Vec<Matcher> {
    let mut out = vs.matchers.matchers.clone();
    if let Some(name) = &vs.name
        && !out.iter().any(|m| m.name == NAME)
    {
        out.push(Matcher::new(MatchOp::Equal, NAME, name));
    }
    out
}

/// Offset in ms (positive looks back).
fn offset_ms(o: &Option<Offset>) -> i64 {
    match o {
        None => 0,
        Some(Offset::Pos(d)) => ms(*d),
        Some(Offset::Neg(d)) => -ms(*d),
    }
}

fn ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// The time a selector reads at for the step at `t`: its `@` time or
/// `t`, less its offset.
fn ref_time(vs: &VectorSelector, steps: &Steps, t: i64) -> i64 {
    let at = match &vs.at {
        None => t,
        Some(AtModifier::Start) => steps.start_ms,
        Some(AtModifier::End) => steps.end_ms,
        Some(AtModifier::At(time)) => match time.duration_since(SystemTime::UNIX_EPOCH) {
            Ok(d) => ms(d),
            Err(e) => -ms(e.duration()),
        },
    };
    at.saturating_sub(offset_ms(&vs.offset))
}

fn collect_windows(expr: &Expr, steps: &Steps, out: &mut Vec<Window>) {
    let window = |vs: &VectorSelector, before: i64| {
        let first = ref_time(vs, steps, steps.start_ms);
        let last = ref_time(vs, steps, steps.end_ms);
        Window {
            matchers: selector_matchers(vs),
            from_ms: first.min(last).saturating_sub(before),
            to_ms: first.max(last),
            bucket_ms: None,
        }
    };
    // An aggregate over ranges that tile the steps: buckets.
    if let Expr::Call(call) = expr
        && BUCKET_FUNCTIONS.contains(&call.func.name)
        && let [arg] = call.args.args.as_slice()
        && let Expr::MatrixSelector(m) = &**arg
    {
        let range = ms(m.range);
        let first = ref_time(&m.vs, steps, steps.start_ms);
        let tiles = (steps.start_ms == steps.end_ms || steps.step_ms == range)
            && m.vs.at.is_none()
            && range > 0
            && first.rem_euclid(range) == 0;
        let mut w = window(&m.vs, range);
        if tiles {
            w.bucket_ms = Some(range);
        }
        out.push(w);
        return;
    }
    match expr {
        Expr::VectorSelector(vs) => out.push(window(vs, LOOKBACK_MS)),
        Expr::MatrixSelector(m) => out.push(window(&m.vs, ms(m.range))),
        Expr::Paren(p) => collect_windows(&p.expr, steps, out),
        Expr::Unary(u) => collect_windows(&u.expr, steps, out),
        Expr::Binary(b) => {
            collect_windows(&b.lhs, steps, out);
            collect_windows(&b.rhs, steps, out);
        }
        Expr::Aggregate(a) => {
            if let Some(p) = &a.param {
                collect_windows(p, steps, out);
            }
            collect_windows(&a.expr, steps, out);
        }
        Expr::Call(c) => {
            for arg in &c.args.args {
                collect_windows(arg, steps, out);
            }
        }
        Expr::NumberLiteral(_)
        | Expr::StringLiteral(_)
        | Expr::Subquery(_)
        | Expr::Extension(_) => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sensor_and_tag_names_become_valid_prometheus_names() {
        assert_eq!(metric_name("temperature"), "temperature");
        assert_eq!(metric_name("env.temp-c"), "env_temp_c");
        assert_eq!(metric_name("2nd"), "_2nd");
        assert_eq!(metric_name("a:b"), "a:b");
        assert_eq!(label_name("a:b"), "a_b");
        let tags = [
            ("site".to_owned(), "north".to_owned()),
            ("device".to_owned(), "spoof".to_owned()),
            ("rack-no".to_owned(), "7".to_owned()),
        ]
        .into_iter()
        .collect();
        let labels = series_labels("d-1", &tags, "env.temp");
        let want: Labels = [
            ("__name__", "env_temp"),
            ("device", "d-1"),
            ("sensor", "env.temp"),
            ("site", "north"),
            ("rack_no", "7"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
        assert_eq!(labels, want);
    }

    #[test]
    fn queries_outside_the_subset_are_refused() {
        for q in [
            "rate(m[5m])[10m:1m]",
            "label_replace(m, \"a\", \"b\", \"c\", \"d\")",
            "m * on(device) group_left(site) n",
            "count_values(\"v\", m)",
            "rate(sum(m)[5m:])",
            "\"text\"",
            "histogram_quantile(0.9, m)",
        ] {
            assert!(
                matches!(Query::parse(q), Err(QueryError::BadData(_))),
                "{q} should be refused"
            );
        }
        for q in [
            "m",
            "sum by (site) (rate(m{device=~\"d.*\"}[5m] offset 1m))",
            "topk(2, avg_over_time(m[10m] @ 1700000000))",
            "quantile_over_time(0.9, m[1h]) > bool 3",
            "-m + 2 * n",
            "m and on(device) n",
        ] {
            Query::parse(q).unwrap_or_else(|e| panic!("{q}: {e}"));
        }
    }

    #[test]
    fn windows_cover_lookback_range_offset_and_at() {
        let steps = Steps::range(1_000_000, 2_000_000, 10_000).unwrap();
        let q = Query::parse("rate(m[1m] offset 30s) + n").unwrap();
        let w = q.windows(&steps);
        assert_eq!(
            (w[0].from_ms, w[0].to_ms),
            (1_000_000 - 90_000, 2_000_000 - 30_000)
        );
        assert_eq!(
            (w[1].from_ms, w[1].to_ms),
            (1_000_000 - LOOKBACK_MS, 2_000_000)
        );
        let q = Query::parse("m @ 500").unwrap();
        let w = q.windows(&steps);
        assert_eq!((w[0].from_ms, w[0].to_ms), (500_000 - LOOKBACK_MS, 500_000));
        assert!(Steps::range(0, 20_000, 1).is_err(), "over 11,000 points");
        // Aggregates over ranges that tile the steps read buckets.
        let steps = Steps::range(3_600_000, 7_200_000, 60_000).unwrap();
        let bucketed = |q: &str| Query::parse(q).unwrap().windows(&steps)[0].bucket_ms;
        assert_eq!(bucketed("avg_over_time(m[1m])"), Some(60_000));
        assert_eq!(bucketed("max_over_time(m[1m] offset 2m)"), Some(60_000));
        assert_eq!(bucketed("avg_over_time(m[2m])"), None, "ranges overlap");
        assert_eq!(
            bucketed("avg_over_time(m[1m] offset 1s)"),
            None,
            "not on bucket edges"
        );
        assert_eq!(bucketed("rate(m[1m])"), None);
        assert_eq!(bucketed("last_over_time(m[1m])"), None);
        assert_eq!(bucketed("avg_over_time(m[1m] @ 3600)"), None);
    }
}
