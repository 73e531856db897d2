//! Evaluation of a checked query at every step at once, over the samples
//! loaded for its selectors (in the order `collect_windows` listed them).

use std::collections::{BTreeMap, HashMap};

use promql_parser::parser::{
    AggregateExpr, BinaryExpr, Call, Expr, LabelModifier, MatrixSelector, VectorSelector,
};

use super::{Agg, LOOKBACK_MS, Labels, Loaded, NAME, QueryError, Steps, ms, ref_time};

/// A series of a vector value: a value at each step, or none.
#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    pub labels: Labels,
    pub values: Vec<Option<f64>>,
}

/// What an expression is worth at each step.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Scalar(Vec<f64>),
    Vector(Vec<Series>),
    /// An instant query of a range selector: each series' samples in the
    /// range (a range query cannot have one).
    Range(Vec<(Labels, Vec<(i64, f64)>)>),
}

struct Ctx<'a> {
    steps: &'a Steps,
    times: Vec<i64>,
    loaded: std::vec::IntoIter<Loaded>,
}

pub(super) fn evaluate(
    expr: &Expr,
    steps: &Steps,
    loaded: Vec<Loaded>,
) -> Result<Value, QueryError> {
    // Every intermediate vector holds at most a window's series at every
    // step: bounded before anything is allocated.
    let points = loaded
        .iter()
        .map(|l| l.series.len())
        .max()
        .unwrap_or(1)
        .max(1)
        .saturating_mul(steps.times_len());
    if points > super::MAX_POINTS {
        return Err(QueryError::BadData(format!(
            "the query would hold {points} points at once (series x steps), more than {}; narrow the selectors, the range or the resolution",
            super::MAX_POINTS
        )));
    }
    let mut ctx = Ctx {
        steps,
        times: steps.times(),
        loaded: loaded.into_iter(),
    };
    if let Expr::MatrixSelector(m) = expr {
        if steps.start_ms != steps.end_ms {
            return Err(QueryError::BadData(
                "invalid expression type \"range vector\" for range query, must be Scalar or instant Vector".into(),
            ));
        }
        let end = ref_time(&m.vs, steps, steps.start_ms);
        let start = end.saturating_sub(ms(m.range));
        let loaded = next_loaded(&mut ctx)?;
        let mut out: Vec<(Labels, Vec<(i64, f64)>)> = loaded
            .series
            .into_iter()
            .map(|(labels, samples)| {
                let kept = samples
                    .into_iter()
                    .filter(|(t, _)| *t >= start && *t <= end)
                    .collect();
                (labels, kept)
            })
            .filter(|(_, s): &(Labels, Vec<(i64, f64)>)| !s.is_empty())
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        return Ok(Value::Range(out));
    }
    let mut value = eval(expr, &mut ctx)?;
    if let Value::Vector(series) = &mut value {
        series.retain(|s| s.values.iter().any(Option::is_some));
        series.sort_by(|a, b| a.labels.cmp(&b.labels));
    }
    Ok(value)
}

fn exec(message: impl Into<String>) -> QueryError {
    QueryError::Execution(message.into())
}

fn eval(expr: &Expr, ctx: &mut Ctx<'_>) -> Result<Value, QueryError> {
    match expr {
        Expr::NumberLiteral(n) => Ok(Value::Scalar(vec![n.val; ctx.times.len()])),
        Expr::Paren(p) => eval(&p.expr, ctx),
        Expr::Unary(u) => Ok(match eval(&u.expr, ctx)? {
            Value::Scalar(v) => Value::Scalar(v.into_iter().map(|x| -x).collect()),
            Value::Vector(series) => Value::Vector(
                series
                    .into_iter()
                    .map(|mut s| {
                        s.labels.remove(NAME);
                        s.values.iter_mut().flatten().for_each(|v| *v = -*v);
                        s
                    })
                    .collect(),
            ),
            Value::Range(_) => return Err(range_operand()),
        }),
        Expr::VectorSelector(vs) => Ok(Value::Vector(instant(vs, ctx)?)),
        Expr::Call(call) => range_function(call, ctx),
        Expr::Aggregate(a) => aggregate(a, ctx),
        Expr::Binary(b) => binary(b, ctx),
        Expr::MatrixSelector(_) => Err(QueryError::BadData(
            "a range vector cannot be the value of a query or an operand; wrap it in a function such as rate()"
                .into(),
        )),
        Expr::StringLiteral(_) | Expr::Subquery(_) | Expr::Extension(_) => {
            Err(QueryError::BadData("not supported".into()))
        }
    }
}

