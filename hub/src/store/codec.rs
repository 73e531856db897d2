//! The block codec: one (device, sensor) series' points, sorted by
//! (ts, seq), in a few bits each.
//!
//! Layout (version 2, written since issue 22), integers little-endian:
//!
//! ```text
//! u8  version (2)
//! u8  value mode: 0 = any f64 (its IEEE bits), d + 1 = decimal with d
//!     digits: every value is exactly m / 10^d for an integer m
//! varint count (≥ 1), varint zigzag(last ts), varint last seq
//! stats (a bucket query folds a block inside one bucket from these,
//! without decoding):
//!   decimal: varint zigzag(m) of min, max, first, last; f64 sum
//!   any f64: 5 × f64 min, max, sum, first, last
//! varint zigzag(last ts − first ts), zigzag(last seq − first seq)
//!     (the first value is the stats' `first`)
//! 3 column plans (ts, seq, value): u8 predictor, u8 coder, and for the
//!   frame-of-reference predictors a varint zigzag(base)
//! bit stream, MSB first: the ts column's count − 1 residuals, then seq's,
//!   then the values'
//! ```
//!
//! Each column is a sequence of u64 (ts and mantissas as two's complement,
//! a float's bits) turned into non-negative residuals by the predictor
//! that makes them smallest for this block: the delta to the previous
//! point, the delta of deltas, the value minus the block's least value, or
//! the delta minus the least delta. The residuals are written by the
//! cheapest coder for them: Rice with parameter k (a quotient in unary,
//! then k bits; an escape for outliers), or a fixed width (width 0: every
//! residual is 0 and the column costs nothing). A float column may instead
//! use Gorilla's XOR. The encoder computes each choice's exact size and
//! keeps the smallest, so a regular clock costs 0 bits per point, a
//! jittered one a few, and a noisy 0.01 °C sensor close to its entropy.
//!
//! Version 1 (Gorilla's fixed buckets for every column, 64-bit first
//! point, 5 × f64 stats) is still read: its blocks are rewritten as
//! version 2 when they merge.
//!
//! Arithmetic wraps, so every i64 / u64 / f64 bit pattern round-trips
//! exactly (NaN payloads, -0.0, subnormals). Decoding never panics on
//! corrupt bytes: it returns an error.

/// One stored reading of a series.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Point {
    pub ts_ms: i64,
    pub seq: u64,
    pub value: f64,
}

impl Point {
    pub fn key(&self) -> (i64, u64) {
        (self.ts_ms, self.seq)
    }
}

/// What a block's header says about its values.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BlockStats {
    pub count: u32,
    /// The key of the last point (in stored order).
    pub last_ts: i64,
    pub last_seq: u64,
    pub min: f64,
    pub max: f64,
    pub sum: f64,
    pub first: f64,
    pub last: f64,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CodecError {
    #[error("block is truncated")]
    Truncated,
    #[error("unknown block version {0}")]
    Version(u8),
    #[error("unknown value mode {0}")]
    Mode(u8),
    #[error("block claims {0} points")]
    Count(u64),
    #[error("unknown column plan ({0}, {1})")]
    Plan(u8, u8),
}

const V1: u8 = 1;
const V2: u8 = 2;
const MODE_FLOAT: u8 = 0;
/// Decimal digits tried for the decimal value mode: 10^d stays exact.
const MAX_DIGITS: u8 = 9;
/// Points in one block at most (the writer keeps to 8192). A column can
/// cost 0 bits a point, so this also bounds what a small corrupt block can
/// decode to (1.5 MiB of points).
pub const MAX_POINTS: usize = 1 << 16;

/// Encodes points (sorted by (ts, seq) by the caller, at least one).
pub fn encode(points: &[Point]) -> Vec<u8> {
    assert!(
        !points.is_empty() && points.len() <= MAX_POINTS,
        "block size"
    );
    let digits = decimal_digits(points);
    let mut out = Vec::with_capacity(64 + points.len());
    out.push(V2);
    out.push(digits.map_or(MODE_FLOAT, |d| d + 1));
    put_varint(&mut out, points.len() as u64);
    let (first, end) = (points[0], points[points.len() - 1]);
    put_varint(&mut out, zigzag(end.ts_ms));
    put_varint(&mut out, end.seq);
    let stats = stats_of(points);
    let values: Vec<u64> = match digits.map(pow10) {
        Some(scale) => {
            for v in [stats.min, stats.max, stats.first, stats.last] {
                put_varint(&mut out, zigzag(to_mantissa(v, scale)));
            }
            out.extend_from_slice(&stats.sum.to_bits().to_le_bytes());
            points
                .iter()
                .map(|p| to_mantissa(p.value, scale) as u64)
                .collect()
        }
        None => {
            for v in [stats.min, stats.max, stats.sum, stats.first, stats.last] {
                out.extend_from_slice(&v.to_bits().to_le_bytes());
            }
            points.iter().map(|p| p.value.to_bits()).collect()
        }
    };
    // The first key, back from the last (a block's span is short).
    put_varint(&mut out, zigzag(end.ts_ms.wrapping_sub(first.ts_ms)));
    put_varint(&mut out, zigzag(end.seq.wrapping_sub(first.seq) as i64));
    let ts: Vec<u64> = points.iter().map(|p| p.ts_ms as u64).collect();
    let seq: Vec<u64> = points.iter().map(|p| p.seq).collect();
    let value_kind = match digits {
        Some(_) => ColumnKind::Decimal,
        None => ColumnKind::Float,
    };
    let columns = [
        Column::plan(&ts, ColumnKind::Key),
        Column::plan(&seq, ColumnKind::Key),
        Column::plan(&values, value_kind),
    ];
    for c in &columns {
        c.put_plan(&mut out);
    }
    let mut bits = BitWriter::new(out);
    for c in &columns {
        c.put_residuals(&mut bits);
    }
    bits.finish()
}

