//! Staged rows in PostgreSQL's binary `COPY` format.
//!
//! The writer stages a group's rows of a part with `COPY … FROM STDIN`, and
//! a compaction takes a part with `COPY (DELETE … RETURNING …) TO STDOUT`.
//! A multi-row `INSERT` makes the server build and run an expression for
//! each of its 5,120 parameters and write a WAL record per row; `COPY`
//! reads fixed-width fields and inserts a page's worth of rows per WAL
//! record. Reading a part back the same way skips sqlx's per-row decoding.
//! The format: <https://www.postgresql.org/docs/current/sql-copy.html>
//! ("Binary Format"); every staging column is an 8-byte `BIGINT` or
//! `DOUBLE PRECISION`, sent big-endian.

use super::StoreError;
use super::write::RowToInsert;
use crate::domain::{DeviceKey, SensorKey};

const SIGNATURE: &[u8; 11] = b"PGCOPY\n\xff\r\n\0";
/// device_id, sensor_id, ts_ms, seq, value.
const FIELDS: i16 = 5;
/// A row: its field count, then each field's length and 8 bytes.
const ROW_BYTES: usize = 2 + 5 * (4 + 8);
/// The columns, in the order both statements name them.
pub(super) const COLUMNS: &str = "device_id, sensor_id, ts_ms, seq, value";

/// Writes `rows` as one binary COPY stream into `out` (cleared first).
pub(super) fn encode(rows: &[RowToInsert], out: &mut Vec<u8>) {
    out.clear();
    out.reserve(SIGNATURE.len() + 8 + rows.len() * ROW_BYTES + 2);
    out.extend_from_slice(SIGNATURE);
    out.extend_from_slice(&0i32.to_be_bytes()); // flags: no OIDs
    out.extend_from_slice(&0i32.to_be_bytes()); // no header extension
    for r in rows {
        out.extend_from_slice(&FIELDS.to_be_bytes());
        let value = r.value.to_bits() as i64;
        for field in [r.device.0, r.sensor.0, r.ts_ms, r.seq, value] {
            out.extend_from_slice(&8i32.to_be_bytes());
            out.extend_from_slice(&field.to_be_bytes());
        }
    }
    out.extend_from_slice(&(-1i16).to_be_bytes());
}

/// Reads a binary COPY stream of staged rows (as [`encode`] writes them).
pub(super) fn decode(data: &[u8]) -> Result<Vec<RowToInsert>, StoreError> {
    let mut input = Reader(data);
    if input.take(SIGNATURE.len())? != SIGNATURE {
        return Err(bad("no binary COPY signature"));
    }
    let flags = input.i32()?;
    if flags & (1 << 16) != 0 {
        return Err(bad("rows carry OIDs"));
    }
    let extension = usize::try_from(input.i32()?).map_err(|_| bad("negative extension"))?;
    input.take(extension)?;
    let mut rows = Vec::with_capacity(data.len() / ROW_BYTES);
    loop {
        match input.i16()? {
            -1 => break,
            FIELDS => {}
            n => return Err(bad(&format!("a row of {n} fields"))),
        }
        let mut f = [0i64; FIELDS as usize];
        for field in &mut f {
            if input.i32()? != 8 {
                return Err(bad("a field that is not 8 bytes"));
            }
            let bytes = input.take(8)?;
            *field = i64::from_be_bytes(bytes.try_into().map_err(|_| bad("short field"))?);
        }
        rows.push(RowToInsert {
            device: DeviceKey(f[0]),
            sensor: SensorKey(f[1]),
            ts_ms: f[2],
            seq: f[3],
            value: f64::from_bits(f[4] as u64),
        });
    }
    Ok(rows)
}

fn bad(what: &str) -> StoreError {
    StoreError::Sqlx(sqlx::Error::Protocol(format!(
        "unexpected binary COPY data: {what}"
    )))
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], StoreError> {
        if self.0.len() < n {
            return Err(bad("it ends early"));
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }

    fn i16(&mut self) -> Result<i16, StoreError> {
        let b = self.take(2)?;
        Ok(i16::from_be_bytes([b[0], b[1]]))
    }

    fn i32(&mut self) -> Result<i32, StoreError> {
        let b = self.take(4)?;
        Ok(i32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(i: i64, value: f64) -> RowToInsert {
        RowToInsert {
            device: DeviceKey(i),
            sensor: SensorKey(-i),
            ts_ms: i64::MAX - i,
            seq: i64::MIN + i,
            value,
        }
    }

    #[test]
    fn rows_round_trip_bit_for_bit() {
        let values = [
            0.0,
            -0.0,
            1.5,
            f64::MIN_POSITIVE,
            f64::MAX,
            f64::NEG_INFINITY,
            f64::from_bits(0x7ff8_0000_dead_beef), // a NaN with a payload
            5e-324,
        ];
        let rows: Vec<_> = values
            .iter()
            .enumerate()
            .map(|(i, &v)| row(i as i64, v))
            .collect();
        let mut buf = Vec::new();
        encode(&rows, &mut buf);
        assert_eq!(buf.len(), 19 + rows.len() * ROW_BYTES + 2);
        let back = decode(&buf).unwrap();
        assert_eq!(back.len(), rows.len());
        for (a, b) in rows.iter().zip(&back) {
            assert_eq!(
                (a.device, a.sensor, a.ts_ms, a.seq, a.value.to_bits()),
                (b.device, b.sensor, b.ts_ms, b.seq, b.value.to_bits())
            );
        }
        encode(&[], &mut buf);
        assert!(decode(&buf).unwrap().is_empty());
    }

    #[test]
    fn damaged_streams_are_errors_not_panics() {
        let mut buf = Vec::new();
        encode(&[row(1, 2.0), row(2, 3.0)], &mut buf);
        // Every truncation, and a stream without its trailer.
        for n in 0..buf.len() {
            assert!(decode(&buf[..n]).is_err(), "{n} bytes");
        }
        let mut wrong = buf.clone();
        wrong[0] = b'X';
        assert!(decode(&wrong).is_err());
        let mut nulls = buf.clone();
        nulls[19 + 2..19 + 6].copy_from_slice(&(-1i32).to_be_bytes());
        assert!(decode(&nulls).is_err());
        let mut fields = buf;
        fields[19..21].copy_from_slice(&4i16.to_be_bytes());
        assert!(decode(&fields).is_err());
    }
}
