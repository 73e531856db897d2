//! Line-protocol writes: the device door for producers that cannot hold a
//! gRPC stream (Telegraf, Node-RED, gateways, curl). The HTTP door hands
//! over a request's text; this module turns it into readings per device
//! ([`parse`], plain code), then admits, registers and queues them like a
//! stream's batches and answers only after their commit ([`LineWrites`]).
//!
//! Mapping: a line `measurement,device=ID,... field=value ... ts` gives one
//! reading per numeric field, on the sensor `{measurement}_{field}` (just
//! `{field}` when the measurement is `readings`). Other tags are ignored.
//! Lines carry no seq: the writer numbers them after the device's mark. A
//! line may carry an integer `seq` field beside exactly one value field:
//! then the reading keeps it and is deduplicated as a stream's would be.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::auth::{AuthPolicy, FailureLimiter, Presented, token_hash};
use crate::config::DeviceAuthMode;
use crate::domain::{CheckedReading, DeviceId, DeviceKey, MAX_SEQ, Proof, Reading, now_ms};
use crate::ingest::{AckSlot, IngestBatch, IngestError, IngestQueue};
use crate::metrics::HubMetrics;
use crate::registry::SessionRegistry;
use crate::store::credentials::CredentialReads;
use crate::throttle::TokenBucket;

/// The sensor of fields of this measurement is the field's name alone.
pub const PLAIN_MEASUREMENT: &str = "readings";
/// The tag that names the device.
pub const DEVICE_TAG: &str = "device";
/// The field that carries a reading's seq.
pub const SEQ_FIELD: &str = "seq";

/// The unit of a request's timestamps (`precision=`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Precision {
    Nanos,
    Micros,
    Millis,
    Seconds,
    Minutes,
    Hours,
}

impl Precision {
    /// InfluxDB 1.x (`n`, `u`, `ms`, `s`, `m`, `h`) and 2.x (`ns`, `us`,
    /// `ms`, `s`) spellings; absent is nanoseconds.
    pub fn parse(raw: Option<&str>) -> Result<Self, String> {
        Ok(match raw.unwrap_or("ns") {
            "" | "n" | "ns" => Self::Nanos,
            "u" | "us" | "µ" | "µs" => Self::Micros,
            "ms" => Self::Millis,
            "s" => Self::Seconds,
            "m" => Self::Minutes,
            "h" => Self::Hours,
            other => {
                return Err(format!(
                    "unknown precision {other:?} (ns, us, ms, s, m or h)"
                ));
            }
        })
    }

    /// A timestamp in this unit as whole milliseconds (rounded down);
    /// None when out of range.
    fn to_ms(self, ts: i64) -> Option<i64> {
        match self {
            Self::Nanos => Some(ts.div_euclid(1_000_000)),
            Self::Micros => Some(ts.div_euclid(1_000)),
            Self::Millis => Some(ts),
            Self::Seconds => ts.checked_mul(1_000),
            Self::Minutes => ts.checked_mul(60_000),
            Self::Hours => ts.checked_mul(3_600_000),
        }
    }
}

/// Why a request was refused before anything was written.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("line {line}: {reason}")]
    Line { line: usize, reason: String },
    #[error("more than {0} lines in one write (http.write_max_lines)")]
    TooManyLines(usize),
    #[error("more than {0} readings (numeric fields) in one write (http.write_max_readings)")]
    TooManyReadings(usize),
    #[error("more than {MAX_DEVICES_PER_WRITE} devices in one write")]
    TooManyDevices,
}

/// Devices one write may name.
pub const MAX_DEVICES_PER_WRITE: usize = 1000;

/// One device's readings of a request, in the order of its lines.
#[derive(Debug, Clone, PartialEq)]
pub struct DeviceLines {
    pub device_id: DeviceId,
    /// The first line that names it (for errors about the device).
    pub first_line: usize,
    pub readings: Vec<Reading>,
    /// The lines carry `seq`; else every reading's seq is 0 (the writer
    /// numbers them).
    pub with_seq: bool,
}