/// Reads only the header: the count and the value statistics.
pub fn stats(block: &[u8]) -> Result<BlockStats, CodecError> {
    Ok(header(block)?.stats)
}

/// Decodes every point, appending them to `out` in stored order.
pub fn decode_into(block: &[u8], out: &mut Vec<Point>) -> Result<(), CodecError> {
    let h = header(block)?;
    if h.version == V1 {
        return v1::decode_into(&h, out);
    }
    let n = h.stats.count as usize;
    let (ts_span, rest) = get_varint(h.body)?;
    let (seq_span, mut rest) = get_varint(rest)?;
    let first_ts = h.stats.last_ts.wrapping_sub(unzigzag(ts_span));
    let first_seq = h.stats.last_seq.wrapping_sub(unzigzag(seq_span) as u64);
    let mut plans = [Plan::ZERO; 3];
    for plan in &mut plans {
        (*plan, rest) = Plan::get(rest)?;
    }
    if plans[0].predictor == Predictor::Xor || plans[1].predictor == Predictor::Xor {
        return Err(CodecError::Plan(Predictor::Xor as u8, 0));
    }
    let mut bits = BitReader::new(rest);
    let start = out.len();
    out.reserve(n);
    let first_value = h.first_bits;
    out.push(Point {
        ts_ms: first_ts,
        seq: first_seq,
        value: 0.0,
    });
    // The ts column pushes the points; seq and values fill them in.
    plans[0].get_column(&mut bits, n, first_ts as u64, |_, x| {
        out.push(Point {
            ts_ms: x as i64,
            seq: 0,
            value: 0.0,
        });
    })?;
    let points = &mut out[start..];
    plans[1].get_column(&mut bits, n, first_seq, |i, x| points[i].seq = x)?;
    match h.scale {
        Some(scale) => {
            points[0].value = first_value as i64 as f64 / scale;
            plans[2].get_column(&mut bits, n, first_value, |i, m| {
                points[i].value = m as i64 as f64 / scale;
            })?;
        }
        None => {
            points[0].value = f64::from_bits(first_value);
            plans[2].get_column(&mut bits, n, first_value, |i, b| {
                points[i].value = f64::from_bits(b);
            })?;
        }
    }
    Ok(())
}

pub fn decode(block: &[u8]) -> Result<Vec<Point>, CodecError> {
    let mut out = Vec::new();
    decode_into(block, &mut out)?;
    Ok(out)
}

struct Header<'a> {
    version: u8,
    stats: BlockStats,
    /// `Some(10^d)` in the decimal mode.
    scale: Option<f64>,
    /// Version 2: the first value as its column holds it (the mantissa
    /// as two's complement, or the float's bits).
    first_bits: u64,
    body: &'a [u8],
}

fn header(block: &[u8]) -> Result<Header<'_>, CodecError> {
    let [version, mode, rest @ ..] = block else {
        return Err(CodecError::Truncated);
    };
    if *version != V1 && *version != V2 {
        return Err(CodecError::Version(*version));
    }
    let scale = match *mode {
        MODE_FLOAT => None,
        m if m <= MAX_DIGITS + 1 => Some(pow10(m - 1)),
        m => return Err(CodecError::Mode(m)),
    };
    let (count, rest) = get_varint(rest)?;
    let (last_ts, rest) = get_varint(rest)?;
    let (last_seq, rest) = get_varint(rest)?;
    if count == 0 || count > MAX_POINTS as u64 {
        return Err(CodecError::Count(count));
    }
    let mut stats = BlockStats {
        count: count as u32,
        last_ts: unzigzag(last_ts),
        last_seq,
        min: 0.0,
        max: 0.0,
        sum: 0.0,
        first: 0.0,
        last: 0.0,
    };
    let mut rest = rest;
    let first_bits = match (*version, scale) {
        (V2, Some(scale)) => {
            let mut m = [0u64; 4];
            for slot in &mut m {
                (*slot, rest) = get_varint(rest)?;
            }
            let value = |z: u64| unzigzag(z) as f64 / scale;
            (stats.min, stats.max, stats.first, stats.last) =
                (value(m[0]), value(m[1]), value(m[2]), value(m[3]));
            (stats.sum, rest) = get_f64(rest)?;
            unzigzag(m[2]) as u64
        }
        _ => {
            for slot in [
                &mut stats.min,
                &mut stats.max,
                &mut stats.sum,
                &mut stats.first,
                &mut stats.last,
            ] {
                (*slot, rest) = get_f64(rest)?;
            }
            stats.first.to_bits()
        }
    };
    Ok(Header {
        version: *version,
        stats,
        scale,
        first_bits,
        body: rest,
    })
}

fn get_f64(bytes: &[u8]) -> Result<(f64, &[u8]), CodecError> {
    let Some((head, rest)) = bytes.split_first_chunk::<8>() else {
        return Err(CodecError::Truncated);
    };
    Ok((f64::from_bits(u64::from_le_bytes(*head)), rest))
}

fn stats_of(points: &[Point]) -> BlockStats {
    let end = points[points.len() - 1];
    let mut s = BlockStats {
        count: points.len() as u32,
        last_ts: end.ts_ms,
        last_seq: end.seq,
        min: points[0].value,
        max: points[0].value,
        sum: 0.0,
        first: points[0].value,
        last: points[points.len() - 1].value,
    };
    for p in points {
        s.min = s.min.min(p.value);
        s.max = s.max.max(p.value);
        s.sum += p.value;
    }
    s
}