fn range_operand() -> QueryError {
    QueryError::BadData(
        "a range vector cannot be an operand; wrap it in a function such as rate()".into(),
    )
}

fn next_loaded(ctx: &mut Ctx<'_>) -> Result<Loaded, QueryError> {
    ctx.loaded
        .next()
        .ok_or_else(|| exec("internal: a selector's data is missing"))
}

/// An instant vector: each series' last sample within the lookback.
fn instant(vs: &VectorSelector, ctx: &mut Ctx<'_>) -> Result<Vec<Series>, QueryError> {
    let loaded = next_loaded(ctx)?;
    let mut out = Vec::with_capacity(loaded.series.len());
    for (labels, samples) in loaded.series {
        let values = ctx
            .times
            .iter()
            .map(|&t| {
                let at = ref_time(vs, ctx.steps, t);
                let i = samples.partition_point(|(ts, _)| *ts <= at);
                (i > 0)
                    .then(|| samples[i - 1])
                    .filter(|(ts, _)| *ts >= at.saturating_sub(LOOKBACK_MS))
                    .map(|(_, v)| v)
            })
            .collect();
        out.push(Series { labels, values });
    }
    Ok(out)
}

/// A range function over a range selector, step by step.
fn range_function(call: &Call, ctx: &mut Ctx<'_>) -> Result<Value, QueryError> {
    let name = call.func.name;
    let args = &call.args.args;
    let mut params = Vec::new();
    for p in &args[..args.len() - 1] {
        match eval(p, ctx)? {
            Value::Scalar(v) => params.push(v),
            _ => {
                return Err(QueryError::BadData(format!(
                    "{name}()'s parameter must be a number"
                )));
            }
        }
    }
    let Expr::MatrixSelector(m) = &*args[args.len() - 1] else {
        return Err(QueryError::BadData(format!(
            "{name}() needs a range selector"
        )));
    };
    let loaded = next_loaded(ctx)?;
    let range = ms(m.range);
    if let Some(buckets) = loaded.buckets {
        return Ok(Value::Vector(from_buckets(
            name,
            m,
            loaded.series,
            buckets,
            range,
            ctx,
        )));
    }
    let mut out = Vec::with_capacity(loaded.series.len());
    for (mut labels, samples) in loaded.series {
        // Every range function drops the metric name but last_over_time
        // (which returns a sample as it was).
        if name != "last_over_time" {
            labels.remove(NAME);
        }
        let values = ctx
            .times
            .iter()
            .enumerate()
            .map(|(i, &t)| {
                let end = ref_time(&m.vs, ctx.steps, t);
                let start = end.saturating_sub(range);
                let lo = samples.partition_point(|(ts, _)| *ts < start);
                let hi = samples.partition_point(|(ts, _)| *ts <= end);
                let window = &samples[lo..hi];
                let param = params.first().map(|p| p[i]);
                over_range(name, window, start, end, m, param)
            })
            .collect();
        out.push(Series { labels, values });
    }
    Ok(Value::Vector(out))
}

