//! Plain types of the hub. Depends on nothing else in the crate.

use std::collections::BTreeMap;
use std::fmt;
use std::time::{SystemTime, UNIX_EPOCH};

/// Longest device id and sensor name accepted, in bytes.
pub const MAX_ID_LEN: usize = 64;

/// Highest seq a reading may carry (2^63-1: marks are SQLite integers).
pub const MAX_SEQ: u64 = i64::MAX as u64;
/// Earliest reading time accepted: 2000-01-01T00:00:00Z.
pub const MIN_TS_MS: i64 = 946_684_800_000;

/// Bounds of what a device says about itself in Hello.
pub const MAX_FIRMWARE_LEN: usize = 128;
pub const MAX_LABELS: usize = 32;
pub const MAX_LABEL_KEY_LEN: usize = 64;
pub const MAX_LABEL_VALUE_LEN: usize = 256;
/// Longest Hello.token looked at (`auth` checks what it proves).
pub const MAX_TOKEN_LEN: usize = 1024;

/// A device's external id: 1 to 64 characters of `[A-Za-z0-9._:-]`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DeviceId(String);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeviceIdError {
    #[error("device_id must not be empty")]
    Empty,
    #[error("device_id is longer than {MAX_ID_LEN} characters")]
    TooLong,
    #[error("device_id may only contain A-Z a-z 0-9 . _ : - (found {0:?})")]
    BadChar(char),
}

