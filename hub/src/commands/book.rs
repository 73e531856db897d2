//! The commands task's decisions, with no IO: which commands are open, each
//! device's queue and stream, what a send, a write, a reply, a cancel or a
//! timer changes, and what to push where. Each event goes in with the time
//! it happens at (`now`, ms since the epoch, and the monotonic `instant`);
//! what must be written comes back in a [`Batch`]. The actor (`mod.rs`)
//! does the IO around it: the mailbox, the log, the clocks.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use super::{CommandError, CommandSettings, DeviceCommand, MAX_TTL, MIN_TTL, NewCommand};
use crate::domain::{CommandRecord, CommandReply, CommandState, CommandTransition, ReplyStatus};
use crate::store::commands::Expected;
use crate::throttle::LogThrottle;

/// Longest detail of a device's reply kept, in bytes (longer is cut).
pub const MAX_REPLY_DETAIL: usize = 1024;

/// A command that is not final yet.
struct Open {
    rec: CommandRecord,
    /// The session it was last pushed to; None = push it (again).
    pushed_to: Option<u64>,
    /// When that session wrote it to its stream (None: still in the
    /// session's outbox). The ack timeout runs from the write: a push
    /// waiting in an outbox behind a slow stream is not pushed again, so
    /// an outbox never holds a command twice, and no write goes past
    /// `max_attempts` (pushed twice, both copies were written).
    written_at: Option<Instant>,
    /// Shared with the copies waiting in device outboxes.
    withdrawn: Arc<AtomicBool>,
}

impl Open {
    fn new(rec: CommandRecord) -> Self {
        Self {
            rec,
            pushed_to: None,
            written_at: None,
            withdrawn: Arc::default(),
        }
    }

    /// Not on any stream now: it is pushed again at the next chance.
    fn unpush(&mut self) {
        self.pushed_to = None;
        self.written_at = None;
    }
}

/// Every open command of a device queue goes out again (in order) on the
/// next stream it has.
fn unpush_all(open: &mut HashMap<String, Open>, order: &VecDeque<String>) {
    for id in order {
        if let Some(open) = open.get_mut(id) {
            open.unpush();
        }
    }
}

#[derive(Default)]
struct DeviceQueue {
    /// Open command ids, oldest first.
    order: VecDeque<String>,
    link: Option<(u64, mpsc::Sender<Box<DeviceCommand>>)>,
    /// The newest stream seen (stream ids only grow): an Attach from an
    /// older one that arrives late is refused.
    newest: u64,
}

/// What a batch of events changed, to write in one transaction.
#[derive(Default)]
pub(super) struct Batch {
    pub inserts: Vec<CommandRecord>,
    /// The command as it is to be stored, its new transitions, and what
    /// the log must still hold for the update to apply.
    pub updates: Vec<(CommandRecord, Vec<CommandTransition>, Expected)>,
    pub answers: Vec<(
        oneshot::Sender<Result<CommandRecord, CommandError>>,
        CommandRecord,
    )>,
    pub events: Vec<CommandRecord>,
}

impl Batch {
    /// Nothing to write (answers and events only come with writes).
    pub fn is_empty(&self) -> bool {
        self.inserts.is_empty() && self.updates.is_empty()
    }

    /// Rows and updates so far (a batch is written at 256).
    pub fn writes(&self) -> usize {
        self.inserts.len() + self.updates.len()
    }
}

pub(super) fn transition(state: CommandState, at_ms: i64, detail: &str) -> CommandTransition {
    CommandTransition {
        state,
        at_ms,
        detail: detail.to_owned(),
    }
}

/// May the command be written to a device stream again? A command has
/// `max_attempts` writes, across reconnects and restarts: one whose
/// delivery (or execution, after RECEIVED) kills the stream is not pushed
/// for ever. A RECEIVED one out of attempts still waits for its final reply
/// until its TTL; a SENT one fails (see `check_timers`).
fn attempts_left(rec: &CommandRecord, max_attempts: u32) -> bool {
    rec.attempts < max_attempts
}

/// A command's params and TTL as the hub takes them, whichever door sent
/// it: a name of 1 to 64 bytes without control characters, params a JSON
/// object (empty: `{}`) within `commands.max_params_bytes`, a TTL of 1 s to
/// 7 days (none: the default).
pub(super) fn checked(
    cmd: &NewCommand,
    settings: &CommandSettings,
) -> Result<(String, Duration), CommandError> {
    if cmd.name.is_empty() || cmd.name.len() > 64 {
        return Err(CommandError::Invalid(
            "command name must be 1 to 64 bytes".into(),
        ));
    }
    if cmd.name.chars().any(char::is_control) {
        // It reaches operators' terminals and devices' logs.
        return Err(CommandError::Invalid(
            "command name must not contain control characters".into(),
        ));
    }
    if cmd.params.len() > settings.max_params_bytes {
        return Err(CommandError::Invalid(format!(
            "params of {} bytes are over the limit of {} bytes (commands.max_params_bytes)",
            cmd.params.len(),
            settings.max_params_bytes
        )));
    }
    let params = if cmd.params.trim().is_empty() {
        "{}".to_owned()
    } else {
        match serde_json::from_str::<serde_json::Value>(&cmd.params) {
            Ok(v) if v.is_object() => v.to_string(),
            _ => return Err(CommandError::Invalid("params must be a JSON object".into())),
        }
    };
    let ttl = cmd.ttl.unwrap_or(settings.default_ttl);
    if !(MIN_TTL..=MAX_TTL).contains(&ttl) {
        return Err(CommandError::Invalid(format!(
            "ttl must be between 1s and 7days, not {}",
            humantime::format_duration(ttl)
        )));
    }
    Ok((params, ttl))
}