/// A range function of a window loaded as buckets: the window [t - r, t]
/// is the bucket starting at t - r plus the next bucket's first reading
/// when it lies on t (both ends are in the range).
fn from_buckets(
    name: &str,
    m: &MatrixSelector,
    series: Vec<(Labels, Vec<(i64, f64)>)>,
    buckets: Vec<Vec<Agg>>,
    range: i64,
    ctx: &Ctx<'_>,
) -> Vec<Series> {
    series
        .into_iter()
        .zip(buckets)
        .map(|((mut labels, _), aggs)| {
            labels.remove(NAME);
            let at = |start: i64| {
                aggs.binary_search_by_key(&start, |a| a.start_ms)
                    .ok()
                    .map(|i| aggs[i])
            };
            let values = ctx
                .times
                .iter()
                .map(|&t| {
                    let end = ref_time(&m.vs, ctx.steps, t);
                    let mut total = at(end.saturating_sub(range)).unwrap_or(Agg {
                        start_ms: end.saturating_sub(range),
                        count: 0,
                        sum: 0.0,
                        min: f64::NAN,
                        max: f64::NAN,
                        first: f64::NAN,
                        first_ts_ms: 0,
                    });
                    if let Some(next) = at(end).filter(|n| n.count > 0 && n.first_ts_ms == end) {
                        let v = next.first;
                        total.count += 1;
                        total.sum += v;
                        total.min = nan_min(total.min, v);
                        total.max = nan_max(total.max, v);
                    }
                    if total.count == 0 {
                        return None;
                    }
                    Some(match name {
                        "avg_over_time" => total.sum / total.count as f64,
                        "sum_over_time" => total.sum,
                        "count_over_time" => total.count as f64,
                        "min_over_time" => total.min,
                        _ => total.max,
                    })
                })
                .collect();
            Series { labels, values }
        })
        .collect()
}

fn over_range(
    name: &str,
    w: &[(i64, f64)],
    start: i64,
    end: i64,
    m: &MatrixSelector,
    param: Option<f64>,
) -> Option<f64> {
    if w.is_empty() {
        return None;
    }
    let values = || w.iter().map(|(_, v)| *v);
    match name {
        "rate" => extrapolated(w, start, end, m, true, true),
        "increase" => extrapolated(w, start, end, m, true, false),
        "delta" => extrapolated(w, start, end, m, false, false),
        "deriv" => spans_time(w).then(|| slope(w)),
        "avg_over_time" => Some(values().sum::<f64>() / w.len() as f64),
        "sum_over_time" => Some(values().sum()),
        "count_over_time" => Some(w.len() as f64),
        "min_over_time" => Some(values().fold(f64::NAN, nan_min)),
        "max_over_time" => Some(values().fold(f64::NAN, nan_max)),
        "last_over_time" => w.last().map(|(_, v)| *v),
        "quantile_over_time" => Some(quantile(param.unwrap_or(f64::NAN), values().collect())),
        _ => None,
    }
}

/// Whether a window's samples are at two timestamps at least: what a
/// change per time needs. Prometheus keeps one sample per timestamp; a
/// hub series may hold several readings of one millisecond (other seqs),
/// which alone span no time, as a single sample would not.
fn spans_time(w: &[(i64, f64)]) -> bool {
    matches!((w.first(), w.last()), (Some(a), Some(b)) if a.0 < b.0)
}

/// Prometheus' extrapolated rate, increase and delta.
fn extrapolated(
    w: &[(i64, f64)],
    start: i64,
    end: i64,
    m: &MatrixSelector,
    counter: bool,
    per_second: bool,
) -> Option<f64> {
    if !spans_time(w) {
        return None;
    }
    let (first, last) = (w[0], w[w.len() - 1]);
    let mut result = last.1 - first.1;
    if counter {
        let mut previous = 0.0;
        for (_, v) in w {
            if *v < previous {
                result += previous;
            }
            previous = *v;
        }
    }
    let mut to_start = first.0.saturating_sub(start) as f64 / 1000.0;
    let to_end = (end - last.0) as f64 / 1000.0;
    let sampled = (last.0 - first.0) as f64 / 1000.0;
    let average = sampled / (w.len() - 1) as f64;
    if counter && result > 0.0 && first.1 >= 0.0 {
        let to_zero = sampled * (first.1 / result);
        if to_zero < to_start {
            to_start = to_zero;
        }
    }
    let threshold = average * 1.1;
    let mut interval = sampled;
    interval += if to_start < threshold {
        to_start
    } else {
        average / 2.0
    };
    interval += if to_end < threshold {
        to_end
    } else {
        average / 2.0
    };
    result *= interval / sampled;
    if per_second {
        result /= m.range.as_secs_f64();
    }
    Some(result)
}

