//! Protobuf <-> domain conversions and the mapping of errors to `Status`.
//! The only place that knows both sides.

use telemetry_proto::v1 as pb;
use tonic::{Code, Status};

use crate::domain::{
    Aggregate, Bucket, DeviceHello, DeviceId, DeviceRecord, Reading, StoredReading,
};
use crate::store::StoreError;

pub fn hello(hello: pb::Hello) -> Result<DeviceHello, Status> {
    let device_id =
        DeviceId::parse(&hello.device_id).map_err(|e| Status::invalid_argument(e.to_string()))?;
    Ok(DeviceHello {
        device_id,
        firmware: hello.firmware,
        labels: hello.labels.into_iter().collect(),
    })
}

pub fn reading(r: pb::Reading) -> Reading {
    Reading {
        seq: r.seq,
        sensor: r.sensor,
        ts_ms: r.ts_ms,
        value: r.value,
    }
}

/// Maps an error read from a device stream to the status the device gets,
/// and says whether the peer can still hear it (a bad message, not a dead
/// connection).
pub fn inbound_error(status: Status, max_message_bytes: usize) -> (Status, bool) {
    match status.code() {
        // tonic reports its decode size limit as OUT_OF_RANGE; the gRPC spec
        // says RESOURCE_EXHAUSTED.
        Code::OutOfRange => (
            Status::resource_exhausted(format!(
                "message larger than the hub's limit of {max_message_bytes} bytes"
            )),
            true,
        ),
        Code::Internal if status.message().contains("decode") => (
            Status::invalid_argument("malformed message: not a telemetry.v1.DeviceMessage"),
            true,
        ),
        _ => (status, false),
    }
}

/// The one mapping of storage errors to a client status: no SQL text or
/// paths reach the client; the details go to the log.
pub fn store_status(err: StoreError) -> Status {
    tracing::error!(error = %err, "storage error");
    Status::internal("storage error; see the hub's log")
}

pub fn device_info(d: DeviceRecord, connected_since_ms: Option<i64>) -> pb::DeviceInfo {
    pb::DeviceInfo {
        device_id: d.device_id,
        online: connected_since_ms.is_some(),
        connected_since_ms,
        last_seen_ms: d.last_seen_ms,
        first_seen_ms: d.first_seen_ms,
        acked_seq: d.acked_seq,
        readings: d.readings,
        firmware: d.firmware,
        labels: d.labels.into_iter().collect(),
    }
}

pub fn reading_row(r: StoredReading) -> pb::ReadingRow {
    pb::ReadingRow {
        sensor: r.sensor,
        seq: r.seq,
        ts_ms: r.ts_ms,
        value: r.value,
    }
}

pub fn aggregates(raw: &[i32]) -> Result<Vec<Aggregate>, Status> {
    if raw.is_empty() {
        return Ok(vec![Aggregate::Count, Aggregate::Avg]);
    }
    raw.iter()
        .map(|a| match pb::Aggregate::try_from(*a) {
            Ok(pb::Aggregate::Avg) => Ok(Aggregate::Avg),
            Ok(pb::Aggregate::Min) => Ok(Aggregate::Min),
            Ok(pb::Aggregate::Max) => Ok(Aggregate::Max),
            Ok(pb::Aggregate::Count) => Ok(Aggregate::Count),
            Ok(pb::Aggregate::Sum) => Ok(Aggregate::Sum),
            Ok(pb::Aggregate::First) => Ok(Aggregate::First),
            Ok(pb::Aggregate::Last) => Ok(Aggregate::Last),
            _ => Err(Status::invalid_argument(format!("unknown aggregate {a}"))),
        })
        .collect()
}

/// A bucket with only the requested aggregates set (count is always set).
pub fn bucket_row(b: Bucket, wanted: &[Aggregate]) -> pb::BucketRow {
    let pick = |a: Aggregate, v: f64| wanted.contains(&a).then_some(v);
    pb::BucketRow {
        avg: pick(Aggregate::Avg, b.avg()),
        min: pick(Aggregate::Min, b.min),
        max: pick(Aggregate::Max, b.max),
        sum: pick(Aggregate::Sum, b.sum),
        first: pick(Aggregate::First, b.first),
        last: pick(Aggregate::Last, b.last),
        sensor: b.sensor,
        bucket_start_ms: b.start_ms,
        count: b.count,
    }
}