fn pow10(d: u8) -> f64 {
    10f64.powi(i32::from(d))
}

/// m with m / scale == v exactly; only called for values that passed
/// [`decimal_digits`].
fn to_mantissa(v: f64, scale: f64) -> i64 {
    (v * scale).round() as i64
}

/// Mantissas stay below 2^53, so m as f64 is exact.
const MAX_MANTISSA: f64 = 9_007_199_254_740_992.0;

fn is_decimal(v: f64, scale: f64) -> bool {
    let m = (v * scale).round();
    m.abs() < MAX_MANTISSA && (m as i64 as f64 / scale).to_bits() == v.to_bits()
}

/// The fewest decimal digits that represent every value exactly, if any.
fn decimal_digits(points: &[Point]) -> Option<u8> {
    let mut d = 0u8;
    'digits: while d <= MAX_DIGITS {
        let scale = pow10(d);
        for p in points {
            if !is_decimal(p.value, scale) {
                d += 1;
                continue 'digits;
            }
        }
        return Some(d);
    }
    None
}

/// How a column's values become residuals.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
enum Predictor {
    /// zigzag(x[i] − x[i−1])
    Delta = 0,
    /// zigzag((x[i] − x[i−1]) − (x[i−1] − x[i−2])), the delta before the
    /// first being 0
    DeltaOfDelta = 1,
    /// x[i] − base, base the least x[i] (i ≥ 1) as i64
    Offset = 2,
    /// (x[i] − x[i−1]) − base, base the least delta as i64
    DeltaOffset = 3,
    /// Gorilla's XOR of float bits (its own bit format; no coder)
    Xor = 4,
}

impl Predictor {
    const INTEGER: [Self; 4] = [
        Self::Delta,
        Self::DeltaOfDelta,
        Self::Offset,
        Self::DeltaOffset,
    ];

    fn from_u8(b: u8) -> Option<Self> {
        Self::INTEGER
            .into_iter()
            .chain([Self::Xor])
            .find(|p| *p as u8 == b)
    }

    /// The residuals of x[1..] into `out`, and the base (0 unless an
    /// offset).
    fn residuals(self, xs: &[u64], out: &mut Vec<u64>) -> u64 {
        out.clear();
        let deltas = || xs.windows(2).map(|w| w[1].wrapping_sub(w[0]));
        match self {
            Self::Delta => {
                out.extend(deltas().map(|d| zigzag(d as i64)));
                0
            }
            Self::DeltaOfDelta => {
                let mut before = 0u64;
                out.extend(deltas().map(|d| {
                    let dod = d.wrapping_sub(before);
                    before = d;
                    zigzag(dod as i64)
                }));
                0
            }
            Self::Offset => {
                let base = xs[1..].iter().map(|&x| x as i64).min().unwrap_or(0) as u64;
                out.extend(xs[1..].iter().map(|x| x.wrapping_sub(base)));
                base
            }
            Self::DeltaOffset => {
                let base = deltas().map(|d| d as i64).min().unwrap_or(0) as u64;
                out.extend(deltas().map(|d| d.wrapping_sub(base)));
                base
            }
            Self::Xor => 0,
        }
    }

    /// x[i] from the residual, x[i−1] and the delta before it.
    #[inline]
    fn undo(self, r: u64, base: u64, prev: u64, delta: u64) -> u64 {
        match self {
            Self::Delta => prev.wrapping_add(unzigzag(r) as u64),
            Self::DeltaOfDelta => prev.wrapping_add(delta).wrapping_add(unzigzag(r) as u64),
            Self::Offset => r.wrapping_add(base),
            Self::DeltaOffset | Self::Xor => prev.wrapping_add(r.wrapping_add(base)),
        }
    }
}

/// How residuals are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Coder {
    /// q = r >> k in unary (q ones, a zero), then the low k bits; q ≥
    /// [`RICE_ESCAPE`] is [`RICE_ESCAPE`] ones and the 64-bit residual.
    Rice(u32),
    /// Every residual in w bits (w = 0: all are 0).
    Fixed(u32),
}

/// Longest unary quotient before the escape.
const RICE_ESCAPE: u32 = 32;
/// Coder bytes: 0..=63 Rice(k), FIXED + w for w in 0..=64.
const FIXED: u8 = 64;

impl Coder {
    fn to_u8(self) -> u8 {
        match self {
            Self::Rice(k) => k as u8,
            Self::Fixed(w) => FIXED + w as u8,
        }
    }

    fn from_u8(b: u8) -> Option<Self> {
        match b {
            0..FIXED => Some(Self::Rice(u32::from(b))),
            _ if b <= FIXED + 64 => Some(Self::Fixed(u32::from(b - FIXED))),
            _ => None,
        }
    }

    /// The bits one residual takes with Rice(k).
    #[inline]
    fn rice_bits(r: u64, k: u32) -> u64 {
        match r >> k {
            q if q < u64::from(RICE_ESCAPE) => q + 1 + u64::from(k),
            _ => u64::from(RICE_ESCAPE) + 64,
        }
    }