/// What a request's lines may be.
#[derive(Debug, Clone, Copy)]
pub struct LineRules {
    pub precision: Precision,
    /// The hub's clock, for lines without a timestamp.
    pub now_ms: i64,
    /// The same window as a stream's readings: retention's cutoff and now
    /// plus the allowed clock skew.
    pub earliest_ms: i64,
    pub latest_ms: i64,
    pub max_lines: usize,
    pub max_readings: usize,
}

/// Parses a request's lines into readings per device, in the order the
/// devices first appear. Any bad line refuses the whole request (so a
/// retry is safe); the error names the first, by its line number.
pub fn parse(body: &str, rules: &LineRules) -> Result<Vec<DeviceLines>, ParseError> {
    let mut devices: Vec<DeviceLines> = Vec::new();
    let mut index: HashMap<String, usize> = HashMap::new();
    let (mut lines, mut readings) = (0usize, 0usize);
    for (n, text) in influxdb_line_protocol::split_lines(body).enumerate() {
        let line = n + 1;
        let bad = |reason: String| ParseError::Line { line, reason };
        let Some(parsed) = influxdb_line_protocol::parse_lines(text).next() else {
            continue; // blank, or a comment
        };
        lines += 1;
        if lines > rules.max_lines {
            return Err(ParseError::TooManyLines(rules.max_lines));
        }
        let parsed = parsed.map_err(|e| bad(e.to_string()))?;
        let measurement = parsed.series.measurement.as_str();
        let device = parsed
            .series
            .tag_set
            .iter()
            .flatten()
            .find(|(k, _)| k.as_str() == DEVICE_TAG)
            .map(|(_, v)| v.as_str())
            .ok_or_else(|| bad(format!("no {DEVICE_TAG:?} tag names the device")))?;
        let ts_ms = match parsed.timestamp {
            Some(ts) => rules
                .precision
                .to_ms(ts)
                .ok_or_else(|| bad("the timestamp is out of range".to_owned()))?,
            None => rules.now_ms,
        };
        let seq = parsed
            .field_set
            .iter()
            .find(|(k, _)| k.as_str() == SEQ_FIELD)
            .map(|(_, v)| line_seq(v).map_err(&bad))
            .transpose()?;
        let values = parsed.field_set.len() - usize::from(seq.is_some());
        if seq.is_some() && values != 1 {
            return Err(bad(format!(
                "a line with {SEQ_FIELD:?} carries exactly one value field (it has {values})"
            )));
        }
        let slot = match index.get(device) {
            Some(&slot) => slot,
            None => {
                if index.len() >= MAX_DEVICES_PER_WRITE {
                    return Err(ParseError::TooManyDevices);
                }
                let device_id = DeviceId::parse(device).map_err(|e| bad(format!("device: {e}")))?;
                devices.push(DeviceLines {
                    device_id,
                    first_line: line,
                    readings: Vec::new(),
                    with_seq: seq.is_some(),
                });
                index.insert(device.to_owned(), devices.len() - 1);
                devices.len() - 1
            }
        };
        let lines_of = &mut devices[slot];
        if lines_of.with_seq != seq.is_some() {
            return Err(bad(format!(
                "either every line of device {device:?} carries {SEQ_FIELD:?} or none does \
                 (line {} {})",
                lines_of.first_line,
                if lines_of.with_seq {
                    "does"
                } else {
                    "does not"
                }
            )));
        }
        if let (Some(seq), Some(last)) = (seq, lines_of.readings.last())
            && seq <= last.seq
        {
            return Err(bad(format!(
                "{SEQ_FIELD} {seq} does not follow {} of an earlier line of device {device:?}: \
                 within one write a device's seqs must increase",
                last.seq
            )));
        }
        readings += values;
        if readings > rules.max_readings {
            return Err(ParseError::TooManyReadings(rules.max_readings));
        }
        for (field, value) in parsed
            .field_set
            .iter()
            .filter(|(k, _)| k.as_str() != SEQ_FIELD)
        {
            let value = field_value(value)
                .map_err(|why| bad(format!("field {:?}: {why}", field.as_str())))?;
            let sensor = if measurement == PLAIN_MEASUREMENT {
                field.as_str().to_owned()
            } else {
                format!("{measurement}_{}", field.as_str())
            };
            let reading = Reading {
                seq: seq.unwrap_or(1),
                sensor,
                ts_ms,
                value,
            };
            reading
                .check(rules.earliest_ms, rules.latest_ms)
                .map_err(|why| bad(format!("sensor {:?}: {why}", reading.sensor)))?;
            lines_of.readings.push(Reading {
                seq: seq.unwrap_or(0),
                ..reading
            });
        }
    }
    Ok(devices)
}

