//! One simulated device: Hello, Welcome, sample, batch, resend what is
//! unacked after a reconnect, and end with a clean half-close.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use telemetry_proto::v1::{
    self as pb, device_gateway_client::DeviceGatewayClient, device_message::Msg as DeviceMsg,
    hub_message::Msg as HubMsg,
};
use tokio::sync::mpsc;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;
use tonic::{Status, Streaming};

use crate::commands::{CommandRunner, Effect};
use crate::signal::SignalGen;
use crate::stats::FleetStats;
use crate::twin::SimTwin;

/// How one device behaves.
#[derive(Clone)]
pub struct DeviceConfig {
    pub device_id: String,
    /// Sent as Hello.token.
    pub token: String,
    /// Index used to derive the device's own signal from the seed.
    pub index: u64,
    pub seed: u64,
    /// Readings per second, all sensors together.
    pub rate_hz: f64,
    pub sensors: Vec<String>,
    pub batch_max: usize,
    pub batch_interval: Duration,
    /// Unacked readings kept; when full the device stops sampling.
    pub buffer: usize,
    pub drain_timeout: Duration,
    pub firmware: String,
    pub full_precision: bool,
    /// Readings stamped over this much of the past go first.
    pub backfill: Option<Duration>,
    /// Keep a twin (Hello.twin).
    pub twin: bool,
    /// How long applying a desired change takes.
    pub twin_apply_delay: Duration,
}

/// Written by hand so the token never prints.
impl std::fmt::Debug for DeviceConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceConfig")
            .field("device_id", &self.device_id)
            .field("token", &"********")
            .field("rate_hz", &self.rate_hz)
            .field("sensors", &self.sensors)
            .finish_non_exhaustive()
    }
}

/// How a device's run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceEnd {
    /// Half-closed, every reading acked, and the hub closed with OK.
    Clean,
    /// Stopped with readings unacked or without the hub's OK.
    Unclean,
}

/// Why one stream ended.
enum StreamEnd {
    /// The hub closed with OK after our half-close.
    Closed,
    /// Stop was requested and the drain ran out of time.
    DrainTimedOut,
    /// A reboot command: come back after this long.
    Reboot(Duration),
    /// The stream broke; reconnect.
    Broken(Status),
}

pub struct SimDevice {
    cfg: DeviceConfig,
    signal: SignalGen,
    /// Sampled and not yet acked, in seq order.
    unacked: VecDeque<Sample>,
    /// How many of `unacked` have been sent on the current stream.
    sent_on_stream: usize,
    next_seq: u64,
    /// Highest seq ever sent (to count first sends apart from resends).
    highest_sent: u64,
    /// acked_seq of the last Welcome: the hub may ack up to it too.
    welcome_acked: u64,
    /// Highest seq the hub has acknowledged (Welcome or Ack).
    acked_through: u64,
    /// (last seq of a batch, when it was sent) for ack latency.
    in_flight: VecDeque<(u64, Instant)>,
    sensor_cursor: usize,
    /// The fraction of a reading owed, in [0, 1). It starts at the
    /// device's own phase: a real fleet's devices sample on clocks of
    /// their own, not in step with when they connected (a fleet started
    /// at once would otherwise send in waves: at 100k devices × 0.1 Hz,
    /// from under 1k to 25k readings a second, every 10 s).
    carry: f64,
    /// While backfilling: the ts (ms, fractional) of the next past reading.
    backfill_ms: Option<f64>,
    /// The last stream got as far as Welcome (resets the backoff).
    welcomed: bool,
    commands: CommandRunner,
    /// Set by a reboot command: end the stream after the replies.
    reboot: Option<Duration>,
    /// The sensors sampled, as indexes into `cfg.sensors` (the twin can
    /// switch some off).
    active: Vec<usize>,
    twin: Option<SimTwin>,
    stats: Arc<FleetStats>,
}

