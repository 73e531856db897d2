//! Protobuf <-> domain conversions and the mapping of errors to `Status`.
//! The only place that knows both sides.

use telemetry_proto::v1 as pb;
use tonic::{Code, Status};

use crate::commands::DeviceCommand;
use crate::domain::{
    Aggregate, Bucket, CommandRecord, CommandReply, CommandState, CommandTransition,
    CommittedBatch, DeviceHello, DeviceId, DeviceRecord, Reading, ReplyStatus, StoredReading,
};
use crate::operator::{ErrorCode, HubStats, OpError};
use crate::store::StoreError;

/// A Hello as the hub keeps it, and the token it presented.
pub fn hello(hello: pb::Hello) -> Result<(DeviceHello, String), Status> {
    let device_id =
        DeviceId::parse(&hello.device_id).map_err(|e| Status::invalid_argument(e.to_string()))?;
    let mut checked = DeviceHello::new(
        device_id,
        hello.firmware,
        hello.labels.into_iter().collect(),
        &hello.token,
    )
    .map_err(|e| Status::invalid_argument(e.to_string()))?;
    checked.twin = hello.twin.then_some(hello.desired_version);
    Ok((checked, hello.token))
}

/// A twin as operators get it.
pub fn twin(view: &crate::twin::TwinView) -> pb::Twin {
    let t = &view.twin;
    pb::Twin {
        device_id: view.device_id.clone(),
        tags: view.tags.clone().into_iter().collect(),
        desired_json: crate::twin::doc::encode(&t.desired),
        desired_version: t.desired_version,
        reported_json: crate::twin::doc::encode(&t.reported),
        reported_version: t.reported_version,
        delta_json: crate::twin::doc::encode(&t.delta()),
        metadata_json: t.metadata().to_string(),
    }
}

