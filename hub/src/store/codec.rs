//! The block codec: one (device, sensor) series' points, sorted by
//! (ts, seq), in a few bits each.
//!
//! Layout (version 1), all integers little-endian:
//!
//! ```text
//! u8  version (1)
//! u8  value mode: 0 = XOR of the IEEE bits (any f64), d + 1 = decimal
//!     with d digits: every value is exactly m / 10^d for an integer m
//! varint count (≥ 1), varint zigzag(last ts), varint last seq
//! 5 × f64  min, max, sum, first, last   (a bucket query folds a block
//!          that lies inside one bucket from these, without decoding)
//! bit stream, MSB first:
//!   point 0:  ts 64 bits, seq 64 bits, value 64 bits (bits, or m zigzagged)
//!   point i:  ts  as delta-of-delta, seq as delta-of-delta  (Gorilla's
//!             '0' / '10'+7 / '110'+12 / '1110'+20 / '1111'+64 buckets),
//!             value: decimal → delta of m ('0' / '10'+4 / '110'+8 /
//!             '1110'+16 / '1111'+64); XOR → Gorilla's XOR with a reused
//!             leading/trailing window
//! ```
//!
//! Regular timestamps and seqs cost one bit each; a quantized sensor
//! (0.01 °C) costs a few bits per value. Arithmetic wraps, so every i64 /
//! u64 / f64 bit pattern round-trips exactly (NaN payloads, -0.0,
//! subnormals). Decoding never panics on corrupt bytes: it returns an error.

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
}

const VERSION: u8 = 1;
const MODE_XOR: u8 = 0;
/// Decimal digits tried for the decimal value mode: 10^d stays exact.
const MAX_DIGITS: u8 = 9;
/// Points in one block at most (the writer keeps far below).
pub const MAX_POINTS: usize = 1 << 20;
const HEADER_FLOATS: usize = 5;

/// Encodes points (sorted by (ts, seq) by the caller, at least one).
pub fn encode(points: &[Point]) -> Vec<u8> {
    assert!(
        !points.is_empty() && points.len() <= MAX_POINTS,
        "block size"
    );
    let digits = decimal_digits(points);
    let mut out = Vec::with_capacity(48 + points.len() * 2);
    out.push(VERSION);
    out.push(digits.map_or(MODE_XOR, |d| d + 1));
    put_varint(&mut out, points.len() as u64);
    let end = points[points.len() - 1];
    put_varint(&mut out, zigzag(end.ts_ms));
    put_varint(&mut out, end.seq);
    let stats = stats_of(points);
    for v in [stats.min, stats.max, stats.sum, stats.first, stats.last] {
        out.extend_from_slice(&v.to_bits().to_le_bytes());
    }
    let mut bits = BitWriter::new(out);
    let first = points[0];
    bits.put(first.ts_ms as u64, 64);
    bits.put(first.seq, 64);
    let scale = digits.map(pow10);
    let mut value = ValueState::new(first.value, scale);
    match scale {
        Some(s) => bits.put(zigzag(to_mantissa(first.value, s)), 64),
        None => bits.put(first.value.to_bits(), 64),
    }
    let (mut ts, mut ts_delta) = (first.ts_ms as u64, 0u64);
    let (mut seq, mut seq_delta) = (first.seq, 0u64);
    for p in &points[1..] {
        let d = (p.ts_ms as u64).wrapping_sub(ts);
        put_dod(&mut bits, d.wrapping_sub(ts_delta));
        (ts, ts_delta) = (p.ts_ms as u64, d);
        let d = p.seq.wrapping_sub(seq);
        put_dod(&mut bits, d.wrapping_sub(seq_delta));
        (seq, seq_delta) = (p.seq, d);
        value.put(&mut bits, p.value);
    }
    bits.finish()
}

/// Reads only the header: the count and the value statistics.
pub fn stats(block: &[u8]) -> Result<BlockStats, CodecError> {
    Ok(header(block)?.0)
}

