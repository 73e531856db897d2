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

use futures_util::TryStreamExt;

use super::StoreError;
use super::db::Conn;
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

/// Runs `COPY … FROM STDIN (FORMAT binary)` with `data` ([`encode`]d);
/// returns the rows the server stored. After an error the caller poisons
/// the connection (`WriteConn::poison`).
pub(super) async fn copy_in(conn: &mut Conn, sql: &str, data: &[u8]) -> Result<u64, StoreError> {
    let c = postgres(conn)?;
    let mut copy = c.copy_in_raw(sql).await?;
    // Dropped on an error, it tells the server to fail the COPY.
    copy.send(data).await?;
    Ok(copy.finish().await?)
}

/// Runs `COPY (…) TO STDOUT (FORMAT binary)` of staged rows and reads them
/// as they arrive. After an error the caller poisons the connection.
pub(super) async fn copy_out(conn: &mut Conn, sql: &str) -> Result<Vec<RowToInsert>, StoreError> {
    let c = postgres(conn)?;
    let mut stream = c.copy_out_raw(sql).await?;
    let mut decoder = Decoder::default();
    while let Some(chunk) = stream.try_next().await? {
        decoder.feed(&chunk)?;
    }
    decoder.finish()
}

fn postgres(conn: &mut Conn) -> Result<&mut sqlx::PgConnection, StoreError> {
    match conn {
        Conn::Postgres(c) => Ok(c),
        Conn::Sqlite(_) => Err(bad("COPY is PostgreSQL's")),
    }
}

/// Reads a binary COPY stream of staged rows (as [`encode`] writes them)
/// as its chunks arrive: a part taken by a compaction is never held twice,
/// as bytes and as rows.
#[derive(Default)]
pub(super) struct Decoder {
    /// Bytes of a unit (the header, a row) whose end has not come yet.
    carry: Vec<u8>,
    header_read: bool,
    ended: bool,
    rows: Vec<RowToInsert>,
}

/// Why a unit could not be read.
enum Short {
    /// Its end is in a later chunk.
    More,
    Bad(String),
}

impl Decoder {
    pub fn feed(&mut self, chunk: &[u8]) -> Result<(), StoreError> {
        let mut data = std::mem::take(&mut self.carry);
        let input: &[u8] = if data.is_empty() {
            chunk
        } else {
            data.extend_from_slice(chunk);
            &data
        };
        let mut reader = Reader(input);
        while !reader.0.is_empty() {
            let before = reader.0;
            let unit = if !self.header_read {
                header(&mut reader).map(|()| self.header_read = true)
            } else if self.ended {
                Err(Short::Bad("data after the end".into()))
            } else {
                row(&mut reader).map(|row| match row {
                    Some(row) => self.rows.push(row),
                    None => self.ended = true,
                })
            };
            match unit {
                Ok(()) => {}
                Err(Short::More) => {
                    self.carry = before.to_vec();
                    break;
                }
                Err(Short::Bad(what)) => return Err(bad(&what)),
            }
        }
        Ok(())
    }

    /// The rows, once the stream ended where it should.
    pub fn finish(self) -> Result<Vec<RowToInsert>, StoreError> {
        if !self.ended || !self.carry.is_empty() {
            return Err(bad("it ends early"));
        }
        Ok(self.rows)
    }
}

/// A whole stream at once.
#[cfg(test)]
fn decode(data: &[u8]) -> Result<Vec<RowToInsert>, StoreError> {
    let mut decoder = Decoder::default();
    decoder.feed(data)?;
    decoder.finish()
}

fn header(input: &mut Reader) -> Result<(), Short> {
    if input.take(SIGNATURE.len())? != SIGNATURE {
        return Err(Short::Bad("no binary COPY signature".into()));
    }
    // Bits 16-31 flag what a reader must understand (16: OIDs): none is
    // expected. Bits 0-15 may be ignored.
    if input.i32()? as u32 & 0xffff_0000 != 0 {
        return Err(Short::Bad("unexpected header flags".into()));
    }
    let extension =
        usize::try_from(input.i32()?).map_err(|_| Short::Bad("negative extension".into()))?;
    input.take(extension)?;
    Ok(())
}

/// A row, or None for the trailer.
fn row(input: &mut Reader) -> Result<Option<RowToInsert>, Short> {
    match input.i16()? {
        -1 => return Ok(None),
        FIELDS => {}
        n => return Err(Short::Bad(format!("a row of {n} fields"))),
    }
    let mut f = [0i64; FIELDS as usize];
    for field in &mut f {
        if input.i32()? != 8 {
            return Err(Short::Bad("a field that is not 8 bytes".into()));
        }
        let b = input.take(8)?;
        *field = i64::from_be_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]);
    }
    Ok(Some(RowToInsert {
        device: DeviceKey(f[0]),
        sensor: SensorKey(f[1]),
        ts_ms: f[2],
        seq: f[3],
        value: f64::from_bits(f[4] as u64),
    }))
}

fn bad(what: &str) -> StoreError {
    StoreError::Sqlx(sqlx::Error::Protocol(format!(
        "unexpected binary COPY data: {what}"
    )))
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], Short> {
        if self.0.len() < n {
            return Err(Short::More);
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }

    fn i16(&mut self) -> Result<i16, Short> {
        let b = self.take(2)?;
        Ok(i16::from_be_bytes([b[0], b[1]]))
    }

    fn i32(&mut self) -> Result<i32, Short> {
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
    fn rows_split_across_chunks_anywhere_decode_the_same() {
        let rows: Vec<_> = (0..5).map(|i| row(i, i as f64 / 3.0)).collect();
        let mut buf = Vec::new();
        encode(&rows, &mut buf);
        for size in [1, 2, 3, 7, 61, 62, 63, 1000] {
            let mut decoder = Decoder::default();
            for chunk in buf.chunks(size) {
                decoder.feed(chunk).unwrap();
            }
            let back = decoder.finish().unwrap();
            assert_eq!(back.len(), rows.len(), "chunks of {size}");
            assert!(
                rows.iter()
                    .zip(&back)
                    .all(|(a, b)| a.seq == b.seq && a.value.to_bits() == b.value.to_bits())
            );
        }
        let mut more = buf.clone();
        more.push(0);
        assert!(decode(&more).is_err(), "data after the trailer");
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
        let mut fields = buf.clone();
        fields[19..21].copy_from_slice(&4i16.to_be_bytes());
        assert!(decode(&fields).is_err());
        let mut flags = buf;
        flags[11..15].copy_from_slice(&(1i32 << 16).to_be_bytes());
        assert!(decode(&flags).is_err(), "OIDs");
    }
}