/// A field as a reading's value: numbers, and booleans as 1 and 0.
fn field_value(value: &influxdb_line_protocol::FieldValue<'_>) -> Result<f64, String> {
    use influxdb_line_protocol::FieldValue;
    match value {
        FieldValue::F64(v) => Ok(*v),
        FieldValue::I64(v) => Ok(*v as f64),
        FieldValue::U64(v) => Ok(*v as f64),
        FieldValue::Boolean(b) => Ok(if *b { 1.0 } else { 0.0 }),
        FieldValue::String(_) => Err(
            "a string is not a reading (drop it before sending, e.g. Telegraf's fieldexclude)"
                .to_owned(),
        ),
    }
}

/// The `seq` field: an integer in 1..=2^63-1.
fn line_seq(value: &influxdb_line_protocol::FieldValue<'_>) -> Result<u64, String> {
    use influxdb_line_protocol::FieldValue;
    let seq = match value {
        FieldValue::I64(v) => u64::try_from(*v).ok(),
        FieldValue::U64(v) => Some(*v),
        FieldValue::F64(v) if v.fract() == 0.0 && *v >= 1.0 && *v <= MAX_SEQ as f64 => {
            Some(*v as u64)
        }
        _ => None,
    };
    seq.filter(|s| (1..=MAX_SEQ).contains(s))
        .ok_or_else(|| format!("{SEQ_FIELD:?} must be an integer from 1 to 2^63-1"))
}

/// Why a write was not (wholly) stored.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    /// Bad credentials for the device named on `line`.
    #[error("invalid device credentials for the device on line {line}")]
    Unauthenticated { line: usize },
    #[error("too many failed authentications from this address; try again in a minute")]
    TooManyFailures,
    /// Device auth is `tls`: this door has no client certificates.
    #[error(
        "devices authenticate with client certificates (auth.devices = tls); line-protocol writes need token or open device auth"
    )]
    CertificatesOnly,
    #[error("device {device}: {why}")]
    Conflict { device: String, why: String },
    #[error(
        "device {device} is over its rate of server.max_readings_per_sec; retry after {retry_after:?}"
    )]
    RateLimited {
        device: String,
        retry_after: Duration,
    },
    /// The write was not acknowledged: retry it (lines without `seq` that
    /// were stored after all are then stored twice: at least once).
    #[error("{0}; the write was not acknowledged, retry it")]
    Unavailable(String),
    /// Some readings were refused by the hub's sensor limits; the rest are
    /// stored (a retry would store them again unless the lines carry seq).
    #[error(
        "partial write: {refused} of {total} readings were refused (the device's or the hub's sensor limit, or, for lines without seq, the device's seqs are used up to 2^63-1); the others are stored"
    )]
    Partial { refused: u64, total: u64 },
}

/// What a stored write came to.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WriteDone {
    pub stored: u64,
    /// Readings whose seq the device had sent before (lines with `seq`).
    pub duplicates: u64,
}

/// What the door knows of a device between writes: a registration whose
/// epoch still holds is reused, so a write costs one commit.
struct Known {
    token: [u8; 32],
    device: DeviceKey,
    epoch: u64,
    rate: TokenBucket,
}