/// A device's reply as stored: the detail cut to [`MAX_REPLY_DETAIL`] bytes;
/// a result that is not JSON, or over `max_result` bytes, is not kept and
/// the detail says so (the state the device reported is kept either way).
pub(super) fn bounded_reply(mut reply: CommandReply, max_result: usize) -> CommandReply {
    if reply.detail.len() > MAX_REPLY_DETAIL {
        let mut cut = MAX_REPLY_DETAIL;
        while !reply.detail.is_char_boundary(cut) {
            cut -= 1;
        }
        reply.detail.truncate(cut);
        reply.detail.push('…');
    }
    let dropped = if reply.result.len() > max_result {
        Some(format!("larger than {max_result} bytes"))
    } else if !reply.result.is_empty()
        && serde_json::from_str::<serde_json::Value>(&reply.result).is_err()
    {
        Some("not JSON".to_owned())
    } else {
        None
    };
    if let Some(why) = dropped {
        reply.result.clear();
        let sep = if reply.detail.is_empty() { "" } else { "; " };
        reply.detail = format!("{}{sep}result dropped: {why}", reply.detail);
    }
    reply
}

/// The open commands, each device's queue and stream.
pub(super) struct CommandBook {
    open: HashMap<String, Open>,
    queues: HashMap<String, DeviceQueue>,
    max_pending_per_device: usize,
    ack_timeout: Duration,
    max_attempts: u32,
    max_params_bytes: usize,
    noise: LogThrottle,
}

impl CommandBook {
    pub fn new(settings: &CommandSettings) -> Self {
        Self {
            open: HashMap::new(),
            queues: HashMap::new(),
            max_pending_per_device: settings.max_pending_per_device,
            ack_timeout: settings.ack_timeout,
            max_attempts: settings.max_attempts,
            max_params_bytes: settings.max_params_bytes,
            noise: LogThrottle::new(Duration::from_secs(10)),
        }
    }

    pub fn is_open(&self, command_id: &str) -> bool {
        self.open.contains_key(command_id)
    }

    /// The open commands become exactly `open` (as the log holds them, in
    /// creation order); links to live streams are kept.
    pub fn replace_all(&mut self, open: Vec<CommandRecord>) {
        self.clear();
        for rec in open {
            self.queues
                .entry(rec.device_id.clone())
                .or_default()
                .order
                .push_back(rec.command_id.clone());
            self.open.insert(rec.command_id.clone(), Open::new(rec));
        }
    }

    /// Forgets every open command (nothing is pushed or timed out until
    /// they are known again); links to live streams are kept. Copies
    /// waiting in outboxes are withdrawn: the commands known again are
    /// pushed afresh, and a stale copy written beside the new one would
    /// count an attempt twice.
    pub fn clear(&mut self) {
        for open in self.open.values() {
            open.withdrawn.store(true, Ordering::Relaxed);
        }
        self.open.clear();
        for q in self.queues.values_mut() {
            q.order.clear();
        }
    }

    /// A new command for a checked `cmd` (see [`checked`]), queued last
    /// for its device; refused past `max_pending_per_device`.
    pub fn create(
        &mut self,
        cmd: NewCommand,
        params: String,
        ttl: Duration,
        command_id: String,
        now: i64,
        batch: &mut Batch,
    ) -> Result<CommandRecord, CommandError> {
        let queue = self.queues.entry(cmd.device_id.clone()).or_default();
        if queue.order.len() >= self.max_pending_per_device {
            return Err(CommandError::TooManyPending {
                device: cmd.device_id,
                limit: self.max_pending_per_device,
            });
        }
        let rec = CommandRecord {
            command_id,
            device_id: cmd.device_id,
            name: cmd.name,
            params,
            state: CommandState::Queued,
            detail: String::new(),
            result: String::new(),
            attempts: 0,
            created_at_ms: now,
            updated_at_ms: now,
            expires_at_ms: now.saturating_add(ttl.as_millis() as i64),
        };
        queue.order.push_back(rec.command_id.clone());
        self.open
            .insert(rec.command_id.clone(), Open::new(rec.clone()));
        batch.inserts.push(rec.clone());
        batch.events.push(rec.clone());
        Ok(rec)
    }

    /// An open command by id.
    pub fn get_open(&self, command_id: &str) -> Option<CommandRecord> {
        self.open.get(command_id).map(|o| o.rec.clone())
    }