impl DeviceId {
    pub fn parse(raw: &str) -> Result<Self, DeviceIdError> {
        if raw.is_empty() {
            return Err(DeviceIdError::Empty);
        }
        if raw.len() > MAX_ID_LEN {
            return Err(DeviceIdError::TooLong);
        }
        if let Some(bad) = raw
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | ':' | '-')))
        {
            return Err(DeviceIdError::BadChar(bad));
        }
        Ok(Self(raw.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for DeviceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The integer key of a registered device in the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DeviceKey(pub i64);

/// The integer key of a sensor name in the sensor dictionary.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SensorKey(pub i64);

/// What a device says about itself in Hello.
#[derive(Debug, Clone)]
pub struct DeviceHello {
    pub device_id: DeviceId,
    pub firmware: String,
    pub labels: BTreeMap<String, String>,
    /// The device keeps a twin: Some(the desired version it last applied).
    pub twin: Option<u64>,
}

/// How a device arrives at the writer's registration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arrival {
    /// A gRPC stream's Hello: its firmware and labels are reported state,
    /// and the device is online from now.
    Stream,
    /// A line-protocol write: no Hello was said, so the device's firmware,
    /// reported state and online mark stay as they are.
    Write,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HelloError {
    #[error("firmware is longer than {MAX_FIRMWARE_LEN} bytes")]
    FirmwareTooLong,
    #[error("more than {MAX_LABELS} labels")]
    TooManyLabels,
    #[error("a label key must be 1 to {MAX_LABEL_KEY_LEN} bytes (got {0} bytes)")]
    BadLabelKey(usize),
    #[error("the value of label {0:?} is longer than {MAX_LABEL_VALUE_LEN} bytes")]
    LabelValueTooLong(String),
    #[error("{0} contains a control character")]
    ControlChar(&'static str),
    #[error("token is longer than {MAX_TOKEN_LEN} bytes")]
    TokenTooLong,
}

impl DeviceHello {
    /// Checks the bounds of a Hello: its fields are stored and shown to
    /// operators, so they are short and free of control characters (a
    /// firmware string must not be able to drive an operator's terminal).
    pub fn new(
        device_id: DeviceId,
        firmware: String,
        labels: BTreeMap<String, String>,
        token: &str,
    ) -> Result<Self, HelloError> {
        let has_control = |s: &str| s.chars().any(char::is_control);
        if token.len() > MAX_TOKEN_LEN {
            return Err(HelloError::TokenTooLong);
        }
        if firmware.len() > MAX_FIRMWARE_LEN {
            return Err(HelloError::FirmwareTooLong);
        }
        if has_control(&firmware) {
            return Err(HelloError::ControlChar("firmware"));
        }
        if labels.len() > MAX_LABELS {
            return Err(HelloError::TooManyLabels);
        }
        for (key, value) in &labels {
            if key.is_empty() || key.len() > MAX_LABEL_KEY_LEN {
                return Err(HelloError::BadLabelKey(key.len()));
            }
            if value.len() > MAX_LABEL_VALUE_LEN {
                return Err(HelloError::LabelValueTooLong(key.clone()));
            }
            if has_control(key) || has_control(value) {
                return Err(HelloError::ControlChar("a label"));
            }
        }
        Ok(Self {
            device_id,
            firmware,
            labels,
            twin: None,
        })
    }
}

/// One sample of one sensor, as sent by a device.
#[derive(Debug, Clone, PartialEq)]
pub struct Reading {
    pub seq: u64,
    pub sensor: String,
    pub ts_ms: i64,
    pub value: f64,
}

/// Why a reading is not stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RejectReason {
    #[error("seq must be between 1 and 2^63-1")]
    SeqOutOfRange,
    #[error("sensor name is empty")]
    EmptySensor,
    #[error("sensor name is longer than {MAX_ID_LEN} bytes")]
    SensorTooLong,
    #[error("sensor name contains a control character")]
    SensorControlChar,
    #[error("value is NaN or infinite")]
    NotFinite,
    #[error("timestamp is too far in the future")]
    FromTheFuture,
    #[error("timestamp is before 2000-01-01")]
    TooOld,
    #[error("timestamp is older than the hub keeps readings (storage.retention)")]
    PastRetention,
    #[error("the device has reached its limit of distinct sensors")]
    DeviceSensorLimit,
    #[error("the hub's sensor dictionary is full")]
    SensorDictionaryFull,
}

impl Reading {
    /// Checks a reading against the hub's rules; `latest_ts_ms` is now plus
    /// the allowed clock skew, `earliest_ts_ms` the retention cutoff (a
    /// reading retention would delete at once is refused: a device with a
    /// wrong clock must not fill the store, or make a partition a month).
    pub fn check(&self, earliest_ts_ms: i64, latest_ts_ms: i64) -> Result<(), RejectReason> {
        if !seq_in_range(self.seq) {
            Err(RejectReason::SeqOutOfRange)
        } else if self.sensor.is_empty() {
            Err(RejectReason::EmptySensor)
        } else if self.sensor.len() > MAX_ID_LEN {
            Err(RejectReason::SensorTooLong)
        } else if self.sensor.chars().any(char::is_control) {
            Err(RejectReason::SensorControlChar)
        } else if !self.value.is_finite() {
            Err(RejectReason::NotFinite)
        } else if self.ts_ms > latest_ts_ms {
            Err(RejectReason::FromTheFuture)
        } else if self.ts_ms < MIN_TS_MS {
            Err(RejectReason::TooOld)
        } else if self.ts_ms < earliest_ts_ms {
            Err(RejectReason::PastRetention)
        } else {
            Ok(())
        }
    }
}

/// A seq that can be a device's mark: 1 to 2^63-1.
pub fn seq_in_range(seq: u64) -> bool {
    (1..=MAX_SEQ).contains(&seq)
}

/// Where the readings mark of a device goes over one more reading, and what
/// that reading comes to. A seq outside 1..=2^63-1 never moves the mark.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Store,
    Duplicate,
    Rejected,
}

/// Moves `mark` over one checked reading and says what to do with it.
pub fn judge(mark: &mut u64, reading: &CheckedReading) -> Verdict {
    judge_seq(
        mark,
        reading.seq(),
        matches!(reading, CheckedReading::Valid(_)),
    )
}

/// [`judge`] of a reading with this seq, valid or rejected by its checks
/// (the writer numbers line-protocol readings itself).
pub fn judge_seq(mark: &mut u64, seq: u64, valid: bool) -> Verdict {
    if !seq_in_range(seq) {
        return Verdict::Rejected;
    }
    if seq <= *mark {
        return Verdict::Duplicate;
    }
    *mark = seq;
    if valid {
        Verdict::Store
    } else {
        Verdict::Rejected
    }
}

/// A reading after the session checked it. Rejected readings still carry
/// their seq: the device's high-water mark moves past them.
#[derive(Debug, Clone, PartialEq)]
pub enum CheckedReading {
    Valid(Reading),
    Rejected { seq: u64 },
}

impl CheckedReading {
    pub fn seq(&self) -> u64 {
        match self {
            CheckedReading::Valid(r) => r.seq,
            CheckedReading::Rejected { seq } => *seq,
        }
    }
}

/// A registered device as stored.
#[derive(Debug, Clone)]
pub struct DeviceRecord {
    pub key: DeviceKey,
    pub device_id: String,
    pub firmware: String,
    /// Operator-owned (a device's Hello never changes them).
    pub tags: BTreeMap<String, String>,
    pub first_seen_ms: i64,
    pub last_seen_ms: i64,
    pub acked_seq: u64,
    pub readings: u64,
    /// Since when the device has a stream to some hub, as the database
    /// says (several hubs on PostgreSQL: a hub's heartbeat must be fresh).
    pub online_since_ms: Option<i64>,
    /// Its twin's delta is empty.
    pub in_sync: bool,
    pub desired_version: u64,
    pub reported_version: u64,
}

/// One stored reading as returned by a query.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredReading {
    pub sensor: String,
    pub seq: u64,
    pub ts_ms: i64,
    pub value: f64,
}