    /// The cheapest coder for `rs` and its exact size in bits: the fixed
    /// width of the largest, or Rice around log2 of the mean (where its
    /// optimum lies).
    fn best(rs: &[u64]) -> (Self, u64) {
        let (mut max, mut sum) = (0u64, 0u128);
        for &r in rs {
            max = max.max(r);
            sum += u128::from(r);
        }
        let width = 64 - max.leading_zeros();
        let mut best = (Self::Fixed(width), u64::from(width) * rs.len() as u64);
        if max == 0 {
            return best;
        }
        let mean = (sum / rs.len() as u128).max(1);
        let k0 = 127 - mean.leading_zeros();
        let ks: [u32; 4] = std::array::from_fn(|i| (k0 + i as u32).saturating_sub(2).min(63));
        let mut costs = [0u64; 4];
        for &r in rs {
            for (cost, &k) in costs.iter_mut().zip(&ks) {
                *cost += Self::rice_bits(r, k);
            }
        }
        for (cost, k) in costs.into_iter().zip(ks) {
            if cost < best.1 {
                best = (Self::Rice(k), cost);
            }
        }
        best
    }

    fn put(self, bits: &mut BitWriter, r: u64) {
        match self {
            Self::Fixed(w) => bits.put(r, w),
            Self::Rice(k) => match r >> k {
                q if q < u64::from(RICE_ESCAPE) => {
                    // q ones and a zero, then the low k bits.
                    bits.put((1u64 << (q + 1)) - 2, q as u32 + 1);
                    bits.put(r, k);
                }
                _ => {
                    bits.put((1u64 << RICE_ESCAPE) - 1, RICE_ESCAPE);
                    bits.put(r, 64);
                }
            },
        }
    }

    #[inline]
    fn get(self, bits: &mut BitReader) -> Result<u64, CodecError> {
        match self {
            Self::Fixed(w) => bits.take(w),
            Self::Rice(k) => {
                let q = bits.ones(RICE_ESCAPE)?;
                if q == RICE_ESCAPE {
                    return bits.take(64);
                }
                Ok((u64::from(q) << k) | bits.take(k)?)
            }
        }
    }
}

/// A column's predictor, coder and base, as stored.
#[derive(Debug, Clone, Copy)]
struct Plan {
    predictor: Predictor,
    coder: Coder,
    base: u64,
}

impl Plan {
    const ZERO: Self = Self {
        predictor: Predictor::Delta,
        coder: Coder::Fixed(0),
        base: 0,
    };

    fn has_base(&self) -> bool {
        matches!(self.predictor, Predictor::Offset | Predictor::DeltaOffset)
    }

    fn put(&self, out: &mut Vec<u8>) {
        out.push(self.predictor as u8);
        out.push(self.coder.to_u8());
        if self.has_base() {
            put_varint(out, zigzag(self.base as i64));
        }
    }

    fn get(bytes: &[u8]) -> Result<(Self, &[u8]), CodecError> {
        let [p, c, rest @ ..] = bytes else {
            return Err(CodecError::Truncated);
        };
        let (Some(predictor), Some(coder)) = (Predictor::from_u8(*p), Coder::from_u8(*c)) else {
            return Err(CodecError::Plan(*p, *c));
        };
        let mut plan = Self {
            predictor,
            coder,
            base: 0,
        };
        if !plan.has_base() {
            return Ok((plan, rest));
        }
        let (base, rest) = get_varint(rest)?;
        plan.base = unzigzag(base) as u64;
        Ok((plan, rest))
    }

    /// Reads x[1..n] (x[0] = `first`) and hands each to `set(i, x)`.
    fn get_column(
        &self,
        bits: &mut BitReader,
        n: usize,
        first: u64,
        mut set: impl FnMut(usize, u64),
    ) -> Result<(), CodecError> {
        if self.predictor == Predictor::Xor {
            let mut xor = XorState::new(first);
            for i in 1..n {
                xor.get(bits)?;
                set(i, xor.bits);
            }
            return Ok(());
        }
        let (mut prev, mut delta) = (first, 0u64);
        for i in 1..n {
            let r = self.coder.get(bits)?;
            let x = self.predictor.undo(r, self.base, prev, delta);
            (prev, delta) = (x, x.wrapping_sub(prev));
            set(i, x);
        }
        Ok(())
    }
}

/// What a column holds, for the predictors worth trying.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ColumnKind {
    /// ts or seq
    Key,
    Decimal,
    Float,
}

/// A column to write: its plan and residuals.
struct Column<'a> {
    plan: Plan,
    residuals: Vec<u64>,
    /// For the XOR predictor: the raw float bits.
    xs: &'a [u64],
}

impl<'a> Column<'a> {
    /// The smallest of every predictor and coder for `xs` (XOR too when
    /// `float`).
    fn plan(xs: &'a [u64], kind: ColumnKind) -> Self {
        let (mut residuals, mut trial) = (Vec::new(), Vec::new());
        let mut best: Option<(u64, Plan)> = None;
        let predictors: &[Predictor] = match kind {
            // A clock and a counter only go up: an offset from the least
            // value never wins.
            ColumnKind::Key => &[
                Predictor::Delta,
                Predictor::DeltaOfDelta,
                Predictor::DeltaOffset,
            ],
            ColumnKind::Decimal | ColumnKind::Float => &Predictor::INTEGER,
        };
        for &predictor in predictors {
            let base = predictor.residuals(xs, &mut trial);
            let (coder, cost) = Coder::best(&trial);
            if best.is_none_or(|(c, _)| cost < c) {
                let plan = Plan {
                    predictor,
                    coder,
                    base,
                };
                best = Some((cost, plan));
                std::mem::swap(&mut residuals, &mut trial);
            }
        }
        let (cost, plan) = best.expect("a predictor");
        let column = Column {
            plan,
            residuals,
            xs,
        };
        if kind == ColumnKind::Float {
            let mut counter = BitCounter::default();
            XorState::put_all(&mut counter, xs);
            if counter.0 < cost {
                return Column {
                    plan: Plan {
                        predictor: Predictor::Xor,
                        ..Plan::ZERO
                    },
                    residuals: Vec::new(),
                    xs,
                };
            }
        }
        column
    }