/// Decodes every point, appending them to `out` in stored order.
pub fn decode_into(block: &[u8], out: &mut Vec<Point>) -> Result<(), CodecError> {
    let (stats, mode, body) = header(block)?;
    let scale = match mode {
        MODE_XOR => None,
        m if m <= MAX_DIGITS + 1 => Some(pow10(m - 1)),
        m => return Err(CodecError::Mode(m)),
    };
    let mut bits = BitReader::new(body);
    let mut ts = bits.get(64)?;
    let mut seq = bits.get(64)?;
    let first = bits.get(64)?;
    let mut value = match scale {
        Some(scale) => ValueState::Decimal {
            mantissa: unzigzag(first),
            scale,
        },
        None => ValueState::Xor {
            bits: first,
            leading: u32::MAX,
            trailing: 0,
        },
    };
    out.reserve(stats.count as usize);
    out.push(Point {
        ts_ms: ts as i64,
        seq,
        value: value.current(),
    });
    let (mut ts_delta, mut seq_delta) = (0u64, 0u64);
    for _ in 1..stats.count {
        ts_delta = ts_delta.wrapping_add(get_dod(&mut bits)?);
        ts = ts.wrapping_add(ts_delta);
        seq_delta = seq_delta.wrapping_add(get_dod(&mut bits)?);
        seq = seq.wrapping_add(seq_delta);
        value.get(&mut bits)?;
        out.push(Point {
            ts_ms: ts as i64,
            seq,
            value: value.current(),
        });
    }
    Ok(())
}

pub fn decode(block: &[u8]) -> Result<Vec<Point>, CodecError> {
    let mut out = Vec::new();
    decode_into(block, &mut out)?;
    Ok(out)
}

fn header(block: &[u8]) -> Result<(BlockStats, u8, &[u8]), CodecError> {
    let [version, mode, rest @ ..] = block else {
        return Err(CodecError::Truncated);
    };
    if *version != VERSION {
        return Err(CodecError::Version(*version));
    }
    let (count, rest) = get_varint(rest)?;
    let (last_ts, rest) = get_varint(rest)?;
    let (last_seq, rest) = get_varint(rest)?;
    if count == 0 || count > MAX_POINTS as u64 {
        return Err(CodecError::Count(count));
    }
    if rest.len() < HEADER_FLOATS * 8 {
        return Err(CodecError::Truncated);
    }
    let (floats, body) = rest.split_at(HEADER_FLOATS * 8);
    let f = |i: usize| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&floats[i * 8..i * 8 + 8]);
        f64::from_bits(u64::from_le_bytes(b))
    };
    let stats = BlockStats {
        count: count as u32,
        last_ts: unzigzag(last_ts),
        last_seq,
        min: f(0),
        max: f(1),
        sum: f(2),
        first: f(3),
        last: f(4),
    };
    Ok((stats, *mode, body))
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

enum ValueState {
    Decimal {
        mantissa: i64,
        scale: f64,
    },
    Xor {
        bits: u64,
        leading: u32,
        trailing: u32,
    },
}

impl ValueState {
    fn new(first: f64, scale: Option<f64>) -> Self {
        match scale {
            Some(scale) => Self::Decimal {
                mantissa: to_mantissa(first, scale),
                scale,
            },
            None => Self::Xor {
                bits: first.to_bits(),
                leading: u32::MAX,
                trailing: 0,
            },
        }
    }

    fn current(&self) -> f64 {
        match self {
            Self::Decimal { mantissa, scale } => *mantissa as f64 / scale,
            Self::Xor { bits, .. } => f64::from_bits(*bits),
        }
    }

    fn put(&mut self, out: &mut BitWriter, v: f64) {
        match self {
            Self::Decimal { mantissa, scale } => {
                let now = to_mantissa(v, *scale);
                let delta = zigzag(now.wrapping_sub(*mantissa));
                *mantissa = now;
                match delta {
                    0 => out.put(0, 1),
                    z if z < 1 << 4 => out.put((0b10 << 4) | z, 6),
                    z if z < 1 << 8 => out.put((0b110 << 8) | z, 11),
                    z if z < 1 << 16 => out.put((0b1110 << 16) | z, 20),
                    z => {
                        out.put(0b1111, 4);
                        out.put(z, 64);
                    }
                }
            }
            Self::Xor {
                bits,
                leading,
                trailing,
            } => {
                let now = v.to_bits();
                let xor = now ^ *bits;
                *bits = now;
                if xor == 0 {
                    out.put(0, 1);
                    return;
                }
                let lz = xor.leading_zeros();
                let tz = xor.trailing_zeros();
                if *leading != u32::MAX && lz >= *leading && tz >= *trailing {
                    let len = 64 - *leading - *trailing;
                    out.put(0b10, 2);
                    out.put(xor >> *trailing, len);
                } else {
                    let len = 64 - lz - tz;
                    out.put(0b11, 2);
                    out.put(u64::from(lz), 6);
                    out.put(u64::from(len - 1), 6);
                    out.put(xor >> tz, len);
                    (*leading, *trailing) = (lz, tz);
                }
            }
        }
    }