/// A per-bucket aggregate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Aggregate {
    Avg,
    Min,
    Max,
    Count,
    Sum,
    First,
    Last,
}

impl Aggregate {
    pub const ALL: [Aggregate; 7] = [
        Aggregate::Avg,
        Aggregate::Min,
        Aggregate::Max,
        Aggregate::Count,
        Aggregate::Sum,
        Aggregate::First,
        Aggregate::Last,
    ];

    /// Its lowercase name, as operators write it (`avg`, `min`, ...).
    pub fn name(self) -> &'static str {
        match self {
            Aggregate::Avg => "avg",
            Aggregate::Min => "min",
            Aggregate::Max => "max",
            Aggregate::Count => "count",
            Aggregate::Sum => "sum",
            Aggregate::First => "first",
            Aggregate::Last => "last",
        }
    }
}

/// What a query asks for.
#[derive(Debug, Clone)]
pub struct ReadingQuery {
    pub device: DeviceKey,
    pub sensor: Option<String>,
    /// Inclusive.
    pub since_ms: Option<i64>,
    /// Exclusive.
    pub until_ms: Option<i64>,
    /// 0 = no limit.
    pub limit: u64,
    /// Some(width) for time buckets aligned to the epoch.
    pub bucket_ms: Option<i64>,
}

/// Aggregates of one sensor over one time bucket. All of them are computed;
/// the caller shows the ones asked for.
#[derive(Debug, Clone, PartialEq)]
pub struct Bucket {
    pub sensor: String,
    pub start_ms: i64,
    pub count: u64,
    pub sum: f64,
    pub min: f64,
    pub max: f64,
    pub first: f64,
    pub last: f64,
    /// When `first` was taken: whether the bucket's first reading lies on
    /// its start (a closed range ending there includes it).
    pub first_ts_ms: i64,
}

impl Bucket {
    pub fn avg(&self) -> f64 {
        self.sum / self.count as f64
    }

    /// The value of one aggregate (count as a float).
    pub fn value(&self, a: Aggregate) -> f64 {
        match a {
            Aggregate::Avg => self.avg(),
            Aggregate::Min => self.min,
            Aggregate::Max => self.max,
            Aggregate::Count => self.count as f64,
            Aggregate::Sum => self.sum,
            Aggregate::First => self.first,
            Aggregate::Last => self.last,
        }
    }