    fn put_plan(&self, out: &mut Vec<u8>) {
        self.plan.put(out);
    }

    fn put_residuals(&self, bits: &mut BitWriter) {
        if self.plan.predictor == Predictor::Xor {
            XorState::put_all(bits, self.xs);
            return;
        }
        for &r in &self.residuals {
            self.plan.coder.put(bits, r);
        }
    }
}

/// Gorilla's XOR of float bits with a reused leading/trailing window.
struct XorState {
    bits: u64,
    leading: u32,
    trailing: u32,
}

impl XorState {
    fn new(first: u64) -> Self {
        Self {
            bits: first,
            leading: u32::MAX,
            trailing: 0,
        }
    }

    /// Writes xs[1..] against their predecessors.
    fn put_all(out: &mut impl BitSink, xs: &[u64]) {
        let mut state = Self::new(xs[0]);
        for &x in &xs[1..] {
            state.put(out, x);
        }
    }

    fn put(&mut self, out: &mut impl BitSink, now: u64) {
        let xor = now ^ self.bits;
        self.bits = now;
        if xor == 0 {
            out.put(0, 1);
            return;
        }
        let lz = xor.leading_zeros();
        let tz = xor.trailing_zeros();
        if self.leading != u32::MAX && lz >= self.leading && tz >= self.trailing {
            let len = 64 - self.leading - self.trailing;
            out.put(0b10, 2);
            out.put(xor >> self.trailing, len);
        } else {
            let len = 64 - lz - tz;
            out.put(0b11, 2);
            out.put(u64::from(lz), 6);
            out.put(u64::from(len - 1), 6);
            out.put(xor >> tz, len);
            (self.leading, self.trailing) = (lz, tz);
        }
    }

    fn get(&mut self, bits: &mut BitReader) -> Result<(), CodecError> {
        if bits.take(1)? == 0 {
            return Ok(());
        }
        if bits.take(1)? == 0 {
            if self.leading == u32::MAX {
                return Err(CodecError::Truncated);
            }
            let len = 64 - self.leading - self.trailing;
            self.bits ^= bits.take(len)? << self.trailing;
        } else {
            let lz = bits.take(6)? as u32;
            let len = bits.take(6)? as u32 + 1;
            if lz + len > 64 {
                return Err(CodecError::Truncated);
            }
            let tz = 64 - lz - len;
            self.bits ^= bits.take(len)? << tz;
            (self.leading, self.trailing) = (lz, tz);
        }
        Ok(())
    }
}

/// The version-1 body: Gorilla's fixed buckets for every column.
mod v1 {
    use super::{BitReader, CodecError, Header, Point, XorState, unzigzag};

    pub(super) fn decode_into(h: &Header, out: &mut Vec<Point>) -> Result<(), CodecError> {
        let mut bits = BitReader::new(h.body);
        let mut ts = bits.take(64)?;
        let mut seq = bits.take(64)?;
        let first = bits.take(64)?;
        let mut mantissa = unzigzag(first);
        let v0 = match h.scale {
            Some(scale) => mantissa as f64 / scale,
            None => f64::from_bits(first),
        };
        let mut xor = XorState::new(first);
        let mut value = |bits: &mut BitReader| -> Result<f64, CodecError> {
            Ok(match h.scale {
                Some(scale) => {
                    let z = match bits.ones(4)? {
                        0 => 0,
                        1 => bits.take(4)?,
                        2 => bits.take(8)?,
                        3 => bits.take(16)?,
                        _ => bits.take(64)?,
                    };
                    mantissa = mantissa.wrapping_add(unzigzag(z));
                    mantissa as f64 / scale
                }
                None => {
                    xor.get(bits)?;
                    f64::from_bits(xor.bits)
                }
            })
        };
        out.reserve(h.stats.count as usize);
        out.push(Point {
            ts_ms: ts as i64,
            seq,
            value: v0,
        });
        let (mut ts_delta, mut seq_delta) = (0u64, 0u64);
        for _ in 1..h.stats.count {
            ts_delta = ts_delta.wrapping_add(dod(&mut bits)?);
            ts = ts.wrapping_add(ts_delta);
            seq_delta = seq_delta.wrapping_add(dod(&mut bits)?);
            seq = seq.wrapping_add(seq_delta);
            let value = value(&mut bits)?;
            out.push(Point {
                ts_ms: ts as i64,
                seq,
                value,
            });
        }
        Ok(())
    }

    fn dod(bits: &mut BitReader) -> Result<u64, CodecError> {
        let z = match bits.ones(4)? {
            0 => 0,
            1 => bits.take(7)?,
            2 => bits.take(12)?,
            3 => bits.take(20)?,
            _ => bits.take(64)?,
        };
        Ok(unzigzag(z) as u64)
    }
}

pub(crate) fn zigzag(v: i64) -> u64 {
    ((v << 1) ^ (v >> 63)) as u64
}

pub(crate) fn unzigzag(z: u64) -> i64 {
    ((z >> 1) as i64) ^ -((z & 1) as i64)
}

pub(crate) fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

pub(crate) fn get_varint(mut bytes: &[u8]) -> Result<(u64, &[u8]), CodecError> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let [b, rest @ ..] = bytes else {
            return Err(CodecError::Truncated);
        };
        bytes = rest;
        v |= u64::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            return Ok((v, bytes));
        }
    }
    Err(CodecError::Truncated)
}