    /// A device stream is live. An Attach of a stream older than one already
    /// seen arrived late (its takeover happened meanwhile): refused, so it
    /// cannot take the live stream's commands; its outbox just closes.
    pub fn attach(
        &mut self,
        device: String,
        session: u64,
        outbox: mpsc::Sender<Box<DeviceCommand>>,
    ) {
        let queue = self.queues.entry(device).or_default();
        // An older stream's late Attach, or the live one's again (its
        // commands are out already: pushing them twice would spend its
        // attempts twice).
        let live = queue.link.as_ref().is_some_and(|(s, _)| *s == session);
        if session < queue.newest || live {
            return;
        }
        queue.newest = session;
        queue.link = Some((session, outbox));
        // Everything not final goes out again on the new stream, in order:
        // the device deduplicates by command_id.
        unpush_all(&mut self.open, &queue.order);
    }

    pub fn detach(&mut self, device: &str, session: u64) {
        if let Some(queue) = self.queues.get_mut(device)
            && queue.link.as_ref().is_some_and(|(s, _)| *s == session)
        {
            queue.link = None;
            // The ack timeout only runs while the device stays connected;
            // the next stream gets everything again.
            unpush_all(&mut self.open, &queue.order);
            if queue.order.is_empty() {
                self.queues.remove(device);
            }
        }
    }

    /// The session wrote the command to its stream: one more attempt, and
    /// SENT if it was QUEUED; its ack timeout starts. Nothing if that
    /// session is not the device's live one any more.
    pub fn written(
        &mut self,
        device: &str,
        session: u64,
        command_id: &str,
        now: i64,
        instant: Instant,
        batch: &mut Batch,
    ) {
        let linked = self
            .queues
            .get(device)
            .and_then(|q| q.link.as_ref())
            .is_some_and(|(s, _)| *s == session);
        let Some(open) = self.open.get_mut(command_id) else {
            return;
        };
        if !linked {
            return;
        }
        let expected = Expected::of(&open.rec);
        open.written_at = Some(instant);
        open.rec.attempts += 1;
        open.rec.updated_at_ms = now;
        let mut transitions = Vec::new();
        if open.rec.state == CommandState::Queued {
            open.rec.state = CommandState::Sent;
            transitions.push(transition(CommandState::Sent, now, ""));
            batch.events.push(open.rec.clone());
        }
        batch
            .updates
            .push((open.rec.clone(), transitions, expected));
    }

    /// An operator cancels an open command; None when it is not open.
    pub fn cancel(
        &mut self,
        command_id: &str,
        now: i64,
        batch: &mut Batch,
    ) -> Option<CommandRecord> {
        self.finish(
            command_id,
            CommandState::Cancelled,
            "cancelled by an operator",
            None,
            Vec::new(),
            now,
            batch,
        )
    }

    /// Moves an open command to a final state and forgets it; `implied` are
    /// the transitions the final one implies (a final reply implies
    /// RECEIVED).
    #[allow(clippy::too_many_arguments)]
    fn finish(
        &mut self,
        command_id: &str,
        state: CommandState,
        detail: &str,
        result: Option<String>,
        implied: Vec<CommandTransition>,
        now: i64,
        batch: &mut Batch,
    ) -> Option<CommandRecord> {
        let mut open = self.open.remove(command_id)?;
        let expected = Expected::of(&open.rec);
        open.withdrawn.store(true, Ordering::Relaxed);
        if let Some(queue) = self.queues.get_mut(&open.rec.device_id) {
            queue.order.retain(|id| id != command_id);
        }
        let mut transitions = implied;
        transitions.push(transition(state, now, detail));
        let rec = &mut open.rec;
        rec.state = state;
        rec.detail = detail.to_owned();
        if let Some(result) = result {
            rec.result = result;
        }
        rec.updated_at_ms = now;
        batch.updates.push((rec.clone(), transitions, expected));
        batch.events.push(rec.clone());
        Some(open.rec)
    }

    /// A device's reply: RECEIVED, or a final state (which implies the
    /// ones it skipped). Replies for unknown, final or other devices'
    /// commands are ignored.
    pub fn on_reply(&mut self, device: &str, reply: CommandReply, now: i64, batch: &mut Batch) {
        let Some(open) = self.open.get_mut(&reply.command_id) else {
            if let Some(suppressed) = self.noise.allow() {
                tracing::warn!(device_id = device, command_id = ?reply.command_id, suppressed,
                    "reply for an unknown or already final command ignored");
            }
            return;
        };
        if open.rec.device_id != device {
            if let Some(suppressed) = self.noise.allow() {
                tracing::warn!(device_id = device, command_id = ?reply.command_id,
                    owner = %open.rec.device_id, suppressed, "reply for another device's command ignored");
            }
            return;
        }
        let reply = bounded_reply(reply, self.max_params_bytes);
        // The device has it, so it was sent even if the session's note that
        // it wrote the command has not arrived yet.
        let mut implied = Vec::new();
        if open.rec.state == CommandState::Queued {
            implied.push(transition(CommandState::Sent, now, ""));
        }
        if open.rec.state != CommandState::Received {
            implied.push(transition(CommandState::Received, now, ""));
        }
        let final_state = match reply.status {
            ReplyStatus::Received => None,
            ReplyStatus::Succeeded => Some(CommandState::Succeeded),
            ReplyStatus::Failed => Some(CommandState::Failed),
            ReplyStatus::Rejected => Some(CommandState::Rejected),
        };
        match final_state {
            None => {
                if implied.is_empty() {
                    return;
                }
                let expected = Expected::of(&open.rec);
                open.rec.state = CommandState::Received;
                open.rec.updated_at_ms = now;
                batch.updates.push((open.rec.clone(), implied, expected));
                batch.events.push(open.rec.clone());
            }
            Some(state) => {
                let result = Some(reply.result);
                self.finish(
                    &reply.command_id,
                    state,
                    &reply.detail,
                    result,
                    implied,
                    now,
                    batch,
                );
            }
        }
    }