    /// Start of the epoch-aligned bucket of `width` ms holding `ts_ms`;
    /// never overflows, whatever the two are.
    pub fn start_of(ts_ms: i64, width: i64) -> i64 {
        let width = width.max(1);
        ts_ms
            .checked_sub(ts_ms.rem_euclid(width))
            .unwrap_or(i64::MIN)
    }
}

/// Text from a device or an operator, made safe for a terminal: control
/// characters (escape sequences, title-setting, screen clears) are shown
/// escaped. Every door refuses them in what it stores; older data may
/// still hold some.
pub fn shown(s: &str) -> std::borrow::Cow<'_, str> {
    if s.chars().any(char::is_control) {
        std::borrow::Cow::Owned(s.chars().flat_map(char::escape_debug).collect())
    } else {
        std::borrow::Cow::Borrowed(s)
    }
}

/// A CSV field, the one rule of every door that writes CSV: quoted when it
/// holds a separator (`,`, or `;` where a locale splits on it), a quote or
/// a line break; one a spreadsheet would take for a formula (`=`, `+`, `-`,
/// `@`, tab, CR first) is quoted and starts with `'`.
pub fn csv_field(raw: &str) -> std::borrow::Cow<'_, str> {
    let formula = raw.starts_with(['=', '+', '-', '@', '\t', '\r']);
    if formula || raw.contains([',', ';', '"', '\n', '\r', '\t']) {
        let quote = if formula { "'" } else { "" };
        format!("\"{quote}{}\"", raw.replace('"', "\"\"")).into()
    } else {
        raw.into()
    }
}

/// RFC3339 UTC with milliseconds (2026-11-25T12:00:00.123Z); a time
/// before 1970 or after 9999 (which humantime would panic on), as its
/// number of ms.
pub fn rfc3339_ms(ts_ms: i64) -> String {
    /// 9999-12-31T23:59:59.999Z, the last time humantime prints.
    const LAST_MS: u64 = 253_402_300_799_999;
    u64::try_from(ts_ms)
        .ok()
        .filter(|ms| *ms <= LAST_MS)
        .and_then(|ms| UNIX_EPOCH.checked_add(std::time::Duration::from_millis(ms)))
        .map_or_else(
            || ts_ms.to_string(),
            |t| humantime::format_rfc3339_millis(t).to_string(),
        )
}

/// What a Hello proved, checked once more by the writer when it registers
/// the device: an operator may have changed the credentials in between.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proof {
    /// Open or mTLS: the device must not be removed meanwhile.
    Admitted,
    /// Its own token: the stored hash must still be this one.
    OwnToken([u8; 32]),
    /// A fleet token: the device must still have no own token.
    FleetToken,
    /// A client certificate (its SHA-256): not revoked, and the device
    /// pinned to no other.
    Certificate([u8; 32]),
}

/// What the store holds about a device's credentials.
#[derive(Debug, Clone, Copy, Default)]
pub struct StoredCredentials {
    /// SHA-256 of its own token, when enrolled individually.
    pub token_sha256: Option<[u8; 32]>,
    /// Removed by an operator: refused even with a valid fleet token.
    pub removed: bool,
    /// The certificate the device is pinned to, if any.
    pub cert_sha256: Option<[u8; 32]>,
    /// The certificate presented is revoked.
    pub cert_revoked: bool,
}