/// Settings of the line-protocol door.
#[derive(Debug, Clone, Copy)]
pub struct WriteSettings {
    pub max_clock_skew: Duration,
    pub retention: Option<Duration>,
    pub max_readings_per_sec: u32,
    /// How long a write waits for its commit before answering 503.
    pub commit_timeout: Duration,
    /// Devices whose registrations are kept (a full map starts over).
    pub cached_devices: usize,
}

/// The core of line-protocol writes, shared by its HTTP routes.
pub struct LineWrites {
    ingest: IngestQueue,
    credentials: CredentialReads,
    auth: Arc<AuthPolicy>,
    registry: Arc<SessionRegistry>,
    metrics: Arc<HubMetrics>,
    failures: FailureLimiter,
    settings: WriteSettings,
    known: Mutex<HashMap<String, Known>>,
}

/// A device's batch on its way: what to wait for.
struct Pending {
    device_id: DeviceId,
    first_line: usize,
    readings: u64,
    with_seq: bool,
    slot: Arc<AckSlot>,
}

/// What [`LineWrites::admit`] checks of one device's lines.
#[derive(Clone, Copy)]
struct Admit<'a> {
    device_id: &'a DeviceId,
    first_line: usize,
    /// Readings to spend of the device's rate.
    readings: usize,
}

impl<'a> From<&'a DeviceLines> for Admit<'a> {
    fn from(lines: &'a DeviceLines) -> Self {
        Self {
            device_id: &lines.device_id,
            first_line: lines.first_line,
            readings: lines.readings.len(),
        }
    }
}

impl LineWrites {
    pub fn new(
        ingest: IngestQueue,
        credentials: CredentialReads,
        auth: Arc<AuthPolicy>,
        registry: Arc<SessionRegistry>,
        metrics: Arc<HubMetrics>,
        failures: FailureLimiter,
        settings: WriteSettings,
    ) -> Self {
        Self {
            ingest,
            credentials,
            auth,
            registry,
            metrics,
            failures,
            settings,
            known: Mutex::new(HashMap::new()),
        }
    }

    /// The rules a request's lines are parsed by, now.
    pub fn rules(&self, precision: Precision, max_lines: usize, max_readings: usize) -> LineRules {
        let now = now_ms();
        LineRules {
            precision,
            now_ms: now,
            earliest_ms: self
                .settings
                .retention
                .map_or(i64::MIN, |r| now.saturating_sub(r.as_millis() as i64)),
            latest_ms: now.saturating_add(self.settings.max_clock_skew.as_millis() as i64),
            max_lines,
            max_readings,
        }
    }

    /// Stores a request's readings, device by device, and answers once
    /// every one is committed. `token` is what the request presented.
    pub async fn write(
        &self,
        devices: Vec<DeviceLines>,
        token: Option<&str>,
        peer: Option<IpAddr>,
    ) -> Result<WriteDone, WriteError> {
        if self.auth.devices == DeviceAuthMode::Tls {
            return Err(WriteError::CertificatesOnly);
        }
        let token = token.unwrap_or_default();
        // Every device is admitted and within its rate before anything is
        // queued: a refusal stores nothing.
        let mut admitted = Vec::with_capacity(devices.len());
        for lines in &devices {
            admitted.push(self.admit(lines.into(), token, peer).await?);
        }
        let mut done = WriteDone::default();
        let mut refused = 0u64;
        let total: u64 = devices.iter().map(|d| d.readings.len() as u64).sum();
        let mut pending = Vec::with_capacity(devices.len());
        // The readings move into the batches (no copy is kept).
        for (lines, (device, epoch)) in devices.into_iter().zip(admitted) {
            pending.push(self.queue(lines, device, epoch).await?);
        }
        for p in pending {
            let outcome = match self.settled(&p.slot).await? {
                Some(outcome) => outcome,
                None => {
                    // Claimed meanwhile (a credential change, or another
                    // registration of the device): nothing of it was
                    // written, and its readings came back. Once more,
                    // afresh (the credentials may now be refused).
                    self.forget(&p.device_id);
                    let again = Admit {
                        device_id: &p.device_id,
                        first_line: p.first_line,
                        readings: 0,
                    };
                    let (device, epoch) = self.admit(again, token, peer).await?;
                    let readings = p.slot.take_returned();
                    let lines = DeviceLines {
                        device_id: p.device_id.clone(),
                        first_line: p.first_line,
                        readings: readings
                            .into_iter()
                            .filter_map(|r| match r {
                                CheckedReading::Valid(r) => Some(r),
                                CheckedReading::Rejected { .. } => None,
                            })
                            .collect(),
                        with_seq: p.with_seq,
                    };
                    let again = self.queue(lines, device, epoch).await?;
                    self.settled(&again.slot)
                        .await?
                        .ok_or(WriteError::Conflict {
                            device: p.device_id.to_string(),
                            why: "the device was claimed by another connection while writing"
                                .to_owned(),
                        })?
                }
            };
            refused += u64::from(outcome.rejected);
            done.duplicates += u64::from(outcome.duplicates);
            done.stored += p
                .readings
                .saturating_sub(u64::from(outcome.rejected))
                .saturating_sub(u64::from(outcome.duplicates));
        }
        if refused > 0 {
            return Err(WriteError::Partial { refused, total });
        }
        Ok(done)
    }