    /// Expiry and the ack timeout. Attempts count every write to a device
    /// stream, across reconnects and restarts: a command whose delivery
    /// kills the stream is not pushed for ever.
    pub fn check_timers(&mut self, now: i64, instant: Instant, batch: &mut Batch) {
        let mut expired = Vec::new();
        let mut unanswered = Vec::new();
        let ack_timeout_ms = self.ack_timeout.as_millis() as i64;
        for (id, open) in &mut self.open {
            if open.rec.expires_at_ms <= now {
                expired.push(id.clone());
                continue;
            }
            if open.rec.state != CommandState::Sent {
                continue;
            }
            let timed_out = open
                .written_at
                .is_some_and(|at| instant.saturating_duration_since(at) >= self.ack_timeout);
            if timed_out {
                // Send it again (if attempts are left, see below).
                open.unpush();
            }
            // Out of attempts: FAILED once the device has been connected
            // for an ack timeout since the last write without a word.
            let attached = self
                .queues
                .get(&open.rec.device_id)
                .is_some_and(|q| q.link.is_some());
            if open.pushed_to.is_none()
                && attached
                && !attempts_left(&open.rec, self.max_attempts)
                && now.saturating_sub(open.rec.updated_at_ms) >= ack_timeout_ms
            {
                unanswered.push(id.clone());
            }
        }
        for id in expired {
            self.finish(
                &id,
                CommandState::Expired,
                "ttl passed before a final state",
                None,
                Vec::new(),
                now,
                batch,
            );
        }
        for id in unanswered {
            self.finish(
                &id,
                CommandState::Failed,
                "no response from device",
                None,
                Vec::new(),
                now,
                batch,
            );
        }
    }

    /// When the next timer of an open command is due (at most a second
    /// away: an out-of-attempts command fails within a second of its ack
    /// timeout).
    pub fn next_deadline(&self, now: i64, instant: Instant) -> Instant {
        let mut next = instant + Duration::from_secs(1);
        for open in self.open.values() {
            let expires = instant
                + Duration::from_millis(open.rec.expires_at_ms.saturating_sub(now).max(0) as u64);
            next = next.min(expires);
            if open.rec.state == CommandState::Sent
                && let Some(at) = open.written_at
            {
                next = next.min(at + self.ack_timeout);
            }
            if open.pushed_to.is_none()
                && attempts_left(&open.rec, self.max_attempts)
                && self
                    .queues
                    .get(&open.rec.device_id)
                    .is_some_and(|q| q.link.is_some())
            {
                // Waiting for room in a device's outbox.
                next = next.min(instant + Duration::from_millis(50));
            }
        }
        next
    }

    /// Takes in a command as the log holds it: a final one is withdrawn and
    /// forgotten, an open one is kept (in creation order) to be delivered
    /// if its device's stream is on this hub.
    pub fn reconcile(&mut self, rec: CommandRecord) {
        if rec.state.is_final() {
            self.forget(&rec.command_id);
            return;
        }
        if let Some(open) = self.open.get_mut(&rec.command_id) {
            open.rec = rec;
            return;
        }
        let queue = self.queues.entry(rec.device_id.clone()).or_default();
        let at = queue
            .order
            .iter()
            .position(|id| {
                self.open
                    .get(id)
                    .is_some_and(|o| o.rec.created_at_ms > rec.created_at_ms)
            })
            .unwrap_or(queue.order.len());
        queue.order.insert(at, rec.command_id.clone());
        self.open.insert(rec.command_id.clone(), Open::new(rec));
    }

    /// Makes the open commands in memory (of one device, or all) those of
    /// the log: the others are forgotten, these reconciled.
    pub fn resync(&mut self, device: Option<&str>, open: Vec<CommandRecord>) {
        let ids: HashSet<&str> = open.iter().map(|r| r.command_id.as_str()).collect();
        let gone: Vec<String> = self
            .open
            .values()
            .filter(|o| device.is_none_or(|d| o.rec.device_id == d))
            .filter(|o| !ids.contains(o.rec.command_id.as_str()))
            .map(|o| o.rec.command_id.clone())
            .collect();
        for id in gone {
            self.forget(&id);
        }
        for rec in open {
            self.reconcile(rec);
        }
    }