impl SimDevice {
    pub fn new(cfg: DeviceConfig, stats: Arc<FleetStats>) -> Self {
        let signal = SignalGen::new(cfg.seed, cfg.index, cfg.full_precision);
        let phase = StdRng::seed_from_u64(cfg.seed ^ cfg.index.wrapping_mul(0xD1B5_4A32_D192_ED03))
            .random::<f64>();
        let backfill_ms = cfg
            .backfill
            .map(|past| (now_ms() - past.as_millis() as i64) as f64);
        let twin = cfg
            .twin
            .then(|| SimTwin::new(&cfg.firmware, cfg.twin_apply_delay));
        Self {
            backfill_ms,
            active: (0..cfg.sensors.len()).collect(),
            twin,
            cfg,
            signal,
            unacked: VecDeque::new(),
            sent_on_stream: 0,
            next_seq: 1,
            highest_sent: 0,
            welcome_acked: 0,
            acked_through: 0,
            in_flight: VecDeque::new(),
            sensor_cursor: 0,
            // A slow device's first reading comes (1 - phase) of its
            // period after it starts, not a whole period.
            carry: phase,
            welcomed: false,
            commands: CommandRunner::default(),
            reboot: None,
            stats,
        }
    }

    /// Runs until `stop`, reconnecting with backoff, then drains and closes.
    /// With several hubs it starts at one picked by its index (a fleet
    /// spreads over them) and, when a stream breaks, tries the next one.
    pub async fn run(mut self, hubs: Vec<Channel>, stop: CancellationToken) -> DeviceEnd {
        assert!(!hubs.is_empty(), "at least one hub");
        let mut at = self.cfg.index as usize % hubs.len();
        let mut backoff = Backoff::new(
            Duration::from_millis(100),
            Duration::from_secs(5),
            self.cfg.seed ^ self.cfg.index,
        );
        let mut drain_deadline: Option<Instant> = None;
        loop {
            // Stopped while between streams (the hub away, or refusing us):
            // the drain is bounded all the same.
            if stop.is_cancelled() && drain_deadline.is_none() {
                drain_deadline = Some(Instant::now() + self.cfg.drain_timeout);
            }
            let end = self
                .stream_once(&hubs[at], &stop, &mut drain_deadline)
                .await;
            match end {
                StreamEnd::Closed if self.unacked.is_empty() => return DeviceEnd::Clean,
                StreamEnd::Closed | StreamEnd::DrainTimedOut => return DeviceEnd::Unclean,
                StreamEnd::Reboot(delay) => {
                    tracing::debug!(device = %self.cfg.device_id, ?delay, "rebooting");
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = stop.cancelled(), if drain_deadline.is_none() => {}
                    }
                }
                StreamEnd::Broken(status) => {
                    tracing::debug!(device = %self.cfg.device_id, code = ?status.code(), msg = status.message(), "stream broke");
                    if let Some(why) = crate::tls::failure(&status) {
                        self.tls_failed(&why);
                    }
                    if drain_deadline.is_some_and(|d| Instant::now() >= d) {
                        return DeviceEnd::Unclean;
                    }
                    FleetStats::inc(&self.stats.reconnects, 1);
                    if std::mem::take(&mut self.welcomed) {
                        backoff.reset();
                    }
                    // The next attempt goes to the next hub, if there are more.
                    at = (at + 1) % hubs.len();
                    let wait = backoff.next();
                    let wake = match drain_deadline {
                        Some(d) => (Instant::now() + wait).min(d),
                        None => Instant::now() + wait,
                    };
                    tokio::select! {
                        _ = tokio::time::sleep_until(wake) => {}
                        _ = stop.cancelled(), if drain_deadline.is_none() => {}
                    }
                }
            }
        }
    }

    /// A TLS handshake failed: the fleet cannot work until someone fixes a
    /// certificate, so it is an ERROR that says what to do (the first, then
    /// one in a thousand: a fleet fails as one).
    fn tls_failed(&self, why: &str) {
        let n = self
            .stats
            .tls_failures
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if n.is_multiple_of(1000) {
            tracing::error!(device = %self.cfg.device_id, failures = n + 1, error = why,
                "TLS with the hub failed: {}", crate::tls::ADVICE);
        }
    }

    async fn stream_once(
        &mut self,
        channel: &Channel,
        stop: &CancellationToken,
        drain_deadline: &mut Option<Instant>,
    ) -> StreamEnd {
        let (tx, rx) = mpsc::channel::<pb::DeviceMessage>(16);
        let hello = pb::DeviceMessage {
            msg: Some(DeviceMsg::Hello(pb::Hello {
                device_id: self.cfg.device_id.clone(),
                token: self.cfg.token.clone(),
                firmware: self.cfg.firmware.clone(),
                labels: [("sim".to_owned(), "true".to_owned())]
                    .into_iter()
                    .collect(),
                twin: self.twin.is_some(),
                desired_version: self.twin.as_ref().map_or(0, SimTwin::applied_version),
            })),
        };
        if tx.send(hello).await.is_err() {
            return StreamEnd::Broken(Status::internal("local channel closed"));
        }
        let mut client = DeviceGatewayClient::new(channel.clone());
        let mut inbound = match client.connect(ReceiverStream::new(rx)).await {
            Ok(response) => response.into_inner(),
            Err(status) => return StreamEnd::Broken(status),
        };
        let welcome = match tokio::time::timeout(Duration::from_secs(30), inbound.message()).await {
            Ok(Ok(Some(pb::HubMessage {
                msg: Some(HubMsg::Welcome(w)),
            }))) => w,
            Ok(Ok(_)) => return StreamEnd::Broken(Status::internal("expected Welcome")),
            Ok(Err(status)) => return StreamEnd::Broken(status),
            Err(_) => return StreamEnd::Broken(Status::deadline_exceeded("no Welcome")),
        };
        self.on_welcome(&welcome);
        if let Some(twin) = &mut self.twin {
            twin.on_welcome(&welcome);
        }
        self.welcomed = true;
        let max_batch = welcome.max_batch.max(1) as usize;
        FleetStats::inc(&self.stats.online, 1);
        let end = self
            .pump(&tx, &mut inbound, stop, drain_deadline, max_batch)
            .await;
        self.stats
            .online
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        match end {
            Ok(()) => {}
            Err(StreamEnd::Reboot(delay)) => {
                // A polite reboot: half-close so the hub reads our last
                // replies, and wait (briefly) for its OK.
                drop(tx);
                let _ = tokio::time::timeout(Duration::from_secs(2), async {
                    while let Ok(Some(msg)) = inbound.message().await {
                        if self.on_message(msg).is_err() {
                            break;
                        }
                    }
                })
                .await;
                self.reboot = None;
                return StreamEnd::Reboot(delay);
            }
            Err(end) => return end,
        }
        // Half-close: end our send side and read until the hub's status.
        drop(tx);
        let deadline = drain_deadline.unwrap_or_else(Instant::now) + Duration::from_secs(5);
        loop {
            match tokio::time::timeout_at(deadline, inbound.message()).await {
                // Our send side is closed: a command arriving now cannot be
                // answered; the hub redelivers it on the next stream.
                Ok(Ok(Some(msg))) => {
                    if let Err(status) = self.on_message(msg) {
                        return StreamEnd::Broken(status);
                    }
                    self.reboot = None;
                }
                Ok(Ok(None)) => return StreamEnd::Closed,
                Ok(Err(status)) => return StreamEnd::Broken(status),
                Err(_) => return StreamEnd::DrainTimedOut,
            }
        }
    }

    /// Samples, sends and reads acks until stop has been asked and every
    /// reading is acked (Ok), or the stream breaks (Err).
    async fn pump(
        &mut self,
        tx: &mpsc::Sender<pb::DeviceMessage>,
        inbound: &mut Streaming<pb::HubMessage>,
        stop: &CancellationToken,
        drain_deadline: &mut Option<Instant>,
        max_batch: usize,
    ) -> Result<(), StreamEnd> {
        let mut period = self.tick_period();
        let mut tick = self.ticks(period);
        let mut last_sample = Instant::now();
        // Resend what the hub has not acked, right away.
        self.send_unsent(tx, max_batch).await?;
        self.send_reported(tx).await?;
        // Made once, not per turn of the loop: a turn then makes no timer
        // entry and does not lock the fleet's one stop token (10k devices
        // wake 50k times a second).
        let stopped = stop.cancelled();
        let far = Instant::now() + Duration::from_secs(365 * 24 * 3600);
        let twin_timer = tokio::time::sleep_until(far);
        let drain_timer = tokio::time::sleep_until(drain_deadline.unwrap_or(far));
        tokio::pin!(stopped, twin_timer, drain_timer);
        let mut twin_timer_at = None;
        loop {
            // A command or the twin can change the rate, and a backfill's
            // end the period: the ticks follow.
            let rate = self.cfg.rate_hz;
            let now_period = self.tick_period();
            if now_period != period {
                period = now_period;
                tick = self.ticks(period);
            }
            let reports_pending = self.twin.as_ref().is_some_and(|t| t.pending() > 0);
            if drain_deadline.is_some() && self.unacked.is_empty() && !reports_pending {
                return Ok(());
            }
            let twin_wake = self.twin.as_ref().and_then(SimTwin::next_wake);
            if let Some(at) = twin_wake
                && twin_timer_at != Some(at)
            {
                twin_timer.as_mut().reset(at);
                twin_timer_at = Some(at);
            }
            tokio::select! {
                _ = &mut twin_timer, if twin_wake.is_some() && drain_deadline.is_none() => {
                    twin_timer_at = None;
                    self.twin_wake();
                    if self.rate_changed_from(rate, &mut last_sample) {
                        self.send_unsent(tx, max_batch).await?;
                    }
                    self.send_reported(tx).await?;
                }
                _ = tick.tick(), if drain_deadline.is_none() => {
                    let now = Instant::now();
                    self.sample(now.duration_since(last_sample));
                    last_sample = now;
                    self.send_unsent(tx, max_batch).await?;
                }
                msg = inbound.message() => match msg {
                    Ok(Some(msg)) => {
                        let replies = self.on_message(msg).map_err(StreamEnd::Broken)?;
                        // Draining: nothing more is sampled.
                        if drain_deadline.is_none() && self.rate_changed_from(rate, &mut last_sample) {
                            self.send_unsent(tx, max_batch).await?;
                        }
                        for reply in replies {
                            let reply = pb::DeviceMessage { msg: Some(DeviceMsg::CommandReply(reply)) };
                            tx.send(reply).await.map_err(|_| StreamEnd::Broken(Status::unavailable("send side closed")))?;
                        }
                        self.send_reported(tx).await?;
                        if let Some(delay) = self.reboot.take() {
                            return Err(StreamEnd::Reboot(delay));
                        }
                    }
                    Ok(None) => return Err(StreamEnd::Broken(Status::unavailable("hub closed the stream"))),
                    Err(status) => return Err(StreamEnd::Broken(status)),
                },
                _ = &mut stopped, if drain_deadline.is_none() => {
                    let deadline = Instant::now() + self.cfg.drain_timeout;
                    *drain_deadline = Some(deadline);
                    drain_timer.as_mut().reset(deadline);
                    self.send_unsent(tx, max_batch).await?;
                }
                _ = &mut drain_timer, if drain_deadline.is_some() => {
                    return Ok(());
                }
            }
        }
    }

    fn on_welcome(&mut self, welcome: &pb::Welcome) {
        let acked = welcome.acked_seq;
        if acked < self.acked_through {
            // The hub once acknowledged seqs it no longer has.
            FleetStats::inc(&self.stats.lost_acks, self.acked_through - acked);
            tracing::error!(device = %self.cfg.device_id, acked, acked_before = self.acked_through,
                "the hub lost readings it had acknowledged");
        }
        if acked > self.highest_sent {
            // The hub has seqs this device never sent (an earlier life of
            // the same id): what is sampled but unsent moves past them.
            let mut seq = acked;
            for r in self
                .unacked
                .iter_mut()
                .filter(|r| r.seq > self.highest_sent)
            {
                seq += 1;
                r.seq = seq;
            }
            self.next_seq = seq + 1;
        }
        self.welcome_acked = acked;
        self.release(acked);
        self.next_seq = self.next_seq.max(acked + 1);
        self.sent_on_stream = 0;
        self.in_flight.clear();
    }

    /// Handles a hub message; returns the command replies to send, or why
    /// the stream cannot be trusted (an ack beyond anything sent).
    fn on_message(&mut self, msg: pb::HubMessage) -> Result<Vec<pb::CommandReply>, Status> {
        match msg.msg {
            Some(HubMsg::Ack(ack)) => {
                let bound = self.highest_sent.max(self.welcome_acked);
                if ack.acked_seq > bound {
                    FleetStats::inc(&self.stats.bad_acks, 1);
                    return Err(Status::internal(format!(
                        "the hub acked seq {} beyond the highest seq sent ({bound})",
                        ack.acked_seq
                    )));
                }
                FleetStats::inc(&self.stats.duplicates, u64::from(ack.duplicates));
                FleetStats::inc(&self.stats.rejected, u64::from(ack.rejected));
                let now = Instant::now();
                while let Some(&(last, sent_at)) = self.in_flight.front() {
                    if last > ack.acked_seq {
                        break;
                    }
                    self.in_flight.pop_front();
                    self.stats
                        .record_ack_latency(sent_at.into_std(), now.duration_since(sent_at));
                }
                self.release(ack.acked_seq);
                Ok(Vec::new())
            }
            Some(HubMsg::Command(cmd)) => {
                FleetStats::inc(&self.stats.commands_received, 1);
                let outcome = self.commands.handle(&cmd, now_ms());
                if outcome.executed {
                    FleetStats::inc(&self.stats.commands_executed, 1);
                }
                match outcome.effect {
                    Some(Effect::SetRate(hz)) => self.cfg.rate_hz = hz,
                    Some(Effect::SetBatch(max)) => self.cfg.batch_max = max,
                    Some(Effect::Reboot(delay)) => self.reboot = Some(delay),
                    None => {}
                }
                Ok(outcome.replies)
            }
            Some(HubMsg::Desired(desired)) => {
                if let Some(twin) = &mut self.twin {
                    twin.on_desired(&desired, Instant::now());
                    // Applied at once when the device has no delay.
                    self.twin_wake();
                }
                Ok(Vec::new())
            }
            Some(HubMsg::ReportedAck(ack)) => {
                if let Some(twin) = &mut self.twin {
                    let released = twin.on_ack(&ack);
                    FleetStats::inc(&self.stats.reports_acked, released as u64);
                }
                Ok(Vec::new())
            }
            Some(HubMsg::Welcome(_)) | None => Ok(Vec::new()),
        }
    }

    /// Lets the twin do what is due, and takes on its effects.
    fn twin_wake(&mut self) {
        let Some(twin) = &mut self.twin else { return };
        let before = twin.applied_version();
        let effects = twin.wake(Instant::now());
        if twin.applied_version() != before {
            FleetStats::inc(&self.stats.twin_applied, 1);
        }
        if let Some(hz) = effects.rate_hz {
            self.cfg.rate_hz = hz;
        }
        if let Some(disabled) = effects.disabled {
            self.active = (0..self.cfg.sensors.len())
                .filter(|&i| !disabled.contains(&self.cfg.sensors[i]))
                .collect();
        }
    }

    /// Sends the reported patches not yet sent on this stream.
    async fn send_reported(
        &mut self,
        tx: &mpsc::Sender<pb::DeviceMessage>,
    ) -> Result<(), StreamEnd> {
        let Some(twin) = &mut self.twin else {
            return Ok(());
        };
        for patch in twin.unsent() {
            let msg = pb::DeviceMessage {
                msg: Some(DeviceMsg::Reported(patch)),
            };
            tx.send(msg)
                .await
                .map_err(|_| StreamEnd::Broken(Status::unavailable("send side closed")))?;
        }
        Ok(())
    }

    /// Forgets every reading up to `acked_seq`.
    fn release(&mut self, acked_seq: u64) {
        self.acked_through = self.acked_through.max(acked_seq);
        let mut released = 0;
        while self.unacked.front().is_some_and(|r| r.seq <= acked_seq) {
            self.unacked.pop_front();
            released += 1;
        }
        self.sent_on_stream = self.sent_on_stream.saturating_sub(released);
        FleetStats::inc(&self.stats.acked, released as u64);
    }

    /// How often the device wakes to sample and send: every batch
    /// interval, or, for a device sampling less often than that, once per
    /// reading. Its messages are the same either way (a batch interval
    /// without a new reading sends nothing); a fleet of slow devices just
    /// wakes less: at 0.1 Hz once in 10 s, not ten times (100k devices
    /// woke 100k times a second for 10k readings). A device that does not
    /// sample wakes hourly; a new rate resets the ticks (see `pump`).
    fn tick_period(&self) -> Duration {
        if self.backfill_ms.is_some() {
            return self.cfg.batch_interval;
        }
        if self.cfg.rate_hz <= 0.0 {
            return Duration::from_secs(3600);
        }
        let per_reading = Duration::from_secs_f64((1.0 / self.cfg.rate_hz).min(3600.0));
        self.cfg.batch_interval.max(per_reading)
    }

    /// Ticks every `period` from now, the first when the next reading is
    /// due: (1 - carry) of a reading period in. A new device's carry is its
    /// phase; after a reconnect or a rate change it is whatever the last
    /// sampling left (a first tick at the phase instead would come before
    /// the reading is due, and every reading after it a period late).
    fn ticks(&self, period: Duration) -> tokio::time::Interval {
        let first = Instant::now() + period.mul_f64((1.0 - self.carry).clamp(0.0, 1.0));
        let mut tick = tokio::time::interval_at(first, period);
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        tick
    }

    /// After a message or the twin set a new rate: the time since the last
    /// sample is sampled at the rate it was spent at, so a device going
    /// from 0.1 to 100 Hz does not owe the new rate for the last 10 s.
    /// True when it did (what it sampled is for sending now).
    fn rate_changed_from(&mut self, rate_before: f64, last_sample: &mut Instant) -> bool {
        if self.cfg.rate_hz == rate_before || self.backfill_ms.is_some() {
            return false;
        }
        let now = Instant::now();
        let new_rate = std::mem::replace(&mut self.cfg.rate_hz, rate_before);
        self.sample(now.duration_since(*last_sample));
        self.cfg.rate_hz = new_rate;
        *last_sample = now;
        true
    }

    /// Takes the samples due over `elapsed`, spread evenly in time; while
    /// backfilling, fills the buffer with past readings instead.
    fn sample(&mut self, elapsed: Duration) {
        if self.backfill_ms.is_some() {
            self.sample_past();
            return;
        }
        let due = self.cfg.rate_hz * elapsed.as_secs_f64() + self.carry;
        // Ticks a reading period apart owe one reading each: a rounding
        // below the whole must not skip one (the carry keeps the sum).
        let n = (due + 1e-9).floor() as u64;
        self.carry = due - n as f64;
        if n == 0 || self.active.is_empty() {
            return;
        }
        let now_ms = now_ms();
        let span_ms = elapsed.as_millis() as i64;
        for i in 0..n {
            if self.unacked.len() >= self.cfg.buffer {
                FleetStats::inc(&self.stats.dropped_at_source, n - i);
                return;
            }
            let ts_ms = now_ms - span_ms + (span_ms * (i as i64 + 1)) / n as i64;
            self.push_sample(ts_ms);
        }
    }

    /// Samples the next active sensor (in turn) at `ts_ms`.
    fn push_sample(&mut self, ts_ms: i64) {
        let sensor = self.active[self.sensor_cursor % self.active.len()];
        self.sensor_cursor += 1;
        let value = self.signal.sample(&self.cfg.sensors[sensor], ts_ms);
        self.unacked.push_back(Sample {
            seq: self.next_seq,
            sensor,
            ts_ms,
            value,
        });
        self.next_seq += 1;
    }

    /// Past readings, `rate_hz` apart, until the buffer is full or the
    /// present is reached (then sampling goes on live).
    fn sample_past(&mut self) {
        let Some(mut ts) = self.backfill_ms else {
            return;
        };
        let step = 1000.0 / self.cfg.rate_hz.max(1e-3);
        let now = now_ms() as f64;
        while self.unacked.len() < self.cfg.buffer && !self.active.is_empty() {
            if ts >= now {
                self.backfill_ms = None;
                return;
            }
            self.push_sample(ts as i64);
            ts += step;
        }
        self.backfill_ms = Some(ts);
    }

    /// Sends the unacked readings not yet sent on this stream, in batches of
    /// at most the device's batch size within the hub's `max_batch` (called
    /// once per batch interval, and on drain).
    async fn send_unsent(
        &mut self,
        tx: &mpsc::Sender<pb::DeviceMessage>,
        max_batch: usize,
    ) -> Result<(), StreamEnd> {
        let batch_max = self.cfg.batch_max.clamp(1, max_batch);
        while self.sent_on_stream < self.unacked.len() {
            let end = (self.sent_on_stream + batch_max).min(self.unacked.len());
            let readings: Vec<pb::Reading> = self
                .unacked
                .range(self.sent_on_stream..end)
                .map(|r| pb::Reading {
                    seq: r.seq,
                    sensor: self.cfg.sensors[r.sensor].clone(),
                    ts_ms: r.ts_ms,
                    value: r.value,
                })
                .collect();
            let last = readings.last().map_or(0, |r| r.seq);
            let fresh = readings
                .iter()
                .filter(|r| r.seq > self.highest_sent)
                .count();
            let msg = pb::DeviceMessage {
                msg: Some(DeviceMsg::Readings(pb::ReadingBatch { readings })),
            };
            tx.send(msg)
                .await
                .map_err(|_| StreamEnd::Broken(Status::unavailable("send side closed")))?;
            FleetStats::inc(&self.stats.sent, fresh as u64);
            self.highest_sent = self.highest_sent.max(last);
            self.sent_on_stream = end;
            self.in_flight.push_back((last, Instant::now()));
        }
        Ok(())
    }
}