    /// The device's registration for this write: its credentials checked
    /// (again only when the token differs from the last write's), no stream
    /// of it open here, and its rate not exceeded.
    async fn admit(
        &self,
        lines: Admit<'_>,
        token: &str,
        peer: Option<IpAddr>,
    ) -> Result<(DeviceKey, u64), WriteError> {
        let id = lines.device_id.as_str();
        if self.registry.is_live(lines.device_id) {
            return Err(WriteError::Conflict {
                device: id.to_owned(),
                why:
                    "it holds a gRPC stream to this hub; a device writes through one door at a time"
                        .to_owned(),
            });
        }
        let presented = token_hash(token);
        let n = lines.readings;
        {
            let mut known = self.lock();
            if let Some(k) = known.get_mut(id).filter(|k| k.token == presented) {
                let registration = (k.device, k.epoch);
                spend(&mut k.rate, n, id)?;
                return Ok(registration);
            }
        }
        let stored = self
            .credentials
            .get(id, None)
            .await
            .map_err(|e| WriteError::Unavailable(e.to_string()))?;
        let proof = self.auth.admit(
            Presented {
                device_id: id,
                token,
                certificate: None,
            },
            stored,
        );
        let proof = match proof {
            Ok(proof) => proof,
            Err(why) => {
                tracing::debug!(device_id = id, reason = %why, "line-protocol write refused");
                return Err(self.refuse(lines.first_line, peer));
            }
        };
        self.register(lines, presented, proof, peer).await
    }

    async fn register(
        &self,
        lines: Admit<'_>,
        presented: [u8; 32],
        proof: Proof,
        peer: Option<IpAddr>,
    ) -> Result<(DeviceKey, u64), WriteError> {
        let id = lines.device_id.as_str();
        let registered = match self
            .ingest
            .register_writes(lines.device_id.clone(), proof)
            .await
        {
            Ok(r) => r,
            Err(IngestError::Refused) => return Err(self.refuse(lines.first_line, peer)),
            Err(IngestError::StreamingElsewhere(hub)) => {
                return Err(WriteError::Conflict {
                    device: id.to_owned(),
                    why: format!(
                        "it holds a gRPC stream to hub {hub}; a device writes through one door at a time"
                    ),
                });
            }
            Err(e) => return Err(WriteError::Unavailable(e.to_string())),
        };
        let mut known = self.lock();
        if known.len() >= self.settings.cached_devices && !known.contains_key(id) {
            known.clear();
        }
        let rate = self.settings.max_readings_per_sec;
        let k = known.entry(id.to_owned()).or_insert_with(|| Known {
            token: presented,
            device: registered.device,
            epoch: registered.epoch,
            rate: TokenBucket::new(rate, rate),
        });
        k.token = presented;
        k.device = registered.device;
        k.epoch = registered.epoch;
        spend(&mut k.rate, lines.readings, id)?;
        Ok((registered.device, registered.epoch))
    }