    /// Drops a command from memory (withdrawn from any outbox).
    pub fn forget(&mut self, command_id: &str) {
        if let Some(open) = self.open.remove(command_id) {
            open.withdrawn.store(true, Ordering::Relaxed);
            if let Some(queue) = self.queues.get_mut(&open.rec.device_id) {
                queue.order.retain(|id| id != command_id);
            }
        }
    }

    /// Pushes open commands to attached devices, oldest first, as far as
    /// each device's outbox has room. Expired ones never go out.
    pub fn dispatch(&mut self, now: i64) {
        // Nothing to push: skip the walk over every attached device's
        // queue (100,000 of them at a fleet's size, on each wake of the
        // commands task). Detached empty queues go at detach meanwhile.
        if self.open.is_empty() {
            return;
        }
        for queue in self.queues.values_mut() {
            let Some((session, outbox)) = &queue.link else {
                continue;
            };
            let mut closed = false;
            for id in &queue.order {
                let Some(open) = self.open.get_mut(id) else {
                    continue;
                };
                if open.pushed_to == Some(*session) || open.rec.expires_at_ms <= now {
                    continue;
                }
                if !attempts_left(&open.rec, self.max_attempts) {
                    // Failed at the next timer check, never pushed again.
                    continue;
                }
                let cmd = DeviceCommand {
                    command_id: open.rec.command_id.clone(),
                    name: open.rec.name.clone(),
                    params: open.rec.params.clone(),
                    expires_at_ms: open.rec.expires_at_ms,
                    withdrawn: Arc::clone(&open.withdrawn),
                };
                match outbox.try_send(Box::new(cmd)) {
                    Ok(()) => open.pushed_to = Some(*session),
                    Err(mpsc::error::TrySendError::Full(_)) => break,
                    Err(mpsc::error::TrySendError::Closed(_)) => {
                        closed = true;
                        break;
                    }
                }
            }
            if closed {
                queue.link = None;
            }
        }
        self.queues
            .retain(|_, q| q.link.is_some() || !q.order.is_empty());
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    const ACK: Duration = Duration::from_secs(10);

    fn settings() -> CommandSettings {
        CommandSettings {
            default_ttl: Duration::from_secs(60),
            max_pending_per_device: 3,
            ack_timeout: ACK,
            max_attempts: 2,
            outbox: 4,
            max_params_bytes: 64,
            retention: Duration::ZERO,
        }
    }

    /// A book and a clock: `now` in ms, `instant` moving with it.
    struct World {
        book: CommandBook,
        now: i64,
        t0: Instant,
        next_id: u32,
    }

    impl World {
        fn new() -> Self {
            Self {
                book: CommandBook::new(&settings()),
                now: 1_000_000,
                t0: Instant::now(),
                next_id: 0,
            }
        }

        fn instant(&self) -> Instant {
            self.t0 + Duration::from_millis((self.now - 1_000_000) as u64)
        }

        fn send(
            &mut self,
            device: &str,
            ttl: Duration,
        ) -> Result<(CommandRecord, Batch), CommandError> {
            let cmd = NewCommand {
                id: None,
                device_id: device.into(),
                name: "ping".into(),
                params: String::new(),
                ttl: Some(ttl),
            };
            let (params, ttl) = checked(&cmd, &settings())?;
            self.next_id += 1;
            let mut batch = Batch::default();
            let rec = self.book.create(
                cmd,
                params,
                ttl,
                format!("c{}", self.next_id),
                self.now,
                &mut batch,
            )?;
            Ok((rec, batch))
        }

        fn timers(&mut self) -> Batch {
            let mut batch = Batch::default();
            self.book.check_timers(self.now, self.instant(), &mut batch);
            batch
        }

        fn dispatch(&mut self) {
            self.book.dispatch(self.now);
        }
    }

    fn states(batch: &Batch) -> Vec<(String, CommandState)> {
        batch
            .updates
            .iter()
            .map(|(rec, _, _)| (rec.command_id.clone(), rec.state))
            .collect()
    }

    fn answer(id: &str, status: ReplyStatus) -> CommandReply {
        CommandReply {
            command_id: id.into(),
            status,
            detail: String::new(),
            result: String::new(),
        }
    }

    #[test]
    fn a_command_goes_out_in_order_and_ends_on_the_device_s_word() {
        let mut w = World::new();
        let (first, batch) = w.send("d", Duration::from_secs(60)).unwrap();
        assert_eq!(batch.inserts.len(), 1);
        let (second, _) = w.send("d", Duration::from_secs(60)).unwrap();
        let (tx, mut outbox) = mpsc::channel(4);
        w.book.attach("d".into(), 1, tx);
        w.dispatch();
        let pushed: Vec<String> = std::iter::from_fn(|| outbox.try_recv().ok())
            .map(|c| c.command_id)
            .collect();
        assert_eq!(
            pushed,
            [first.command_id.clone(), second.command_id.clone()]
        );
        // Pushed once per stream, not at every dispatch.
        w.dispatch();
        assert!(outbox.try_recv().is_err());

        let mut batch = Batch::default();
        w.book
            .written("d", 1, &first.command_id, w.now, w.instant(), &mut batch);
        assert_eq!(
            states(&batch),
            [(first.command_id.clone(), CommandState::Sent)]
        );
        let mut batch = Batch::default();
        w.book.on_reply(
            "d",
            answer(&first.command_id, ReplyStatus::Received),
            w.now,
            &mut batch,
        );
        assert_eq!(
            states(&batch),
            [(first.command_id.clone(), CommandState::Received)]
        );
        let mut batch = Batch::default();
        w.book.on_reply(
            "d",
            answer(&first.command_id, ReplyStatus::Succeeded),
            w.now,
            &mut batch,
        );
        assert_eq!(
            states(&batch),
            [(first.command_id.clone(), CommandState::Succeeded)]
        );
        assert!(!w.book.is_open(&first.command_id));
        // A final reply straight from QUEUED implies SENT and RECEIVED.
        let mut batch = Batch::default();
        w.book.on_reply(
            "d",
            answer(&second.command_id, ReplyStatus::Failed),
            w.now,
            &mut batch,
        );
        let implied: Vec<CommandState> = batch.updates[0].1.iter().map(|t| t.state).collect();
        assert_eq!(
            implied,
            [
                CommandState::Sent,
                CommandState::Received,
                CommandState::Failed
            ]
        );
        // Repeated, or from another device: nothing.
        let mut batch = Batch::default();
        w.book.on_reply(
            "d",
            answer(&second.command_id, ReplyStatus::Succeeded),
            w.now,
            &mut batch,
        );
        w.book.on_reply(
            "other",
            answer(&first.command_id, ReplyStatus::Succeeded),
            w.now,
            &mut batch,
        );
        assert!(batch.is_empty());
    }

    /// Found by the property test below: a SENT command pushed to a new
    /// stream and still in its outbox when the ack timeout passed was
    /// pushed again, both copies were written, and it went out three times
    /// of two.
    #[test]
    fn a_push_waiting_in_the_outbox_is_not_pushed_again_and_attempts_stay_within_the_cap() {
        let mut w = World::new();
        let (cmd, _) = w.send("d", Duration::from_secs(600)).unwrap();
        let (tx, mut first) = mpsc::channel(4);
        w.book.attach("d".into(), 1, tx);
        w.dispatch();
        assert_eq!(first.try_recv().unwrap().command_id, cmd.command_id);
        let mut batch = Batch::default();
        w.book
            .written("d", 1, &cmd.command_id, w.now, w.instant(), &mut batch);
        assert_eq!(batch.updates[0].0.attempts, 1);
        // A new stream takes over; it is slow: nothing written for two
        // ack timeouts.
        let (tx, mut second) = mpsc::channel(4);
        w.book.attach("d".into(), 2, tx);
        w.dispatch();
        for _ in 0..2 {
            w.now += ACK.as_millis() as i64;
            assert!(w.timers().is_empty());
            w.dispatch();
        }
        assert_eq!(second.try_recv().unwrap().command_id, cmd.command_id);
        assert!(second.try_recv().is_err(), "one copy in the outbox");
        let mut batch = Batch::default();
        w.book
            .written("d", 2, &cmd.command_id, w.now, w.instant(), &mut batch);
        assert_eq!(batch.updates[0].0.attempts, 2);
        // The ack timeout runs from the write; then, out of attempts, it
        // fails.
        w.now += ACK.as_millis() as i64 - 1;
        assert!(w.timers().is_empty(), "within the ack timeout of the write");
        w.now += 1;
        assert_eq!(
            states(&w.timers()),
            [(cmd.command_id.clone(), CommandState::Failed)]
        );
        w.dispatch();
        assert!(second.try_recv().is_err());
    }

    /// A reload of the log (after a failed commit) pushes the open
    /// commands again: the copies already in outboxes are withdrawn, so a
    /// stream writes each command once.
    #[test]
    fn a_reload_withdraws_the_copies_waiting_in_outboxes() {
        let mut w = World::new();
        let (cmd, _) = w.send("d", Duration::from_secs(600)).unwrap();
        let (tx, mut outbox) = mpsc::channel(4);
        w.book.attach("d".into(), 1, tx);
        w.dispatch();
        w.book.replace_all(vec![cmd.clone()]);
        w.dispatch();
        let copies: Vec<Box<DeviceCommand>> =
            std::iter::from_fn(|| outbox.try_recv().ok()).collect();
        let wanted: Vec<bool> = copies
            .iter()
            .map(|c| !c.withdrawn.load(Ordering::Relaxed))
            .collect();
        assert_eq!(
            wanted,
            [false, true],
            "the old copy withdrawn, the new one not"
        );
        let mut batch = Batch::default();
        w.book
            .written("d", 1, &cmd.command_id, w.now, w.instant(), &mut batch);
        assert_eq!(batch.updates[0].0.attempts, 1);
    }

    #[test]
    fn a_silent_device_gets_its_attempts_then_the_command_fails() {
        let mut w = World::new();
        let (cmd, _) = w.send("d", Duration::from_secs(600)).unwrap();
        let (tx, mut outbox) = mpsc::channel(4);
        w.book.attach("d".into(), 1, tx);
        for attempt in 1..=2 {
            w.dispatch();
            assert_eq!(
                outbox.try_recv().unwrap().command_id,
                cmd.command_id,
                "attempt {attempt}"
            );
            let mut batch = Batch::default();
            w.book
                .written("d", 1, &cmd.command_id, w.now, w.instant(), &mut batch);
            assert_eq!(batch.updates[0].0.attempts, attempt);
            assert!(w.timers().is_empty(), "within the ack timeout");
            w.now += ACK.as_millis() as i64;
            let batch = w.timers();
            if attempt < 2 {
                assert!(batch.is_empty(), "sent again, not failed");
            } else {
                assert_eq!(
                    states(&batch),
                    [(cmd.command_id.clone(), CommandState::Failed)]
                );
                assert_eq!(batch.updates[0].0.detail, "no response from device");
            }
        }
        w.dispatch();
        assert!(outbox.try_recv().is_err(), "never pushed again");
    }

    #[test]
    fn away_devices_keep_commands_until_their_ttl_and_then_they_expire_unsent() {
        let mut w = World::new();
        let (cmd, _) = w.send("d", Duration::from_secs(5)).unwrap();
        // No stream: no ack timeout runs, the TTL does.
        w.now += 4_999;
        assert!(w.timers().is_empty());
        w.now += 1;
        let batch = w.timers();
        assert_eq!(
            states(&batch),
            [(cmd.command_id.clone(), CommandState::Expired)]
        );
        let (tx, mut outbox) = mpsc::channel(4);
        w.book.attach("d".into(), 1, tx);
        w.dispatch();
        assert!(outbox.try_recv().is_err());
    }

    #[test]
    fn a_reconnect_gets_every_open_command_again_and_a_late_older_stream_nothing() {
        let mut w = World::new();
        let (cmd, _) = w.send("d", Duration::from_secs(60)).unwrap();
        let (old_tx, mut old) = mpsc::channel(4);
        w.book.attach("d".into(), 1, old_tx);
        w.dispatch();
        assert!(old.try_recv().is_ok());
        let (new_tx, mut new) = mpsc::channel(4);
        w.book.attach("d".into(), 3, new_tx);
        let (late_tx, mut late) = mpsc::channel(4);
        w.book.attach("d".into(), 2, late_tx);
        w.dispatch();
        assert_eq!(new.try_recv().unwrap().command_id, cmd.command_id);
        assert!(
            late.try_recv().is_err(),
            "an older stream's late attach is refused"
        );
        // A write reported by a stream that is no longer the device's.
        let mut batch = Batch::default();
        w.book
            .written("d", 1, &cmd.command_id, w.now, w.instant(), &mut batch);
        assert!(batch.is_empty());
    }

    #[test]
    fn cancelled_and_limited() {
        let mut w = World::new();
        let (a, _) = w.send("d", Duration::from_secs(60)).unwrap();
        w.send("d", Duration::from_secs(60)).unwrap();
        w.send("d", Duration::from_secs(60)).unwrap();
        assert!(matches!(
            w.send("d", Duration::from_secs(60)),
            Err(CommandError::TooManyPending { limit: 3, .. })
        ));
        let mut batch = Batch::default();
        let cancelled = w.book.cancel(&a.command_id, w.now, &mut batch).unwrap();
        assert_eq!(cancelled.state, CommandState::Cancelled);
        assert!(w.book.cancel(&a.command_id, w.now, &mut batch).is_none());
        assert!(w.send("d", Duration::from_secs(60)).is_ok(), "room again");
        assert!(matches!(
            w.send("d", Duration::from_millis(500)),
            Err(CommandError::Invalid(_))
        ));
    }

    #[test]
    fn replies_are_bounded_and_say_what_was_dropped() {
        let reply = |detail: &str, result: &str| CommandReply {
            command_id: "c".into(),
            status: ReplyStatus::Succeeded,
            detail: detail.into(),
            result: result.into(),
        };
        let ok = bounded_reply(reply("fine", r#"{"a":1}"#), 64);
        assert_eq!(
            (ok.detail.as_str(), ok.result.as_str()),
            ("fine", r#"{"a":1}"#)
        );
        let big = bounded_reply(reply("", &format!("\"{}\"", "x".repeat(100))), 64);
        assert_eq!(
            (big.detail.as_str(), big.result.as_str()),
            ("result dropped: larger than 64 bytes", "")
        );
        let bad = bounded_reply(reply("done", "{not json"), 64);
        assert_eq!(bad.detail, "done; result dropped: not JSON");
        let long = bounded_reply(reply(&"é".repeat(600), ""), 64);
        assert!(long.detail.len() <= MAX_REPLY_DETAIL + '…'.len_utf8());
        assert!(long.detail.ends_with('…'));
    }

    #[derive(Debug, Clone)]
    enum Event {
        Send,
        /// A new stream of the device: its Attach waits to be delivered.
        Connect,
        /// A waiting Attach arrives (by index: an older stream's may come
        /// after a newer one's). Each stream attaches once.
        Attach(usize),
        /// A stream ends (by index among the attached).
        Detach(usize),
        Dispatch,
        /// A session writes one of the commands it was handed (by index).
        Written(usize),
        Reply(usize, u8),
        Cancel(usize),
        Tick(u32),
    }

    fn event() -> impl Strategy<Value = Event> {
        prop_oneof![
            Just(Event::Send),
            Just(Event::Connect),
            (0..3usize).prop_map(Event::Attach),
            (0..3usize).prop_map(Event::Detach),
            Just(Event::Dispatch),
            (0..6usize).prop_map(Event::Written),
            (0..6usize, 0..4u8).prop_map(|(i, r)| Event::Reply(i, r)),
            (0..6usize).prop_map(Event::Cancel),
            (0..20_000u32).prop_map(Event::Tick),
        ]
    }

    fn rank(state: CommandState) -> u8 {
        match state {
            CommandState::Queued => 0,
            CommandState::Sent => 1,
            CommandState::Received => 2,
            _ => 3,
        }
    }

    proptest! {
        #![proptest_config(crate::fuzz_config())]
        /// Over any order of events: a command's state never goes back, a
        /// final command never changes again, each change says what the log
        /// held before it, attempts never pass the limit, and nothing final
        /// or expired is pushed.
        #[test]
        fn states_only_move_forward_and_finals_stay_final(events in proptest::collection::vec(event(), 1..60)) {
            let mut w = World::new();
            let mut ids: Vec<String> = Vec::new();
            let mut last: HashMap<String, CommandRecord> = HashMap::new();
            let mut outboxes: Vec<(u64, mpsc::Receiver<Box<DeviceCommand>>)> = Vec::new();
            // Commands sessions were handed and have not written yet.
            let mut handed: Vec<(u64, String)> = Vec::new();
            let (mut streams, mut waiting, mut attached) = (0u64, Vec::new(), Vec::new());
            let max_attempts = settings().max_attempts;
            for event in events {
                let mut batch = Batch::default();
                match event {
                    Event::Send => {
                        if let Ok((rec, b)) = w.send("d", Duration::from_secs(30)) {
                            ids.push(rec.command_id.clone());
                            last.insert(rec.command_id.clone(), rec);
                            batch = b;
                            batch.updates.clear();
                        }
                    }
                    Event::Connect => {
                        streams += 1;
                        waiting.push(streams);
                    }
                    Event::Attach(i) => if i < waiting.len() {
                        let s = waiting.remove(i);
                        let (tx, rx) = mpsc::channel(2);
                        w.book.attach("d".into(), s, tx);
                        outboxes.push((s, rx));
                        attached.push(s);
                    },
                    Event::Detach(i) => if i < attached.len() {
                        let s = attached.remove(i);
                        // A stream's writes are reported before it ends.
                        handed.retain(|(h, _)| *h != s);
                        w.book.detach("d", s);
                    },
                    Event::Dispatch => w.dispatch(),
                    Event::Written(i) => if i < handed.len() {
                        let (s, id) = handed.remove(i);
                        w.book.written("d", s, &id, w.now, w.instant(), &mut batch);
                    },
                    Event::Reply(i, r) => if let Some(id) = ids.get(i) {
                        let status = [ReplyStatus::Received, ReplyStatus::Succeeded,
                            ReplyStatus::Failed, ReplyStatus::Rejected][r as usize];
                        w.book.on_reply("d", answer(id, status), w.now, &mut batch);
                    },
                    Event::Cancel(i) => if let Some(id) = ids.get(i) {
                        w.book.cancel(id, w.now, &mut batch);
                    },
                    Event::Tick(ms) => {
                        w.now += i64::from(ms);
                        batch = w.timers();
                    }
                }
                for (rec, transitions, expected) in &batch.updates {
                    let before = &last[&rec.command_id];
                    prop_assert!(!before.state.is_final(), "{} changed after {:?}", rec.command_id, before.state);
                    prop_assert!(rank(rec.state) >= rank(before.state), "{:?} -> {:?}", before.state, rec.state);
                    prop_assert_eq!(*expected, Expected::of(before));
                    prop_assert!(rec.attempts <= max_attempts);
                    prop_assert!(transitions.iter().all(|t| rank(t.state) >= rank(before.state)));
                    last.insert(rec.command_id.clone(), rec.clone());
                }
                for (session, outbox) in &mut outboxes {
                    while let Ok(cmd) = outbox.try_recv() {
                        let rec = &last[&cmd.command_id];
                        prop_assert!(!rec.state.is_final(), "a final command was pushed");
                        prop_assert!(cmd.expires_at_ms > w.now, "an expired command was pushed");
                        handed.push((*session, cmd.command_id.clone()));
                    }
                }
            }
        }
    }
}