/// The least-squares slope per second.
fn slope(w: &[(i64, f64)]) -> f64 {
    let t0 = w[0].0;
    let n = w.len() as f64;
    let (mut sx, mut sy, mut sxy, mut sx2) = (0.0, 0.0, 0.0, 0.0);
    let constant = w.iter().all(|(_, v)| *v == w[0].1);
    if constant {
        return if w[0].1.is_infinite() { f64::NAN } else { 0.0 };
    }
    for (t, v) in w {
        let x = (t - t0) as f64 / 1000.0;
        sx += x;
        sy += v;
        sxy += x * v;
        sx2 += x * x;
    }
    let cov = sxy - sx * sy / n;
    let var = sx2 - sx * sx / n;
    cov / var
}

/// Prometheus' quantile: linear interpolation between closest ranks.
fn quantile(q: f64, mut values: Vec<f64>) -> f64 {
    if values.is_empty() || q.is_nan() {
        return f64::NAN;
    }
    if q < 0.0 {
        return f64::NEG_INFINITY;
    }
    if q > 1.0 {
        return f64::INFINITY;
    }
    values.sort_by(f64::total_cmp);
    let n = values.len() as f64;
    let rank = q * (n - 1.0);
    let lower = rank.floor().max(0.0) as usize;
    let upper = (lower + 1).min(values.len() - 1);
    let weight = rank - rank.floor();
    values[lower] * (1.0 - weight) + values[upper] * weight
}