/// A reading kept until it is acked: its sensor by index, so a fleet
/// sampling a million readings a second does not allocate a name for each
/// one twice (here and in the message).
#[derive(Debug, Clone, Copy)]
struct Sample {
    seq: u64,
    sensor: usize,
    ts_ms: i64,
    value: f64,
}

/// Exponential backoff with full jitter.
struct Backoff {
    next: Duration,
    max: Duration,
    min: Duration,
    rng: StdRng,
}

impl Backoff {
    fn new(min: Duration, max: Duration, seed: u64) -> Self {
        Self {
            next: min,
            max,
            min,
            rng: StdRng::seed_from_u64(seed),
        }
    }

    fn reset(&mut self) {
        self.next = self.min;
    }

    /// The next wait: between half and all of the current ceiling, which
    /// doubles up to `max`.
    fn next(&mut self) -> Duration {
        let ceiling = self.next;
        self.next = (self.next * 2).min(self.max);
        ceiling.mul_f64(self.rng.random_range(0.5..=1.0))
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn device(rate_hz: f64) -> SimDevice {
        SimDevice::new(
            DeviceConfig {
                device_id: "t-1".into(),
                token: String::new(),
                index: 1,
                seed: 7,
                rate_hz,
                sensors: vec!["a".into(), "b".into()],
                batch_max: 100,
                batch_interval: Duration::from_millis(100),
                buffer: 10_000,
                drain_timeout: Duration::from_secs(1),
                firmware: "t".into(),
                full_precision: false,
                backfill: None,
                twin: false,
                twin_apply_delay: Duration::ZERO,
            },
            Arc::new(FleetStats::default()),
        )
    }

    #[test]
    fn a_device_wakes_once_per_reading_or_batch_interval() {
        let secs = |hz| device(hz).tick_period().as_secs_f64();
        assert_eq!(secs(0.1), 10.0);
        assert_eq!(secs(5.0), 0.2);
        assert_eq!(secs(100.0), 0.1);
        assert_eq!(secs(0.0), 3600.0);
    }

    #[test]
    fn readings_a_period_apart_come_one_a_tick() {
        let mut d = device(0.1);
        let period = d.tick_period();
        // The first tick comes (1 - phase) of a period in.
        d.sample(period.mul_f64(1.0 - d.carry));
        assert_eq!(d.unacked.len(), 1);
        for n in 2..=50 {
            d.sample(period);
            assert_eq!(d.unacked.len(), n);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn the_first_tick_of_a_stream_comes_when_a_reading_is_due() {
        // A new device (carry = its phase), and after a reconnect whatever
        // the last sampling left.
        let mut d = device(0.1);
        let period = d.tick_period();
        for carry in [d.carry, 0.0, 0.3, 0.95] {
            d.carry = carry;
            let before = d.unacked.len();
            let start = Instant::now();
            let mut tick = d.ticks(period);
            tick.tick().await;
            let waited = Instant::now().duration_since(start);
            d.sample(waited);
            assert_eq!(d.unacked.len(), before + 1, "carry {carry}");
            assert!(waited <= period.mul_f64(1.0 - carry) + Duration::from_millis(2));
            // And one a period from then on.
            tick.tick().await;
            d.sample(period);
            assert_eq!(d.unacked.len(), before + 2, "carry {carry}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn time_before_a_rate_change_is_sampled_at_the_old_rate() {
        let mut d = device(0.1);
        d.carry = 0.0;
        let mut last_sample = Instant::now();
        tokio::time::advance(Duration::from_secs(9)).await;
        // Nothing changed: nothing sampled.
        assert!(!d.rate_changed_from(0.1, &mut last_sample));
        assert!(d.unacked.is_empty());
        // 9 s at 0.1 Hz owe no reading; at 100 Hz they would owe 900.
        d.cfg.rate_hz = 100.0;
        assert!(d.rate_changed_from(0.1, &mut last_sample));
        assert!(d.unacked.is_empty());
        assert_eq!(d.cfg.rate_hz, 100.0);
        assert_eq!(last_sample, Instant::now());
        // From here on the new rate counts.
        tokio::time::advance(Duration::from_secs(1)).await;
        d.sample(Instant::now().duration_since(last_sample));
        assert_eq!(d.unacked.len(), 100);
    }
}