/// Where bits go: a block, or a counter that only sizes them.
trait BitSink {
    /// Appends the low `n` bits of `v` (n ≤ 64), most significant first.
    fn put(&mut self, v: u64, n: u32);
}

#[derive(Default)]
struct BitCounter(u64);

impl BitSink for BitCounter {
    fn put(&mut self, _: u64, n: u32) {
        self.0 += u64::from(n);
    }
}

struct BitWriter {
    out: Vec<u8>,
    acc: u64,
    /// Bits held in `acc` (< 32 between calls).
    held: u32,
}

impl BitWriter {
    fn new(out: Vec<u8>) -> Self {
        Self {
            out,
            acc: 0,
            held: 0,
        }
    }

    fn finish(mut self) -> Vec<u8> {
        while self.held >= 8 {
            self.held -= 8;
            self.out.push((self.acc >> self.held) as u8);
        }
        if self.held > 0 {
            self.out.push((self.acc << (8 - self.held)) as u8);
        }
        self.out
    }
}

impl BitSink for BitWriter {
    #[inline]
    fn put(&mut self, v: u64, n: u32) {
        if n > 32 {
            self.put(v >> 32, n - 32);
            self.put(v & 0xffff_ffff, 32);
            return;
        }
        if n == 0 {
            return;
        }
        // Fewer than 32 bits are held between calls: 64 fit.
        let v = v & ((1u64 << n) - 1);
        self.acc = (self.acc << n) | v;
        self.held += n;
        if self.held >= 32 {
            self.held -= 32;
            let word = (self.acc >> self.held) as u32;
            self.out.extend_from_slice(&word.to_be_bytes());
            self.acc &= (1u64 << self.held) - 1;
        }
    }
}

struct BitReader<'a> {
    bytes: &'a [u8],
    /// Next bit to read, from the start of `bytes`.
    pos: usize,
}

impl<'a> BitReader<'a> {
    fn new(bytes: &'a [u8]) -> Self {
        Self { bytes, pos: 0 }
    }

    fn left(&self) -> usize {
        self.bytes.len() * 8 - self.pos
    }

    /// The next 64 bits from `pos` (zeros past the end), without moving.
    #[inline]
    fn peek(&self) -> u64 {
        let at = self.pos / 8;
        let shift = (self.pos % 8) as u32;
        // Nine whole bytes ahead (all but the stream's end): two loads,
        // no copy of a length known only at run time.
        if let Some((word, rest)) = self
            .bytes
            .get(at..)
            .and_then(|t| t.split_first_chunk::<8>())
            && let Some(&next) = rest.first()
        {
            let v = u64::from_be_bytes(*word);
            return if shift == 0 {
                v
            } else {
                (v << shift) | (u64::from(next) >> (8 - shift))
            };
        }
        let mut word = [0u8; 8];
        let tail = self.bytes.get(at..).unwrap_or(&[]);
        let n = tail.len().min(8);
        word[..n].copy_from_slice(&tail[..n]);
        let v = u64::from_be_bytes(word);
        if shift == 0 {
            return v;
        }
        let next = tail.get(8).copied().unwrap_or(0);
        (v << shift) | (u64::from(next) >> (8 - shift))
    }

    /// The next `n` bits (n ≤ 64) as an integer, most significant first.
    #[inline]
    fn take(&mut self, n: u32) -> Result<u64, CodecError> {
        if n == 0 {
            return Ok(0);
        }
        if n as usize > self.left() {
            return Err(CodecError::Truncated);
        }
        let v = self.peek() >> (64 - n);
        self.pos += n as usize;
        Ok(v)
    }