    fn get(&mut self, bits: &mut BitReader) -> Result<(), CodecError> {
        match self {
            Self::Decimal { mantissa, .. } => {
                let z = match bits.prefix(4)? {
                    0 => 0,
                    1 => bits.get(4)?,
                    2 => bits.get(8)?,
                    3 => bits.get(16)?,
                    _ => bits.get(64)?,
                };
                *mantissa = mantissa.wrapping_add(unzigzag(z));
            }
            Self::Xor {
                bits: value,
                leading,
                trailing,
            } => {
                if bits.get(1)? == 0 {
                    return Ok(());
                }
                if bits.get(1)? == 0 {
                    if *leading == u32::MAX {
                        return Err(CodecError::Truncated);
                    }
                    let len = 64 - *leading - *trailing;
                    *value ^= bits.get(len)? << *trailing;
                } else {
                    let lz = bits.get(6)? as u32;
                    let len = bits.get(6)? as u32 + 1;
                    if lz + len > 64 {
                        return Err(CodecError::Truncated);
                    }
                    let tz = 64 - lz - len;
                    *value ^= bits.get(len)? << tz;
                    (*leading, *trailing) = (lz, tz);
                }
            }
        }
        Ok(())
    }
}

fn put_dod(out: &mut BitWriter, dod: u64) {
    match zigzag(dod as i64) {
        0 => out.put(0, 1),
        z if z < 1 << 7 => out.put((0b10 << 7) | z, 9),
        z if z < 1 << 12 => out.put((0b110 << 12) | z, 15),
        z if z < 1 << 20 => out.put((0b1110 << 20) | z, 24),
        z => {
            out.put(0b1111, 4);
            out.put(z, 64);
        }
    }
}

fn get_dod(bits: &mut BitReader) -> Result<u64, CodecError> {
    let z = match bits.prefix(4)? {
        0 => 0,
        1 => bits.get(7)?,
        2 => bits.get(12)?,
        3 => bits.get(20)?,
        _ => bits.get(64)?,
    };
    Ok(unzigzag(z) as u64)
}

fn zigzag(v: i64) -> u64 {
    ((v << 1) ^ (v >> 63)) as u64
}

fn unzigzag(z: u64) -> i64 {
    ((z >> 1) as i64) ^ -((z & 1) as i64)
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn get_varint(mut bytes: &[u8]) -> Result<(u64, &[u8]), CodecError> {
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

struct BitWriter {
    out: Vec<u8>,
    acc: u64,
    /// Bits held in `acc` (< 8 between calls).
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

    /// Appends the low `n` bits of `v` (n ≤ 64), most significant first.
    fn put(&mut self, v: u64, n: u32) {
        if n > 32 {
            self.put(v >> 32, n - 32);
            self.put(v & 0xffff_ffff, 32);
            return;
        }
        if n == 0 {
            return;
        }
        let v = v & ((1u64 << n) - 1);
        self.acc = (self.acc << n) | v;
        self.held += n;
        while self.held >= 8 {
            self.held -= 8;
            self.out.push((self.acc >> self.held) as u8);
        }
        self.acc &= (1u64 << self.held) - 1;
    }

    fn finish(mut self) -> Vec<u8> {
        if self.held > 0 {
            self.out.push((self.acc << (8 - self.held)) as u8);
        }
        self.out
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

    /// The next `n` bits (n ≤ 64) as an integer, most significant first.
    fn get(&mut self, n: u32) -> Result<u64, CodecError> {
        if n > 32 {
            let high = self.get(n - 32)?;
            return Ok((high << 32) | self.get(32)?);
        }
        if self.pos + n as usize > self.bytes.len() * 8 {
            return Err(CodecError::Truncated);
        }
        let mut v = 0u64;
        let mut left = n;
        while left > 0 {
            let byte = self.bytes[self.pos / 8];
            let used = (self.pos % 8) as u32;
            let take = (8 - used).min(left);
            let bits = (u64::from(byte) >> (8 - used - take)) & ((1 << take) - 1);
            v = (v << take) | bits;
            self.pos += take as usize;
            left -= take;
        }
        Ok(v)
    }

    /// Counts leading 1 bits, up to `max` (a prefix code's bucket).
    fn prefix(&mut self, max: u32) -> Result<u32, CodecError> {
        let mut ones = 0;
        while ones < max && self.get(1)? == 1 {
            ones += 1;
        }
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

    fn round_trip(points: &[Point]) -> Vec<u8> {
        let block = encode(points);
        let back = decode(&block).expect("decodes");
        assert!(same(points, &back), "round trip changed the points");
        let st = stats(&block).expect("header");
        assert_eq!(st.count as usize, points.len());
        let end = points[points.len() - 1];
        assert_eq!((st.last_ts, st.last_seq), (end.ts_ms, end.seq));
        block
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