/// A hub whose heartbeat is older than this is presumed dead: its devices
/// show offline on every hub (several hubs on one PostgreSQL database).
pub const HUB_LEASE: std::time::Duration = std::time::Duration::from_secs(10);

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_ids() {
        assert!(DeviceId::parse("sim-00001").is_ok());
        assert!(DeviceId::parse("a.b_c:d-E9").is_ok());
        assert_eq!(DeviceId::parse(""), Err(DeviceIdError::Empty));
        assert_eq!(DeviceId::parse("a b"), Err(DeviceIdError::BadChar(' ')));
        assert_eq!(DeviceId::parse("dév"), Err(DeviceIdError::BadChar('é')));
        assert!(DeviceId::parse(&"x".repeat(64)).is_ok());
        assert_eq!(
            DeviceId::parse(&"x".repeat(65)),
            Err(DeviceIdError::TooLong)
        );
    }

    #[test]
    fn reading_checks() {
        let latest = MIN_TS_MS + 2000;
        let ok = Reading {
            seq: 1,
            sensor: "t".into(),
            ts_ms: MIN_TS_MS + 1000,
            value: 1.5,
        };
        assert_eq!(ok.check(MIN_TS_MS, latest), Ok(()));
        let with = |f: fn(&mut Reading)| {
            let mut r = ok.clone();
            f(&mut r);
            r.check(MIN_TS_MS, latest)
        };
        assert_eq!(with(|r| r.seq = 0), Err(RejectReason::SeqOutOfRange));
        assert_eq!(with(|r| r.seq = u64::MAX), Err(RejectReason::SeqOutOfRange));
        assert_eq!(with(|r| r.sensor.clear()), Err(RejectReason::EmptySensor));
        assert_eq!(
            with(|r| r.sensor = "s".repeat(65)),
            Err(RejectReason::SensorTooLong)
        );
        assert_eq!(
            with(|r| r.sensor = "t\u{1b}[31m".into()),
            Err(RejectReason::SensorControlChar)
        );
        assert_eq!(with(|r| r.value = f64::NAN), Err(RejectReason::NotFinite));
        assert_eq!(
            with(|r| r.value = f64::NEG_INFINITY),
            Err(RejectReason::NotFinite)
        );
        assert_eq!(
            with(|r| r.ts_ms = MIN_TS_MS + 2001),
            Err(RejectReason::FromTheFuture)
        );
        assert_eq!(with(|r| r.ts_ms = i64::MIN), Err(RejectReason::TooOld));
        let recent = Reading {
            ts_ms: MIN_TS_MS,
            ..ok.clone()
        };
        assert_eq!(recent.check(MIN_TS_MS, MIN_TS_MS + 1), Ok(()));
        assert_eq!(
            recent.check(MIN_TS_MS + 1, MIN_TS_MS + 1),
            Err(RejectReason::PastRetention)
        );
        let old = Reading {
            ts_ms: MIN_TS_MS - 1,
            ..ok.clone()
        };
        assert_eq!(
            old.check(MIN_TS_MS + 1, MIN_TS_MS + 1),
            Err(RejectReason::TooOld)
        );
        assert_eq!(with(|r| r.seq = MAX_SEQ), Ok(()));
    }

    #[test]
    fn out_of_range_seqs_never_move_the_mark() {
        let valid = |seq| {
            CheckedReading::Valid(Reading {
                seq,
                sensor: "t".into(),
                ts_ms: MIN_TS_MS,
                value: 0.0,
            })
        };
        let mut mark = 5;
        assert_eq!(judge(&mut mark, &valid(0)), Verdict::Rejected);
        assert_eq!(judge(&mut mark, &valid(1 << 63)), Verdict::Rejected);
        assert_eq!(judge(&mut mark, &valid(u64::MAX)), Verdict::Rejected);
        assert_eq!(mark, 5);
        assert_eq!(judge(&mut mark, &valid(5)), Verdict::Duplicate);
        assert_eq!(
            judge(&mut mark, &CheckedReading::Rejected { seq: 6 }),
            Verdict::Rejected
        );
        assert_eq!(
            (judge(&mut mark, &valid(MAX_SEQ)), mark),
            (Verdict::Store, MAX_SEQ)
        );
    }

    #[test]
    fn hello_bounds() {
        let id = || DeviceId::parse("d").unwrap();
        let labels = |n: usize, key_len: usize, value_len: usize| -> BTreeMap<String, String> {
            (0..n)
                .map(|i| (format!("{i:0key_len$}"), "v".repeat(value_len)))
                .collect()
        };
        let hello = |fw: &str, l: BTreeMap<String, String>, token: &str| {
            DeviceHello::new(id(), fw.to_owned(), l, token).map(|_| ())
        };
        assert_eq!(
            hello(&"f".repeat(128), labels(32, 64, 256), &"t".repeat(1024)),
            Ok(())
        );
        assert_eq!(
            hello(&"f".repeat(129), labels(0, 1, 0), ""),
            Err(HelloError::FirmwareTooLong)
        );
        assert_eq!(
            hello("fw", labels(33, 2, 1), ""),
            Err(HelloError::TooManyLabels)
        );
        assert_eq!(
            hello("fw", labels(1, 65, 1), ""),
            Err(HelloError::BadLabelKey(65))
        );
        let empty_key = [(String::new(), "v".to_owned())].into_iter().collect();
        assert_eq!(hello("fw", empty_key, ""), Err(HelloError::BadLabelKey(0)));
        assert!(matches!(
            hello("fw", labels(1, 1, 257), ""),
            Err(HelloError::LabelValueTooLong(_))
        ));
        assert_eq!(
            hello("fw\x1b[2J", labels(0, 1, 0), ""),
            Err(HelloError::ControlChar("firmware"))
        );
        assert_eq!(
            hello("fw", labels(0, 1, 0), &"t".repeat(1025)),
            Err(HelloError::TokenTooLong)
        );
    }

    #[test]
    fn bucket_starts_never_overflow() {
        assert_eq!(Bucket::start_of(10_500, 1000), 10_000);
        assert_eq!(Bucket::start_of(-1, 1000), -1000);
        assert_eq!(Bucket::start_of(i64::MIN, 3), i64::MIN);
        assert_eq!(Bucket::start_of(i64::MAX, i64::MAX), i64::MAX);
        assert_eq!(Bucket::start_of(i64::MIN + 1, i64::MAX), i64::MIN + 1);
    }

    #[test]
    fn rfc3339_never_panics() {
        assert_eq!(rfc3339_ms(1_767_323_045_250), "2026-01-02T03:04:05.250Z");
        assert_eq!(rfc3339_ms(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339_ms(-5), "-5");
        // Past what humantime prints (year 9999), or SystemTime holds.
        assert_eq!(rfc3339_ms(253_402_300_799_999), "9999-12-31T23:59:59.999Z");
        assert_eq!(rfc3339_ms(i64::MAX), i64::MAX.to_string());
    }
}