    /// Counts 1 bits up to `max` (< 64), consuming them and, below `max`,
    /// the 0 that ends them.
    #[inline]
    fn ones(&mut self, max: u32) -> Result<u32, CodecError> {
        let ones = self.peek().leading_ones().min(max);
        let used = ones as usize + usize::from(ones < max);
        if used > self.left() {
            return Err(CodecError::Truncated);
        }
        self.pos += used;
        Ok(ones)
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    /// 2000-01-01 and 2100-01-01 in ms: the hub's valid window lies inside.
    const Y2000: i64 = 946_684_800_000;
    const Y2100: i64 = 4_102_444_800_000;

    fn same(a: &[Point], b: &[Point]) -> bool {
        a.len() == b.len()
            && a.iter().zip(b).all(|(x, y)| {
                x.ts_ms == y.ts_ms && x.seq == y.seq && x.value.to_bits() == y.value.to_bits()
            })
    }

    /// The version-1 encoder as it was (blocks written before issue 22
    /// are still read).
    fn encode_v1(points: &[Point]) -> Vec<u8> {
        let digits = decimal_digits(points);
        let mut out = vec![V1, digits.map_or(MODE_FLOAT, |d| d + 1)];
        put_varint(&mut out, points.len() as u64);
        let end = points[points.len() - 1];
        put_varint(&mut out, zigzag(end.ts_ms));
        put_varint(&mut out, end.seq);
        let st = stats_of(points);
        for v in [st.min, st.max, st.sum, st.first, st.last] {
            out.extend_from_slice(&v.to_bits().to_le_bytes());
        }
        let mut bits = BitWriter::new(out);
        let scale = digits.map(pow10);
        let first = points[0];
        bits.put(first.ts_ms as u64, 64);
        bits.put(first.seq, 64);
        let mut xor = XorState::new(first.value.to_bits());
        let mut mantissa = scale.map_or(0, |s| to_mantissa(first.value, s));
        match scale {
            Some(_) => bits.put(zigzag(mantissa), 64),
            None => bits.put(first.value.to_bits(), 64),
        }
        let dod = |bits: &mut BitWriter, dod: u64| match zigzag(dod as i64) {
            0 => bits.put(0, 1),
            z if z < 1 << 7 => bits.put((0b10 << 7) | z, 9),
            z if z < 1 << 12 => bits.put((0b110 << 12) | z, 15),
            z if z < 1 << 20 => bits.put((0b1110 << 20) | z, 24),
            z => {
                bits.put(0b1111, 4);
                bits.put(z, 64);
            }
        };
        let (mut ts, mut ts_delta) = (first.ts_ms as u64, 0u64);
        let (mut seq, mut seq_delta) = (first.seq, 0u64);
        for p in &points[1..] {
            let d = (p.ts_ms as u64).wrapping_sub(ts);
            dod(&mut bits, d.wrapping_sub(ts_delta));
            (ts, ts_delta) = (p.ts_ms as u64, d);
            let d = p.seq.wrapping_sub(seq);
            dod(&mut bits, d.wrapping_sub(seq_delta));
            (seq, seq_delta) = (p.seq, d);
            match scale {
                Some(s) => {
                    let now = to_mantissa(p.value, s);
                    match zigzag(now.wrapping_sub(mantissa)) {
                        0 => bits.put(0, 1),
                        z if z < 1 << 4 => bits.put((0b10 << 4) | z, 6),
                        z if z < 1 << 8 => bits.put((0b110 << 8) | z, 11),
                        z if z < 1 << 16 => bits.put((0b1110 << 16) | z, 20),
                        z => {
                            bits.put(0b1111, 4);
                            bits.put(z, 64);
                        }
                    }
                    mantissa = now;
                }
                None => xor.put(&mut bits, p.value.to_bits()),
            }
        }
        bits.finish()
    }

    fn round_trip(points: &[Point]) -> Vec<u8> {
        let old = encode_v1(points);
        assert!(
            same(points, &decode(&old).expect("v1 decodes")),
            "v1 changed the points"
        );
        assert_same_stats(stats(&old).expect("v1 header"), stats_of(points));
        let block = encode(points);
        let back = decode(&block).expect("decodes");
        assert!(same(points, &back), "round trip changed the points");
        assert_same_stats(stats(&block).expect("header"), stats_of(points));
        block
    }

    /// Equal to the bit (NaN stats included).
    fn assert_same_stats(a: BlockStats, b: BlockStats) {
        let bits = |s: BlockStats| {
            (
                (s.count, s.last_ts, s.last_seq),
                [s.min, s.max, s.sum, s.first, s.last].map(f64::to_bits),
            )
        };
        assert_eq!(bits(a), bits(b), "{a:?} != {b:?}");
    }

    fn sorted(mut points: Vec<Point>) -> Vec<Point> {
        points.sort_by_key(Point::key);
        points
    }

    /// Any f64 bit pattern, with the special ones drawn often.
    fn any_value() -> impl Strategy<Value = f64> {
        prop_oneof![
            any::<u64>().prop_map(f64::from_bits),
            // NaNs with payloads, both signs.
            (any::<u64>(), any::<bool>()).prop_map(|(payload, neg)| {
                let bits = 0x7ff0_0000_0000_0000 | (payload & 0x000f_ffff_ffff_ffff).max(1);
                f64::from_bits(if neg { bits | 1 << 63 } else { bits })
            }),
            // Subnormals.
            (1u64..(1 << 52), any::<bool>()).prop_map(|(m, neg)| f64::from_bits(if neg {
                m | 1 << 63
            } else {
                m
            })),
            Just(0.0),
            Just(-0.0),
            Just(f64::INFINITY),
            Just(f64::NEG_INFINITY),
            Just(f64::MAX),
            Just(f64::MIN_POSITIVE),
            // Quantized sensor values (the decimal mode).
            (-100_000i64..100_000, 0u8..4).prop_map(|(m, d)| m as f64 / pow10(d)),
        ]
    }

    fn any_point() -> impl Strategy<Value = Point> {
        (Y2000..Y2100, 1u64..i64::MAX as u64, any_value()).prop_map(|(ts_ms, seq, value)| Point {
            ts_ms,
            seq,
            value,
        })
    }

    proptest! {
        #[test]
        fn every_point_round_trips_exactly(points in proptest::collection::vec(any_point(), 1..300)) {
            round_trip(&sorted(points));
        }

        #[test]
        fn any_i64_and_u64_round_trip(points in proptest::collection::vec(
            (any::<i64>(), any::<u64>(), any::<u64>()).prop_map(|(ts_ms, seq, bits)| Point {
                ts_ms, seq, value: f64::from_bits(bits),
            }), 1..100)) {
            // Unsorted too: the codec does not rely on the order.
            round_trip(&points);
        }

        #[test]
        fn regular_series_round_trip(start in Y2000..Y2100, step in 1i64..100_000,
                                     seq_step in 1u64..8, walk in proptest::collection::vec(-50i64..50, 1..2000),
                                     digits in 0u8..4) {
            let mut m = 0i64;
            let points: Vec<Point> = walk.iter().enumerate().map(|(i, d)| {
                m += d;
                Point { ts_ms: start + step * i as i64, seq: 1 + seq_step * i as u64,
                        value: m as f64 / pow10(digits) }
            }).collect();
            round_trip(&points);
        }

        #[test]
        fn corrupt_blocks_are_errors_not_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = decode(&bytes);
            let _ = stats(&bytes);
        }

        #[test]
        fn a_cut_block_is_an_error(points in proptest::collection::vec(any_point(), 2..50), cut in 1usize..40) {
            let block = encode(&sorted(points));
            let cut = cut.min(block.len() - 1);
            // Fewer bytes cannot hold the points the header claims unless
            // the cut only removed padding bits: then it decodes the same.
            if let Ok(back) = decode(&block[..block.len() - cut]) {
                prop_assert!(same(&back, &decode(&block).unwrap()));
            }
        }
    }