/// The labels a `by`/`on` list keeps, or all but `__name__` and a
/// `without`/`ignoring` list; with no list, all but `__name__` or none.
fn kept_labels(labels: &Labels, modifier: Option<&LabelModifier>, none_keeps_all: bool) -> Labels {
    let keep = |k: &String| match modifier {
        Some(LabelModifier::Include(on)) => on.labels.iter().any(|l| l == k),
        Some(LabelModifier::Exclude(off)) => k != NAME && !off.labels.iter().any(|l| l == k),
        None => none_keeps_all && k != NAME,
    };
    labels
        .iter()
        .filter(|(k, _)| keep(k))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

/// The labels a grouping keeps (none without `by` or `without`).
fn group_labels(labels: &Labels, modifier: &Option<LabelModifier>) -> Labels {
    kept_labels(labels, modifier.as_ref(), false)
}

/// The lower of two values, NaN giving way (Prometheus' min).
fn nan_min(m: f64, v: f64) -> f64 {
    if v < m || m.is_nan() { v } else { m }
}

/// The higher of two values, NaN giving way (Prometheus' max).
fn nan_max(m: f64, v: f64) -> f64 {
    if v > m || m.is_nan() { v } else { m }
}

fn aggregate(a: &AggregateExpr, ctx: &mut Ctx<'_>) -> Result<Value, QueryError> {
    let op = a.op.to_string();
    let param = match &a.param {
        Some(p) => match eval(p, ctx)? {
            Value::Scalar(v) => Some(v),
            _ => {
                return Err(QueryError::BadData(format!(
                    "{op}'s parameter must be a number"
                )));
            }
        },
        None => None,
    };
    let Value::Vector(input) = eval(&a.expr, ctx)? else {
        return Err(QueryError::BadData(format!(
            "{op} aggregates an instant vector, not a scalar"
        )));
    };
    let steps = ctx.times.len();
    if op == "topk" || op == "bottomk" {
        let k = param.unwrap_or_default();
        return Ok(Value::Vector(top_k(
            input,
            &a.modifier,
            &k,
            op == "topk",
            steps,
        )));
    }
    let mut groups: BTreeMap<Labels, Vec<usize>> = BTreeMap::new();
    for (i, s) in input.iter().enumerate() {
        groups
            .entry(group_labels(&s.labels, &a.modifier))
            .or_default()
            .push(i);
    }
    let mut out = Vec::with_capacity(groups.len());
    for (labels, members) in groups {
        let values = (0..steps)
            .map(|step| {
                let vals: Vec<f64> = members
                    .iter()
                    .filter_map(|&i| input[i].values[step])
                    .collect();
                if vals.is_empty() {
                    return None;
                }
                Some(match op.as_str() {
                    "sum" => vals.iter().sum(),
                    "avg" => vals.iter().sum::<f64>() / vals.len() as f64,
                    "count" => vals.len() as f64,
                    "min" => vals.iter().copied().fold(f64::NAN, nan_min),
                    _ => vals.iter().copied().fold(f64::NAN, nan_max),
                })
            })
            .collect();
        out.push(Series { labels, values });
    }
    Ok(Value::Vector(out))
}

/// topk / bottomk: at each step, the k highest (lowest) of each group,
/// with their own labels.
#[allow(clippy::needless_range_loop)] // steps index several vectors at once
fn top_k(
    input: Vec<Series>,
    modifier: &Option<LabelModifier>,
    k: &[f64],
    top: bool,
    steps: usize,
) -> Vec<Series> {
    let mut groups: BTreeMap<Labels, Vec<usize>> = BTreeMap::new();
    for (i, s) in input.iter().enumerate() {
        groups
            .entry(group_labels(&s.labels, modifier))
            .or_default()
            .push(i);
    }
    let mut keep = vec![vec![false; steps]; input.len()];
    for members in groups.values() {
        for step in 0..steps {
            let k = k.get(step).copied().unwrap_or(0.0);
            // NaN or below 1: none.
            if k.is_nan() || k < 1.0 {
                continue;
            }
            let mut present: Vec<(usize, f64)> = members
                .iter()
                .filter_map(|&i| input[i].values[step].map(|v| (i, v)))
                .collect();
            present.sort_by(|a, b| {
                let (x, y) = (a.1, b.1);
                // NaN sorts last either way.
                match (x.is_nan(), y.is_nan()) {
                    (true, false) => std::cmp::Ordering::Greater,
                    (false, true) => std::cmp::Ordering::Less,
                    _ if top => y.total_cmp(&x),
                    _ => x.total_cmp(&y),
                }
            });
            for (i, _) in present.into_iter().take(k as usize) {
                keep[i][step] = true;
            }
        }
    }
    input
        .into_iter()
        .zip(keep)
        .map(|(mut s, keep)| {
            for (v, k) in s.values.iter_mut().zip(keep) {
                if !k {
                    *v = None;
                }
            }
            s
        })
        .collect()
}

fn arithmetic(op: &str, l: f64, r: f64) -> Option<f64> {
    Some(match op {
        "+" => l + r,
        "-" => l - r,
        "*" => l * r,
        "/" => l / r,
        "%" => l % r,
        "^" => l.powf(r),
        "atan2" => l.atan2(r),
        _ => return None,
    })
}

fn compare(op: &str, l: f64, r: f64) -> bool {
    match op {
        "==" => l == r,
        "!=" => l != r,
        ">" => l > r,
        "<" => l < r,
        ">=" => l >= r,
        _ => l <= r,
    }
}

fn binary(b: &BinaryExpr, ctx: &mut Ctx<'_>) -> Result<Value, QueryError> {
    let op = b.op.to_string();
    let lhs = eval(&b.lhs, ctx)?;
    let rhs = eval(&b.rhs, ctx)?;
    let comparison = b.op.is_comparison_operator();
    let return_bool = b.modifier.as_ref().is_some_and(|m| m.return_bool);
    // What one pair of values gives: the value, or None to drop it.
    let combine = |l: f64, r: f64, keep: f64| -> Option<f64> {
        if comparison {
            let yes = compare(&op, l, r);
            if return_bool {
                Some(if yes { 1.0 } else { 0.0 })
            } else {
                yes.then_some(keep)
            }
        } else {
            arithmetic(&op, l, r)
        }
    };
    let drop_name = !comparison || return_bool;
    match (lhs, rhs) {
        (Value::Scalar(l), Value::Scalar(r)) => Ok(Value::Scalar(
            l.iter()
                .zip(&r)
                .map(|(&x, &y)| combine(x, y, x).unwrap_or(f64::NAN))
                .collect(),
        )),
        (Value::Vector(v), Value::Scalar(s)) => {
            Ok(Value::Vector(vector_scalar(v, &s, drop_name, |x, y| {
                combine(x, y, x)
            })))
        }
        (Value::Scalar(s), Value::Vector(v)) => {
            Ok(Value::Vector(vector_scalar(v, &s, drop_name, |x, y| {
                combine(y, x, x)
            })))
        }
        (Value::Range(_), _) | (_, Value::Range(_)) => Err(range_operand()),
        (Value::Vector(l), Value::Vector(r)) => {
            if b.op.is_set_operator() {
                return Ok(Value::Vector(set_operation(&op, l, r, b, ctx.times.len())));
            }
            vector_vector(l, r, b, drop_name, ctx.times.len(), |x, y| combine(x, y, x))
                .map(Value::Vector)
        }
    }
}

fn vector_scalar(
    v: Vec<Series>,
    s: &[f64],
    drop_name: bool,
    f: impl Fn(f64, f64) -> Option<f64>,
) -> Vec<Series> {
    v.into_iter()
        .map(|mut series| {
            if drop_name {
                series.labels.remove(NAME);
            }
            for (value, &k) in series.values.iter_mut().zip(s) {
                *value = value.and_then(|x| f(x, k));
            }
            series
        })
        .collect()
}

/// The labels two sides match on: all but `__name__` without `on` or
/// `ignoring`.
fn signature(labels: &Labels, b: &BinaryExpr) -> Labels {
    kept_labels(
        labels,
        b.modifier.as_ref().and_then(|m| m.matching.as_ref()),
        true,
    )
}

fn vector_vector(
    l: Vec<Series>,
    r: Vec<Series>,
    b: &BinaryExpr,
    drop_name: bool,
    steps: usize,
    f: impl Fn(f64, f64) -> Option<f64>,
) -> Result<Vec<Series>, QueryError> {
    // At each step a match group may hold one series per side.
    let mut right: HashMap<Labels, Vec<usize>> = HashMap::new();
    for (i, s) in r.iter().enumerate() {
        right.entry(signature(&s.labels, b)).or_default().push(i);
    }
    // As Prometheus: at a step where the left side has samples, two right
    // series of one match group are an error, matched or not.
    let left_any: Vec<bool> = (0..steps)
        .map(|step| l.iter().any(|s| s.values[step].is_some()))
        .collect();
    for (sig, members) in &right {
        for (step, any) in left_any.iter().enumerate() {
            if *any
                && members
                    .iter()
                    .filter(|&&j| r[j].values[step].is_some())
                    .count()
                    > 1
            {
                return Err(exec(format!(
                    "found duplicate series for the match group {sig:?} on the right hand-side of the operation; many-to-many matching not allowed"
                )));
            }
        }
    }
    let mut out: BTreeMap<Labels, Series> = BTreeMap::new();
    // Per match group, the steps a left series matched at already.
    let mut groups: HashMap<Labels, usize> = HashMap::new();
    let mut left_seen: Vec<Vec<bool>> = Vec::new();
    for ls in &l {
        let sig = signature(&ls.labels, b);
        let group = *groups.entry(sig.clone()).or_insert_with(|| {
            left_seen.push(vec![false; steps]);
            left_seen.len() - 1
        });
        let Some(partners) = right.get(&sig) else {
            continue;
        };
        let mut labels = ls.labels.clone();
        if drop_name {
            labels.remove(NAME);
        }
        match b.modifier.as_ref().and_then(|m| m.matching.as_ref()) {
            Some(LabelModifier::Include(on)) => {
                labels.retain(|k, _| on.labels.iter().any(|l| l == k))
            }
            Some(LabelModifier::Exclude(ignoring)) => {
                labels.retain(|k, _| !ignoring.labels.iter().any(|l| l == k))
            }
            None => {}
        }
        for step in 0..steps {
            let Some(x) = ls.values[step] else { continue };
            let Some(y) = partners.iter().find_map(|&j| r[j].values[step]) else {
                continue;
            };
            if let Some(v) = f(x, y) {
                // Checked on what the operation keeps, as Prometheus does.
                if std::mem::replace(&mut left_seen[group][step], true) {
                    return Err(exec(format!(
                        "multiple matches for labels {sig:?}: many-to-one matching must be explicit (group_left/group_right)"
                    )));
                }
                match out.get_mut(&labels) {
                    Some(s) => s.values[step] = Some(v),
                    None => {
                        let mut values = vec![None; steps];
                        values[step] = Some(v);
                        out.insert(
                            labels.clone(),
                            Series {
                                labels: labels.clone(),
                                values,
                            },
                        );
                    }
                }
            }
        }
    }
    Ok(out.into_values().collect())
}

/// and, or, unless: step by step, by the match signature.
fn set_operation(
    op: &str,
    l: Vec<Series>,
    r: Vec<Series>,
    b: &BinaryExpr,
    steps: usize,
) -> Vec<Series> {
    let present = |side: &[Series]| {
        let mut at: HashMap<Labels, Vec<bool>> = HashMap::new();
        for s in side {
            let e = at
                .entry(signature(&s.labels, b))
                .or_insert_with(|| vec![false; steps]);
            for (p, v) in e.iter_mut().zip(&s.values) {
                *p |= v.is_some();
            }
        }
        at
    };
    let in_right = present(&r);
    let filter = |s: Series, keep_if_present: bool, other: &HashMap<Labels, Vec<bool>>| {
        let sig = signature(&s.labels, b);
        let mut s = s;
        for (step, v) in s.values.iter_mut().enumerate() {
            let there = other.get(&sig).is_some_and(|p| p[step]);
            if there != keep_if_present {
                *v = None;
            }
        }
        s
    };
    match op {
        "and" => l.into_iter().map(|s| filter(s, true, &in_right)).collect(),
        "unless" => l.into_iter().map(|s| filter(s, false, &in_right)).collect(),
        _ => {
            let in_left = present(&l);
            let mut out: Vec<Series> = Vec::with_capacity(l.len() + r.len());
            let mut at: HashMap<Labels, usize> = HashMap::new();
            // One series per label set (Prometheus' range result merges
            // what each step's `or` gave).
            for s in l
                .into_iter()
                .chain(r.into_iter().map(|s| filter(s, false, &in_left)))
            {
                match at.get(&s.labels) {
                    Some(&i) => {
                        for (mine, theirs) in out[i].values.iter_mut().zip(s.values) {
                            if mine.is_none() {
                                *mine = theirs;
                            }
                        }
                    }
                    None => {
                        at.insert(s.labels.clone(), out.len());
                        out.push(s);
                    }
                }
            }
            out
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::{Loaded, Query, Steps};
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn rate_extrapolates_like_prometheus() {
        // A counter at 1/s (from 100) sampled every 10 s from t=5 s; rate
        // over [0, 60].
        let samples: Vec<(i64, f64)> = (0..6)
            .map(|i| (5_000 + i * 10_000, (100 + i * 10) as f64))
            .collect();
        let q = Query::parse("rate(c[1m])").unwrap();
        let steps = Steps::instant(60_000).unwrap();
        let loaded = vec![Loaded {
            series: vec![(labels(&[("__name__", "c"), ("device", "d")]), samples)],
            buckets: None,
        }];
        let Value::Vector(v) = q.evaluate(&steps, loaded).unwrap() else {
            panic!()
        };
        // 50 over 50 s sampled; 5 s to each edge (< 1.1 x 10 s): 60 s.
        assert_eq!(v[0].values[0], Some(1.0));
        assert_eq!(v[0].labels, labels(&[("device", "d")]));
        // From 0 the counter is not extrapolated before its zero: 55 s.
        let from_zero: Vec<(i64, f64)> = (0..6)
            .map(|i| (5_000 + i * 10_000, (i * 10) as f64))
            .collect();
        let loaded = vec![Loaded {
            series: vec![(labels(&[("__name__", "c")]), from_zero)],
            buckets: None,
        }];
        let Value::Vector(v) = q.evaluate(&steps, loaded).unwrap() else {
            panic!()
        };
        assert!((v[0].values[0].unwrap() - 55.0 / 60.0).abs() < 1e-12);
    }

    #[test]
    fn readings_of_one_millisecond_span_no_time() {
        // Two seqs in one millisecond: no rate, delta or deriv (not 0/0);
        // a second timestamp gives them one.
        let eval = |q: &str, samples: Vec<(i64, f64)>| {
            let loaded = vec![Loaded {
                series: vec![(labels(&[("__name__", "c")]), samples)],
                buckets: None,
            }];
            let steps = Steps::instant(60_000).unwrap();
            let Value::Vector(v) = Query::parse(q).unwrap().evaluate(&steps, loaded).unwrap()
            else {
                panic!()
            };
            v.first().and_then(|s| s.values[0])
        };
        for f in ["rate", "increase", "delta", "deriv"] {
            let q = format!("{f}(c[1m])");
            assert_eq!(eval(&q, vec![(30_000, 1.0), (30_000, 2.0)]), None, "{q}");
            let spread = eval(&q, vec![(30_000, 1.0), (30_000, 2.0), (40_000, 3.0)]);
            assert!(spread.is_some_and(f64::is_finite), "{q}: {spread:?}");
        }
        assert_eq!(
            eval("count_over_time(c[1m])", vec![(30_000, 1.0), (30_000, 2.0)]),
            Some(2.0),
            "every reading counts"
        );
    }

    #[test]
    fn aggregations_binary_matching_and_lookback() {
        let q = Query::parse("sum by (site) (m) / on(site) count by (site) (m) > bool 1").unwrap();
        let steps = Steps::range(0, 600_000, 300_000).unwrap();
        let series = |d: &str, site: &str, v: f64| {
            (
                labels(&[("__name__", "m"), ("device", d), ("site", site)]),
                vec![(0, v), (300_000, v + 1.0)],
            )
        };
        let data = || Loaded {
            series: vec![
                series("a", "n", 1.0),
                series("b", "n", 3.0),
                series("c", "s", 0.5),
            ],
            buckets: None,
        };
        let Value::Vector(v) = q.evaluate(&steps, vec![data(), data()]).unwrap() else {
            panic!()
        };
        assert_eq!(v.len(), 2);
        assert_eq!(v[0].labels, labels(&[("site", "n")]));
        // avg 2, 3, then 3 again (the 300 s sample is within the lookback at 600 s).
        assert_eq!(v[0].values, vec![Some(1.0), Some(1.0), Some(1.0)]);
        assert_eq!(v[1].values, vec![Some(0.0), Some(1.0), Some(1.0)]);
        let q = Query::parse("m > 1").unwrap();
        let Value::Vector(v) = q
            .evaluate(&Steps::instant(0).unwrap(), vec![data()])
            .unwrap()
        else {
            panic!()
        };
        assert_eq!(v.len(), 1, "filtered, name kept");
        assert_eq!(v[0].labels["__name__"], "m");
    }

    #[test]
    fn quantiles_interpolate() {
        assert_eq!(quantile(0.5, vec![1.0, 2.0, 3.0, 4.0]), 2.5);
        assert_eq!(quantile(0.0, vec![3.0, 1.0]), 1.0);
        assert_eq!(quantile(1.5, vec![1.0]), f64::INFINITY);
    }
}