    fn refuse(&self, line: usize, peer: Option<IpAddr>) -> WriteError {
        HubMetrics::add(&self.metrics.auth_failures, 1);
        if !self.failures.allowed(peer) {
            return WriteError::TooManyFailures;
        }
        self.failures.failed(peer);
        WriteError::Unauthenticated { line }
    }

    async fn queue(
        &self,
        lines: DeviceLines,
        device: DeviceKey,
        epoch: u64,
    ) -> Result<Pending, WriteError> {
        let slot = AckSlot::new();
        let readings = lines.readings.len() as u64;
        let batch = IngestBatch {
            received: std::time::Instant::now(),
            device,
            device_id: Arc::from(lines.device_id.as_str()),
            readings: lines
                .readings
                .into_iter()
                .map(CheckedReading::Valid)
                .collect(),
            ack: Arc::clone(&slot),
            epoch,
            assign_seqs: !lines.with_seq,
        };
        self.ingest
            .push(batch)
            .await
            .map_err(|e| WriteError::Unavailable(e.to_string()))?;
        Ok(Pending {
            device_id: lines.device_id,
            first_line: lines.first_line,
            readings,
            with_seq: lines.with_seq,
            slot,
        })
    }

    /// Waits for a batch's commit: its ack, or None when it was fenced (the
    /// device's epoch moved on before it was written).
    async fn settled(
        &self,
        slot: &AckSlot,
    ) -> Result<Option<crate::ingest::PendingAck>, WriteError> {
        let deadline = Instant::now() + self.settings.commit_timeout;
        loop {
            if slot.fenced() {
                return Ok(None);
            }
            if slot.failed() {
                return Err(WriteError::Unavailable("storage failed".to_owned()));
            }
            if slot.batches_done() > 0 {
                return Ok(slot.take());
            }
            if tokio::time::timeout_at(deadline.into(), slot.changed())
                .await
                .is_err()
            {
                return Err(WriteError::Unavailable(
                    "the write was not committed in time".to_owned(),
                ));
            }
        }
    }