/// Where a command is in its life. Final states never change again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CommandState {
    Queued,
    Sent,
    Received,
    Succeeded,
    Failed,
    Rejected,
    Expired,
    Cancelled,
}

impl CommandState {
    pub const ALL: [CommandState; 8] = [
        CommandState::Queued,
        CommandState::Sent,
        CommandState::Received,
        CommandState::Succeeded,
        CommandState::Failed,
        CommandState::Rejected,
        CommandState::Expired,
        CommandState::Cancelled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            CommandState::Queued => "QUEUED",
            CommandState::Sent => "SENT",
            CommandState::Received => "RECEIVED",
            CommandState::Succeeded => "SUCCEEDED",
            CommandState::Failed => "FAILED",
            CommandState::Rejected => "REJECTED",
            CommandState::Expired => "EXPIRED",
            CommandState::Cancelled => "CANCELLED",
        }
    }

    pub fn parse(raw: &str) -> Option<Self> {
        Self::ALL
            .into_iter()
            .find(|s| s.as_str().eq_ignore_ascii_case(raw))
    }

    pub fn is_final(self) -> bool {
        !matches!(
            self,
            CommandState::Queued | CommandState::Sent | CommandState::Received
        )
    }
}

impl fmt::Display for CommandState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A command as the hub tracks it.
#[derive(Debug, Clone, PartialEq)]
pub struct CommandRecord {
    pub command_id: String,
    pub device_id: String,
    pub name: String,
    /// A JSON object.
    pub params: String,
    pub state: CommandState,
    pub detail: String,
    /// A JSON value, or empty.
    pub result: String,
    /// Times the command was written to a device stream.
    pub attempts: u32,
    pub created_at_ms: i64,
    pub updated_at_ms: i64,
    pub expires_at_ms: i64,
}