    #[test]
    fn blocks_of_one_and_of_ten_thousand_points() {
        round_trip(&[Point {
            ts_ms: Y2000,
            seq: 1,
            value: -0.0,
        }]);
        round_trip(&[Point {
            ts_ms: i64::MIN,
            seq: u64::MAX,
            value: f64::NAN,
        }]);
        let noisy: Vec<Point> = (0..10_000u64)
            .map(|i| Point {
                ts_ms: Y2000 + (i as i64) * 1000 + (i as i64 * 7919) % 13,
                seq: i * 4 + 1,
                value: f64::from_bits(i.wrapping_mul(0x9E37_79B9_7F4A_7C15)),
            })
            .collect();
        round_trip(&noisy);
        let quantized: Vec<Point> = (0..10_000u64)
            .map(|i| Point {
                ts_ms: Y2000 + (i as i64) * 1000,
                seq: i * 4 + 1,
                value: ((20.0 + (i as f64 / 500.0).sin() * 6.0) * 100.0).round() / 100.0,
            })
            .collect();
        let block = round_trip(&quantized);
        // Regular ts and seq cost a bit each; a slow 0.01 °C signal a few.
        assert!(
            block.len() < 10_000,
            "{} bytes for 10,000 quantized points",
            block.len()
        );
        let st = stats(&block).unwrap();
        assert_eq!(st.first, quantized[0].value);
        assert_eq!(st.last, quantized[9_999].value);
        let max = quantized.iter().map(|p| p.value).fold(f64::MIN, f64::max);
        assert_eq!(st.max, max);
    }

    /// A sensor as a device sends it: a clock jittered by batching, seqs
    /// 4 apart, 0.01 °C noise (about σ = 0.3 °C) around a slow sine.
    fn sensor_like(n: usize) -> Vec<Point> {
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let mut uniform = move || {
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            (state >> 11) as f64 / (1u64 << 53) as f64
        };
        let mut ts = Y2000;
        (0..n)
            .map(|i| {
                ts += 38 + (uniform() * 5.0) as i64;
                let noise: f64 = (0..12).map(|_| uniform()).sum::<f64>() - 6.0;
                let v = 20.0 + 6.0 * (i as f64 / 5000.0).sin() + 0.3 * noise;
                Point {
                    ts_ms: ts,
                    seq: 1 + 4 * i as u64,
                    value: (v * 100.0).round() / 100.0,
                }
            })
            .collect()
    }

    #[test]
    fn a_regular_clock_and_seq_cost_no_bits() {
        let points: Vec<Point> = (0..10_000u64)
            .map(|i| Point {
                ts_ms: Y2000 + 1000 * i as i64,
                seq: 7 + 4 * i,
                value: 1013.25,
            })
            .collect();
        let block = round_trip(&points);
        assert!(block.len() < 64, "{} bytes: only the header", block.len());
    }

    #[test]
    fn sensor_data_takes_fewer_bytes_than_version_1_and_nears_its_entropy() {
        let points = sensor_like(4096);
        let (v1, v2) = (encode_v1(&points).len(), round_trip(&points).len());
        assert!(v2 * 10 <= v1 * 7, "version 2: {v2} bytes, version 1: {v1}");
        // The jitter is 5 equally likely ms (2.3 bits); a delta of two
        // N(0, 30) draws in 0.01 steps has an entropy near 7.4 bits.
        let bits_per_point = (v2 * 8) as f64 / points.len() as f64;
        assert!(
            bits_per_point < 2.3 + 7.4 + 1.5,
            "{bits_per_point:.2} bits per point"
        );
    }

    #[test]
    fn an_unknown_column_plan_is_an_error() {
        let block = encode(&[Point {
            ts_ms: 0,
            seq: 0,
            value: 1.0,
        }]);
        // version, mode, count, last ts, last seq, 4 mantissas, the sum,
        // the two spans: then the ts column's predictor and coder.
        let plan = 5 + 4 + 8 + 2;
        assert_eq!(&block[plan..plan + 2], &[0, FIXED]);
        let mut bad = block.clone();
        bad[plan] = 9;
        assert_eq!(decode(&bad), Err(CodecError::Plan(9, FIXED)));
        let mut bad = block.clone();
        bad[plan + 1] = 200;
        assert_eq!(decode(&bad), Err(CodecError::Plan(0, 200)));
    }

    proptest! {
        #[test]
        fn a_changed_byte_is_an_error_or_other_points_never_a_panic(
            at in 0usize..400, byte in any::<u8>(), n in 1usize..300) {
            let mut block = encode(&sensor_like(n));
            let at = at % block.len();
            block[at] = byte;
            let _ = decode(&block);
            let _ = stats(&block);
        }
    }

    #[test]
    fn quantized_values_use_the_fewest_digits() {
        let p = |v: f64| Point {
            ts_ms: Y2000,
            seq: 1,
            value: v,
        };
        assert_eq!(decimal_digits(&[p(21.37), p(-3.5)]), Some(2));
        assert_eq!(decimal_digits(&[p(1013.0), p(7.0)]), Some(0));
        assert_eq!(decimal_digits(&[p(0.1 + 0.2)]), None);
        assert_eq!(decimal_digits(&[p(-0.0)]), None);
        assert_eq!(decimal_digits(&[p(f64::NAN)]), None);
    }
}