    fn forget(&self, device: &DeviceId) {
        self.lock().remove(device.as_str());
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Known>> {
        // Plain data: a panic elsewhere cannot leave it torn.
        self.known.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Spends a device's rate for `n` readings: refused (nothing spent) unless
/// the bucket holds them, or is full (a write larger than a second's worth
/// is let through once, and the device then waits its debt off).
fn spend(rate: &mut TokenBucket, n: usize, device: &str) -> Result<(), WriteError> {
    rate.try_spend_n(n)
        .map_err(|retry_after| WriteError::RateLimited {
            device: device.to_owned(),
            retry_after,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules() -> LineRules {
        LineRules {
            precision: Precision::Nanos,
            now_ms: 1_700_000_000_000,
            earliest_ms: i64::MIN,
            latest_ms: 1_700_000_300_000,
            max_lines: 100,
            max_readings: 1000,
        }
    }

    fn line_error(body: &str) -> (usize, String) {
        match parse(body, &rules()) {
            Err(ParseError::Line { line, reason }) => (line, reason),
            other => panic!("expected a line error, got {other:?}"),
        }
    }

    #[test]
    fn lines_map_to_sensors_per_device_in_order() {
        let body = "\
# a comment
env,device=d1,host=gw temp=21.5,hum=40i 1700000000000000000

readings,device=d2 level=true,raw=7u 1700000000001000000
env,device=d1 temp=21.75 1700000000002000000
";
        let devices = parse(body, &rules()).unwrap();
        assert_eq!(devices.len(), 2);
        let d1 = &devices[0];
        assert_eq!(d1.device_id.as_str(), "d1");
        assert_eq!(d1.first_line, 2);
        assert!(!d1.with_seq);
        let got: Vec<(&str, i64, f64, u64)> = d1
            .readings
            .iter()
            .map(|r| (r.sensor.as_str(), r.ts_ms, r.value, r.seq))
            .collect();
        assert_eq!(
            got,
            vec![
                ("env_temp", 1_700_000_000_000, 21.5, 0),
                ("env_hum", 1_700_000_000_000, 40.0, 0),
                ("env_temp", 1_700_000_000_002, 21.75, 0),
            ]
        );
        let d2: Vec<(&str, f64)> = devices[1]
            .readings
            .iter()
            .map(|r| (r.sensor.as_str(), r.value))
            .collect();
        assert_eq!(d2, vec![("level", 1.0), ("raw", 7.0)]);
    }

    #[test]
    fn precision_and_missing_timestamps() {
        for (p, ts, ms) in [
            (Precision::Seconds, 1_700_000_000_i64, 1_700_000_000_000_i64),
            (Precision::Millis, 1_700_000_000_123, 1_700_000_000_123),
            (Precision::Micros, 1_700_000_000_123_999, 1_700_000_000_123),
            (Precision::Minutes, 28_333_333, 1_699_999_980_000),
        ] {
            let r = LineRules {
                precision: p,
                ..rules()
            };
            let got = parse(&format!("m,device=d v=1 {ts}"), &r).unwrap();
            assert_eq!(got[0].readings[0].ts_ms, ms, "{p:?}");
        }
        let got = parse("m,device=d v=1", &rules()).unwrap();
        assert_eq!(got[0].readings[0].ts_ms, rules().now_ms);
        assert_eq!(Precision::parse(Some("u")), Ok(Precision::Micros));
        assert!(Precision::parse(Some("d")).is_err());
    }

    #[test]
    fn seq_lines_keep_their_seq() {
        let got = parse("m,device=d v=1,seq=7i 1\nm,device=d v=2,seq=8u 2", &rules());
        let r = LineRules {
            precision: Precision::Seconds,
            ..rules()
        };
        assert!(got.is_err(), "1 ns is before 2000: refused");
        let got = parse(
            "m,device=d v=1,seq=7i 1700000000\nm,device=d v=2,seq=8u 1700000001",
            &r,
        )
        .unwrap();
        assert!(got[0].with_seq);
        let seqs: Vec<u64> = got[0].readings.iter().map(|r| r.seq).collect();
        assert_eq!(seqs, vec![7, 8]);
    }

    #[test]
    fn bad_lines_name_their_line_and_reason() {
        let cases = [
            ("m,device=d v=1\nm v=1", 2, "no \"device\" tag"),
            ("m,device=d v=\"on\"", 1, "a string is not a reading"),
            ("m,device=d v=1\n\nm,device=d v=", 3, ""),
            ("m,device=bad/id v=1", 1, "device:"),
            ("m,device=d a=1,b=2,seq=3i", 1, "exactly one value field"),
            ("m,device=d a=1,seq=-3i", 1, "from 1 to 2^63-1"),
            (
                "m,device=d a=1,seq=3i\nm,device=d a=2",
                2,
                "either every line",
            ),
            ("m,device=d v=1 9999999999999999999", 1, ""),
            ("m,device=d v=1 1800000000000000000", 1, "future"),
        ];
        for (body, line, why) in cases {
            let (got_line, reason) = line_error(body);
            assert_eq!(got_line, line, "{body:?}: {reason}");
            assert!(reason.contains(why), "{body:?}: {reason}");
        }
        let many = "m,device=d v=1\n".repeat(101);
        assert_eq!(parse(&many, &rules()), Err(ParseError::TooManyLines(100)));
        let wide = format!(
            "m,device=d {}\n",
            (0..11)
                .map(|i| format!("f{i}=1"))
                .collect::<Vec<_>>()
                .join(",")
        );
        assert_eq!(
            parse(&wide.repeat(91), &rules()),
            Err(ParseError::TooManyReadings(1000))
        );
        let (line, reason) = line_error("m,device=d v=1,seq=5i\nm,device=d v=2,seq=5i");
        assert_eq!(line, 2);
        assert!(reason.contains("must increase"), "{reason}");
    }
}