/// One persisted state change of a command.
#[derive(Debug, Clone, PartialEq)]
pub struct CommandTransition {
    pub state: CommandState,
    pub at_ms: i64,
    pub detail: String,
}

/// What a device said about a command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyStatus {
    Received,
    Succeeded,
    Failed,
    Rejected,
}

#[derive(Debug, Clone)]
pub struct CommandReply {
    pub command_id: String,
    pub status: ReplyStatus,
    pub detail: String,
    pub result: String,
}

/// One committed reading, as the live fan-out carries it.
#[derive(Debug, Clone, PartialEq)]
pub struct LiveReading {
    pub seq: u64,
    pub sensor: std::sync::Arc<str>,
    pub ts_ms: i64,
    pub value: f64,
}

/// The readings of one device in one commit.
#[derive(Debug, Clone, PartialEq)]
pub struct DeviceReadings {
    pub device_id: std::sync::Arc<str>,
    pub readings: Vec<LiveReading>,
}

/// Everything one commit stored, published after the commit.
#[derive(Debug, Clone, PartialEq)]
pub struct CommittedBatch {
    /// Readings published before this batch (since the hub started): a
    /// consumer that sees a gap knows how many it missed.
    pub first_index: u64,
    pub count: u64,
    pub devices: Vec<DeviceReadings>,
}

/// A device's stream came or went.
#[derive(Debug, Clone, PartialEq)]
pub struct Presence {
    pub device_id: String,
    pub online: bool,
    /// Offline because another hub claimed the device: that hub says it is
    /// online, so nobody here announces it offline.
    pub moved_away: bool,
    /// The session epoch of the stream that came or went.
    pub epoch: u64,
    /// When the stream started (online) or ended (offline), ms since the epoch.
    pub since_ms: i64,
    pub firmware: String,
}

#[cfg(test)]
mod marks {
    //! The high-water mark over any sequence of seqs a device may send.

    use proptest::prelude::*;

    use super::*;

    fn checked(seq: u64, valid: bool) -> CheckedReading {
        if valid {
            CheckedReading::Valid(Reading {
                seq,
                sensor: "t".into(),
                ts_ms: MIN_TS_MS,
                value: 0.0,
            })
        } else {
            CheckedReading::Rejected { seq }
        }
    }

    fn any_seq() -> impl Strategy<Value = u64> {
        prop_oneof![
            0u64..50,
            any::<u64>(),
            Just(MAX_SEQ),
            Just(MAX_SEQ + 1),
            Just(u64::MAX)
        ]
    }

    proptest! {
        #![proptest_config(crate::fuzz_config())]

        #[test]
        fn the_mark_never_leaves_range_never_falls_and_stores_each_seq_once(
            start in 0..=MAX_SEQ,
            readings in proptest::collection::vec((any_seq(), any::<bool>()), 0..64),
        ) {
            let mut mark = start;
            let mut stored = Vec::new();
            for (seq, valid) in readings {
                let before = mark;
                let verdict = judge(&mut mark, &checked(seq, valid));
                prop_assert!(mark >= before && mark <= MAX_SEQ);
                if !seq_in_range(seq) {
                    prop_assert_eq!((verdict, mark), (Verdict::Rejected, before));
                }
                if verdict == Verdict::Store {
                    prop_assert!(valid && seq > before && seq == mark);
                    stored.push(seq);
                }
                if verdict == Verdict::Duplicate {
                    prop_assert!(seq <= before);
                }
            }
            prop_assert!(stored.windows(2).all(|w| w[0] < w[1]));
            prop_assert!(stored.iter().all(|s| *s > start));
        }
    }
}