pub fn twin_part(part: crate::twin::TwinPart) -> pb::TwinPart {
    match part {
        crate::twin::TwinPart::Desired => pb::TwinPart::Desired,
        crate::twin::TwinPart::Reported => pb::TwinPart::Reported,
        crate::twin::TwinPart::Tags => pb::TwinPart::Tags,
    }
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

/// An operator request that failed, as a status: the same codes and
/// messages whichever door it came through.
pub fn op_status(err: OpError) -> Status {
    let message = err.public_message();
    let code = match err.code() {
        ErrorCode::InvalidArgument => Code::InvalidArgument,
        ErrorCode::NotFound => Code::NotFound,
        ErrorCode::AlreadyExists => Code::AlreadyExists,
        ErrorCode::FailedPrecondition => Code::FailedPrecondition,
        ErrorCode::ResourceExhausted | ErrorCode::Busy => Code::ResourceExhausted,
        ErrorCode::Unavailable => Code::Unavailable,
        ErrorCode::Internal => Code::Internal,
    };
    Status::new(code, message)
}

pub fn hub_stats(s: HubStats) -> pb::HubStats {
    pb::HubStats {
        live_sessions: s.live_sessions,
        readings_committed: s.readings_committed,
        duplicates: s.duplicates,
        rejected: s.rejected,
        commits: s.commits,
        compactions: s.compactions,
        ingest_queue_depth: s.ingest_queue_depth,
        readings_stored: s.readings_stored,
        mqtt_dropped: s.mqtt_dropped,
        mqtt_bad_messages: s.mqtt_bad_messages,
        mqtt_connected: s.mqtt_connected,
        commit_failures: s.commit_failures,
        compaction_failures: s.compaction_failures,
        storage_ok: s.storage_ok,
        live_tasks: s.live_tasks,
        ingest_uncommitted: s.ingest_uncommitted,
        auth_failures: s.auth_failures,
        mqtt_connection_errors: s.mqtt_connection_errors,
    }
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
        labels: d.tags.into_iter().collect(),
        in_sync: d.in_sync,
        desired_version: d.desired_version,
        reported_version: d.reported_version,
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
        return Ok(crate::operator::DEFAULT_AGGREGATES.to_vec());
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
    let pick = |a: Aggregate| wanted.contains(&a).then(|| b.value(a));
    pb::BucketRow {
        avg: pick(Aggregate::Avg),
        min: pick(Aggregate::Min),
        max: pick(Aggregate::Max),
        sum: pick(Aggregate::Sum),
        first: pick(Aggregate::First),
        last: pick(Aggregate::Last),
        sensor: b.sensor,
        bucket_start_ms: b.start_ms,
        count: b.count,
    }
}

pub fn command_message(c: DeviceCommand) -> pb::HubMessage {
    pb::HubMessage {
        msg: Some(pb::hub_message::Msg::Command(pb::Command {
            command_id: c.command_id,
            name: c.name,
            params_json: c.params,
            expires_at_ms: c.expires_at_ms,
        })),
    }
}

pub fn command_reply(r: pb::CommandReply) -> Result<CommandReply, String> {
    let status = match pb::CommandStatus::try_from(r.status) {
        Ok(pb::CommandStatus::Received) => ReplyStatus::Received,
        Ok(pb::CommandStatus::Succeeded) => ReplyStatus::Succeeded,
        Ok(pb::CommandStatus::Failed) => ReplyStatus::Failed,
        Ok(pb::CommandStatus::Rejected) => ReplyStatus::Rejected,
        _ => return Err(format!("reply for {:?} has no valid status", r.command_id)),
    };
    Ok(CommandReply {
        command_id: r.command_id,
        status,
        detail: r.detail,
        result: r.result_json,
    })
}

pub fn command_state(s: CommandState) -> pb::CommandState {
    match s {
        CommandState::Queued => pb::CommandState::Queued,
        CommandState::Sent => pb::CommandState::Sent,
        CommandState::Received => pb::CommandState::Received,
        CommandState::Succeeded => pb::CommandState::Succeeded,
        CommandState::Failed => pb::CommandState::Failed,
        CommandState::Rejected => pb::CommandState::Rejected,
        CommandState::Expired => pb::CommandState::Expired,
        CommandState::Cancelled => pb::CommandState::Cancelled,
    }
}

pub fn state_filter(raw: i32) -> Result<Option<CommandState>, Status> {
    Ok(match pb::CommandState::try_from(raw) {
        Ok(pb::CommandState::Unspecified) => None,
        Ok(pb::CommandState::Queued) => Some(CommandState::Queued),
        Ok(pb::CommandState::Sent) => Some(CommandState::Sent),
        Ok(pb::CommandState::Received) => Some(CommandState::Received),
        Ok(pb::CommandState::Succeeded) => Some(CommandState::Succeeded),
        Ok(pb::CommandState::Failed) => Some(CommandState::Failed),
        Ok(pb::CommandState::Rejected) => Some(CommandState::Rejected),
        Ok(pb::CommandState::Expired) => Some(CommandState::Expired),
        Ok(pb::CommandState::Cancelled) => Some(CommandState::Cancelled),
        Err(_) => {
            return Err(Status::invalid_argument(format!(
                "unknown command state {raw}"
            )));
        }
    })
}

pub fn command_info(rec: CommandRecord, history: Vec<CommandTransition>) -> pb::CommandInfo {
    pb::CommandInfo {
        command_id: rec.command_id,
        device_id: rec.device_id,
        name: rec.name,
        params_json: rec.params,
        state: command_state(rec.state) as i32,
        detail: rec.detail,
        result_json: rec.result,
        attempts: rec.attempts,
        created_at_ms: rec.created_at_ms,
        updated_at_ms: rec.updated_at_ms,
        expires_at_ms: rec.expires_at_ms,
        history: history
            .into_iter()
            .map(|t| pb::CommandTransition {
                state: command_state(t.state) as i32,
                at_ms: t.at_ms,
                detail: t.detail,
            })
            .collect(),
    }
}

/// The readings of a committed batch that match a watcher's filter.
pub fn live_readings(
    batch: &CommittedBatch,
    device: Option<&str>,
    sensor: Option<&str>,
) -> Vec<pb::LiveReading> {
    crate::operator::live_readings(batch, device, sensor)
        .map(|r| pb::LiveReading {
            device_id: r.device_id.to_owned(),
            sensor: r.reading.sensor.to_string(),
            seq: r.reading.seq,
            ts_ms: r.reading.ts_ms,
            value: r.reading.value,
        })
        .collect()
}

/// An alarm as the Operator API sends it.
pub fn alarm(a: &crate::alarms::Alarm) -> pb::Alarm {
    pb::Alarm {
        id: a.id,
        rule_id: a.rule_id,
        rule_version: a.rule_version,
        rule: a.rule.clone(),
        severity: a.severity.as_str().to_owned(),
        device_id: a.device.clone(),
        sensor: a.sensor.clone(),
        state: a.state.as_str().to_owned(),
        value: a.value,
        last_value: a.last_value,
        started_ms: a.started_ms,
        raised_ms: a.raised_ms,
        changed_ms: a.changed_ms,
        count: a.count,
        acked_ms: a.acked_ms,
        acked_by: a.acked_by.clone().unwrap_or_default(),
        ack_note: a.ack_note.clone().unwrap_or_default(),
        cleared_ms: a.cleared_ms,
        cleared_by: a.cleared_by.clone().unwrap_or_default(),
        clear_note: a.clear_note.clone().unwrap_or_default(),
    }
}

pub fn alarm_rule(r: &crate::alarms::Rule) -> pb::AlarmRule {
    pb::AlarmRule {
        id: r.id,
        version: r.version,
        name: r.spec.name.clone(),
        rule_json: r.spec.to_json(),
        created_ms: r.created_ms,
        updated_ms: r.updated_ms,
    }
}

/// A job as the Operator API sends it.
pub fn job(j: &crate::store::jobs::Job) -> pb::Job {
    let c = &j.counts;
    pb::Job {
        id: j.id,
        name: j.name.clone(),
        state: j.state.as_str().to_owned(),
        reason: j.reason.clone().unwrap_or_default(),
        total: j.total,
        counts: Some(pb::JobCounts {
            pending: c.pending,
            in_progress: c.in_progress,
            succeeded: c.succeeded,
            failed: c.failed,
            timed_out: c.timed_out,
            cancelled: c.cancelled,
        }),
        created_ms: j.created_ms,
        updated_ms: j.updated_ms,
        finished_ms: j.finished_ms,
        job_json: j.spec.to_json(),
    }
}

pub fn job_device(d: &crate::store::jobs::JobDevice) -> pb::JobDevice {
    pb::JobDevice {
        device_id: d.device.clone(),
        position: d.position,
        state: d.state.clone(),
        started_ms: d.started_ms,
        finished_ms: d.finished_ms,
        command_id: d.command_id.clone().unwrap_or_default(),
        desired_version: d.desired_version.map(|v| v as u64),
        detail: d.detail.clone().unwrap_or_default(),
    }
}

#[cfg(test)]
mod fuzz {
    //! Whatever bytes a device sends, decoding and validation never panic,
    //! and what they accept is within the hub's rules.

    use proptest::prelude::*;
    use prost::Message;

    use super::*;
    use crate::domain::{
        MAX_FIRMWARE_LEN, MAX_ID_LEN, MAX_LABEL_KEY_LEN, MAX_LABEL_VALUE_LEN, MAX_LABELS, MAX_SEQ,
        MIN_TS_MS,
    };

    /// Checks one decoded message the way a session does.
    fn validate(msg: pb::DeviceMessage, latest: i64) {
        match msg.msg {
            Some(pb::device_message::Msg::Hello(h)) => {
                if let Ok((hello, _)) = hello(h) {
                    assert!(!hello.device_id.as_str().is_empty());
                    assert!(hello.device_id.as_str().len() <= MAX_ID_LEN);
                    assert!(hello.firmware.len() <= MAX_FIRMWARE_LEN);
                    assert!(hello.labels.len() <= MAX_LABELS);
                    for (k, v) in &hello.labels {
                        assert!(!k.is_empty() && k.len() <= MAX_LABEL_KEY_LEN);
                        assert!(v.len() <= MAX_LABEL_VALUE_LEN);
                    }
                }
            }
            Some(pb::device_message::Msg::Readings(batch)) => {
                for r in batch.readings {
                    let r = reading(r);
                    if r.check(MIN_TS_MS, latest).is_ok() {
                        assert!((1..=MAX_SEQ).contains(&r.seq));
                        assert!((MIN_TS_MS..=latest).contains(&r.ts_ms));
                        assert!(r.value.is_finite());
                        assert!(!r.sensor.is_empty() && r.sensor.len() <= MAX_ID_LEN);
                        assert!(!r.sensor.chars().any(char::is_control));
                    }
                }
            }
            Some(pb::device_message::Msg::CommandReply(r)) => {
                let _ = command_reply(r);
            }
            Some(pb::device_message::Msg::Reported(p)) => {
                let limits = crate::twin::DocLimits::default();
                if let Ok(patch) = crate::twin::doc::parse_patch(&p.patch_json, &limits) {
                    let mut doc = crate::twin::Doc::new();
                    crate::twin::doc::merge(&mut doc, &patch);
                }
            }
            None => {}
        }
    }

    /// A message as comparable text: labels sorted, values by their bits
    /// (NaN != NaN, and a map's order is not part of the message). -0.0 is
    /// 0.0: prost leaves a field equal to its default off the wire, and
    /// -0.0 == 0.0, so a -0.0 from a prost client arrives as 0.0.
    fn canonical(msg: &pb::DeviceMessage) -> String {
        match &msg.msg {
            Some(pb::device_message::Msg::Hello(h)) => {
                let labels: std::collections::BTreeMap<_, _> = h.labels.iter().collect();
                format!(
                    "{:?}",
                    (
                        &h.device_id,
                        &h.token,
                        &h.firmware,
                        labels,
                        h.twin,
                        h.desired_version
                    )
                )
            }
            Some(pb::device_message::Msg::Readings(b)) => {
                let readings: Vec<_> = b
                    .readings
                    .iter()
                    .map(|r| {
                        (
                            r.seq,
                            &r.sensor,
                            r.ts_ms,
                            if r.value == 0.0 { 0 } else { r.value.to_bits() },
                        )
                    })
                    .collect();
                format!("{readings:?}")
            }
            other => format!("{other:?}"),
        }
    }

    fn any_reading() -> impl Strategy<Value = pb::Reading> {
        (
            prop_oneof![
                any::<u64>(),
                Just(0u64),
                Just(MAX_SEQ),
                Just(MAX_SEQ + 1),
                Just(u64::MAX)
            ],
            prop_oneof![".{0,80}", Just(String::new())],
            prop_oneof![
                any::<i64>(),
                Just(i64::MIN),
                Just(MIN_TS_MS - 1),
                Just(MIN_TS_MS)
            ],
            prop_oneof![
                any::<f64>(),
                Just(f64::NAN),
                Just(f64::INFINITY),
                Just(-0.0),
                Just(f64::MIN_POSITIVE / 2.0)
            ],
        )
            .prop_map(|(seq, sensor, ts_ms, value)| pb::Reading {
                seq,
                sensor,
                ts_ms,
                value,
            })
    }

    fn any_message() -> impl Strategy<Value = pb::DeviceMessage> {
        let hello = (
            ".{0,70}",
            ".{0,200}",
            ".{0,140}",
            proptest::collection::hash_map(".{0,70}", ".{0,300}", 0..40),
            any::<bool>(),
            any::<u64>(),
        )
            .prop_map(
                |(device_id, token, firmware, labels, twin, desired_version)| {
                    pb::device_message::Msg::Hello(pb::Hello {
                        device_id,
                        token,
                        firmware,
                        labels,
                        twin,
                        desired_version,
                    })
                },
            );
        let reported = (
            any::<u64>(),
            prop_oneof![".{0,60}", Just("{\"a\":{\"b\":null}}".to_owned())],
        )
            .prop_map(|(seq, patch_json)| {
                pb::device_message::Msg::Reported(pb::ReportedPatch { seq, patch_json })
            });
        let readings = proptest::collection::vec(any_reading(), 0..20)
            .prop_map(|readings| pb::device_message::Msg::Readings(pb::ReadingBatch { readings }));
        let reply = (".{0,40}", any::<i32>(), ".{0,40}", ".{0,40}").prop_map(
            |(command_id, status, detail, result_json)| {
                pb::device_message::Msg::CommandReply(pb::CommandReply {
                    command_id,
                    status,
                    detail,
                    result_json,
                })
            },
        );
        proptest::option::of(prop_oneof![hello, readings, reply, reported])
            .prop_map(|msg| pb::DeviceMessage { msg })
    }

    proptest! {
        #![proptest_config(crate::fuzz_config())]

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            if let Ok(msg) = pb::DeviceMessage::decode(bytes.as_slice()) {
                validate(msg, crate::domain::now_ms());
            }
        }

        #[test]
        fn arbitrary_messages_round_trip_and_validate(msg in any_message()) {
            let bytes = msg.encode_to_vec();
            let decoded = pb::DeviceMessage::decode(bytes.as_slice()).unwrap();
            prop_assert_eq!(canonical(&decoded), canonical(&msg));
            validate(decoded, crate::domain::now_ms());
        }

        #[test]
        fn mutated_messages_never_panic(
            msg in any_message(),
            flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..8),
        ) {
            let mut bytes = msg.encode_to_vec();
            for (at, byte) in flips {
                if !bytes.is_empty() {
                    let i = at % bytes.len();
                    bytes[i] ^= byte;
                }
            }
            if let Ok(msg) = pb::DeviceMessage::decode(bytes.as_slice()) {
                validate(msg, crate::domain::now_ms());
            }
        }
    }
}
