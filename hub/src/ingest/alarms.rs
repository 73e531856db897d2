//! The writer's part of alarms: threshold and rate rules evaluated on a
//! group's stored rows inside its transaction, and the alarm changes
//! others ask for (rules, acknowledgements, clears, inactivity, webhook
//! attempts, pruning), written in the same group commit.
//!
//! What it keeps in memory is a cache of committed rows, like the rest of
//! the writer: the rules (reloaded when [`AlarmHub::generation`] moves:
//! rules or tags changed here or on another hub), which series rules apply
//! to each device, each series' newest evaluated ts, and the series states
//! (read again after an operator's clear or a rule change, and on
//! PostgreSQL every 2 s per device: another hub may have changed them).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use rustc_hash::FxHashMap;
use tokio::sync::oneshot;

use super::IngestError;
use crate::alarms::engine::{IdleFilter, SeriesState, Transition};
use crate::alarms::rules::{Eval, Watch};
use crate::alarms::{Alarm, AlarmEvent, AlarmHub, EventKind, Rule, RuleSpec};
use crate::domain::{DeviceKey, SensorKey};
use crate::store::alarms::{Attempt, Silent};
use crate::store::{RowToInsert, StoreError, WriteTx};

/// An alarm change for the writer's next commit.
#[derive(Debug, Clone)]
pub enum AlarmOp {
    PutRule(Box<RuleSpec>),
    DeleteRule(String),
    Ack {
        id: i64,
        by: String,
        note: String,
    },
    Clear {
        id: i64,
        by: String,
        note: String,
    },
    /// The leader's inactivity decision for one rule (as it read it).
    Inactivity {
        rule: i64,
        version: u64,
        raise: Vec<Silent>,
        /// Open alarms to clear: (device, sensor).
        clear: Vec<(DeviceKey, String)>,
    },
    Attempts(Vec<Attempt>),
    Prune {
        cutoff_ms: i64,
        limit: u32,
    },
}

/// What became of an [`AlarmOp`].
#[derive(Debug, Clone)]
pub enum AlarmOutcome {
    Rule(Box<Rule>),
    /// A deleted rule (None: there was none of that name).
    Deleted(Option<Box<Rule>>),
    /// An acknowledged or cleared alarm after the change...
    Changed(Box<Alarm>),
    /// ...or as it is when there was nothing to change (None: no such
    /// alarm).
    Unchanged(Option<Box<Alarm>>),
    /// How many alarms an inactivity step changed or pruning deleted.
    Count(u64),
}

pub(crate) struct AlarmMsg {
    pub op: AlarmOp,
    pub reply: oneshot::Sender<Result<AlarmOutcome, IngestError>>,
}

/// How often a writer on PostgreSQL reads the rules (and which apply to
/// its devices) again: another hub's rule or tag change takes effect here
/// within this.
const RELOAD_SHARED: std::time::Duration = std::time::Duration::from_secs(2);

/// The series rules of one sensor name (indexes into `series`, in rule
/// order) and what values could move them from idle.
#[derive(Default)]
struct SensorRules {
    rules: Vec<usize>,
    filter: IdleFilter,
}

/// A series' (ts, value) points in a group.
type Points = Vec<(i64, f64)>;

/// A sensor's name and its rules.
type NamedRules = (Arc<str>, Arc<SensorRules>);

/// A watched series in a group: its newest ts, and whether a value of it
/// passed its sensor's filter.
struct Seen {
    newest: i64,
    hot: bool,
}

/// A series rule in the form the evaluator uses.
struct SeriesRule {
    rule: Arc<Rule>,
    sensor: Arc<str>,
    eval: Eval,
}

pub(crate) struct AlarmWork {
    hub: Arc<AlarmHub>,
    webhooks: Vec<Arc<str>>,
    /// The generation the rules were loaded at (None: not loaded), and
    /// when.
    generation: Option<u64>,
    loaded_at: Option<std::time::Instant>,
    rules: Vec<Arc<Rule>>,
    series: Vec<SeriesRule>,
    by_sensor: HashMap<Arc<str>, Arc<SensorRules>>,
    /// The series rules (indexes into `series`) that apply to a device.
    by_device: FxHashMap<DeviceKey, Arc<[usize]>>,
    /// Each series' newest evaluated reading (committed).
    last_ts: FxHashMap<(DeviceKey, SensorKey), i64>,
    /// The series states of devices (as the store has them, and as this
    /// group changes them: after a failed commit all is read again). On
    /// PostgreSQL a device's are read again after RELOAD_SHARED.
    states: FxHashMap<DeviceKey, DeviceStates>,
    /// External ids of the devices in `by_device`.
    names: HashMap<DeviceKey, Arc<str>>,
    cached_devices: usize,
}

struct DeviceStates {
    read_at: std::time::Instant,
    series: HashMap<(i64, SensorKey), SeriesState>,
}

/// What a group did to alarms, applied after its commit.
#[derive(Default)]
pub(crate) struct AlarmChanges {
    pub events: Vec<AlarmEvent>,
    last_ts: Vec<((DeviceKey, SensorKey), i64)>,
    rules_changed: bool,
}

impl AlarmWork {
    pub fn new(hub: Arc<AlarmHub>, webhooks: Vec<Arc<str>>, cached_devices: usize) -> Self {
        Self {
            hub,
            webhooks,
            generation: None,
            loaded_at: None,
            rules: Vec::new(),
            series: Vec::new(),
            by_sensor: HashMap::new(),
            by_device: FxHashMap::default(),
            last_ts: FxHashMap::default(),
            states: FxHashMap::default(),
            names: HashMap::new(),
            cached_devices,
        }
    }

    /// After a failed commit: everything is read again.
    pub fn forget(&mut self) {
        self.generation = None;
        self.by_device.clear();
        self.last_ts.clear();
        self.states.clear();
    }

    /// A device moved here from another hub (PostgreSQL): what this writer
    /// remembers of its series may be old.
    pub fn forget_device(&mut self, device: DeviceKey) {
        self.last_ts.retain(|(d, _), _| *d != device);
        self.states.remove(&device);
    }

    /// Some device's tags changed: which rules apply to it is read again.
    pub fn tags_changed(&self) {
        self.hub.rules_changed();
    }

    pub fn apply(&mut self, changes: AlarmChanges) {
        if changes.rules_changed {
            self.hub.rules_changed();
        }
        self.last_ts.extend(changes.last_ts);
        if self.last_ts.len() > self.cached_devices.saturating_mul(8) {
            self.last_ts.clear();
        }
        if self.by_device.len() > self.cached_devices {
            self.by_device.clear();
            self.names.clear();
        }
        if self.states.len() > self.cached_devices {
            self.states.clear();
        }
        let deliveries = !self.webhooks.is_empty() && !changes.events.is_empty();
        self.hub.committed(changes.events, deliveries);
    }

    /// Loads the rules when they may have changed.
    async fn rules(&mut self, tx: &mut WriteTx<'_>) -> Result<(), StoreError> {
        let generation = self.hub.generation();
        // On PostgreSQL other hubs change rules and tags too: read again
        // every RELOAD_SHARED.
        let stale = tx.shared() && self.loaded_at.is_none_or(|t| t.elapsed() >= RELOAD_SHARED);
        if self.generation == Some(generation) && !stale {
            return Ok(());
        }
        self.loaded_at = Some(std::time::Instant::now());
        self.rules = tx.load_rules().await?.into_iter().map(Arc::new).collect();
        self.series = self
            .rules
            .iter()
            .filter_map(|rule| match rule.spec.watch() {
                Watch::Series { sensor, eval } => Some(SeriesRule {
                    rule: Arc::clone(rule),
                    sensor: Arc::from(sensor),
                    eval,
                }),
                Watch::Inactivity(_) => None,
            })
            .collect();
        let mut by_sensor: HashMap<Arc<str>, SensorRules> = HashMap::new();
        for (i, s) in self.series.iter().enumerate() {
            let e = by_sensor.entry(Arc::clone(&s.sensor)).or_default();
            e.rules.push(i);
            e.filter.add(&s.eval);
        }
        self.by_sensor = by_sensor
            .into_iter()
            .map(|(k, v)| (k, Arc::new(v)))
            .collect();
        self.by_device.clear();
        self.names.clear();
        // Rule changes rewrite series states in the store.
        self.states.clear();
        self.generation = Some(generation);
        Ok(())
    }

    /// Evaluates the group's stored rows (before they are inserted: the
    /// newest stored ts of a series this writer does not know is read from
    /// the store). `sensor_names` names every sensor key in `rows`.
    ///
    /// Most series are idle and most values move none of their rules: a
    /// first pass over the rows keeps only each watched series' newest ts
    /// and whether one of its values passes its sensor's [`IdleFilter`];
    /// only those that do, or that have a state, are stepped through.
    pub async fn evaluate(
        &mut self,
        tx: &mut WriteTx<'_>,
        rows: &[RowToInsert],
        sensor_names: &(dyn Fn(SensorKey) -> Option<Arc<str>> + Sync),
        now: i64,
        out: &mut AlarmChanges,
    ) -> Result<(), StoreError> {
        self.rules(tx).await?;
        if self.series.is_empty() || rows.is_empty() {
            return Ok(());
        }
        self.applying(tx, rows).await?;
        // Per sensor key: its name and rules (None: no rule watches it).
        let mut sensors: FxHashMap<SensorKey, Option<NamedRules>> = FxHashMap::default();
        let mut seen: FxHashMap<(DeviceKey, SensorKey), Seen> = FxHashMap::default();
        let mut last: Option<(DeviceKey, bool)> = None;
        for r in rows {
            let device_watched = match last {
                Some((d, w)) if d == r.device => w,
                _ => {
                    let w = self.by_device.get(&r.device).is_some_and(|a| !a.is_empty());
                    last = Some((r.device, w));
                    w
                }
            };
            if !device_watched {
                continue;
            }
            let of_sensor = sensors.entry(r.sensor).or_insert_with(|| {
                let name = sensor_names(r.sensor)?;
                let rules = Arc::clone(self.by_sensor.get(&name)?);
                Some((name, rules))
            });
            let Some((_, rules)) = of_sensor else {
                continue;
            };
            let s = seen.entry((r.device, r.sensor)).or_insert(Seen {
                newest: i64::MIN,
                hot: false,
            });
            s.newest = s.newest.max(r.ts_ms);
            s.hot = s.hot || rules.filter.passes(r.value);
        }
        if seen.is_empty() {
            return Ok(());
        }
        let mut unknown: Vec<DeviceKey> = seen
            .keys()
            .filter(|k| !self.last_ts.contains_key(k))
            .map(|(d, _)| *d)
            .collect();
        unknown.sort_unstable();
        unknown.dedup();
        let mut stored_ts: FxHashMap<(DeviceKey, SensorKey), i64> = FxHashMap::default();
        for (d, s, t) in tx.latest_ts(&unknown).await? {
            stored_ts.insert((d, s), t);
        }
        let mut group_devices: Vec<DeviceKey> = seen.keys().map(|(d, _)| *d).collect();
        group_devices.sort_unstable();
        group_devices.dedup();
        self.read_states(tx, &group_devices).await?;
        // The series to step through: a value passed the filter, or one of
        // the series' rules is not idle. The others only move their ts.
        // Per series: its newest evaluated ts before this group, and its
        // points.
        let mut hot: BTreeMap<(DeviceKey, SensorKey), (i64, Points)> = BTreeMap::new();
        for (&(device, sensor), s) in &seen {
            let known = self
                .last_ts
                .get(&(device, sensor))
                .or(stored_ts.get(&(device, sensor)))
                .copied()
                .unwrap_or(i64::MIN);
            out.last_ts.push(((device, sensor), s.newest.max(known)));
            let pending = self
                .states
                .get(&device)
                .is_some_and(|ds| ds.series.keys().any(|&(_, k)| k == sensor));
            if s.hot || pending {
                hot.insert((device, sensor), (known, Vec::new()));
            }
        }
        if hot.is_empty() {
            return Ok(());
        }
        for r in rows {
            if let Some((_, points)) = hot.get_mut(&(r.device, r.sensor)) {
                points.push((r.ts_ms, r.value));
            }
        }
        let idle = SeriesState::default();
        let mut writes: Vec<(i64, DeviceKey, SensorKey, Option<String>)> = Vec::new();
        let mut fired: Vec<(Arc<Rule>, DeviceKey, Arc<str>, Transition)> = Vec::new();
        for ((device, sensor), (known, mut points)) in hot {
            // A device sends in time order, mostly.
            if !points.is_sorted_by_key(|p| p.0) {
                points.sort_by_key(|p| p.0);
            }
            let Some(Some((name, of_sensor))) = sensors.get(&sensor) else {
                continue;
            };
            let Some(applies) = self.by_device.get(&device) else {
                continue;
            };
            let Some(ds) = self.states.get_mut(&device) else {
                continue;
            };
            for &i in &of_sensor.rules {
                // `applies` is in rule order: a device's rules, searched.
                if applies.binary_search(&i).is_err() {
                    continue;
                }
                let s = &self.series[i];
                let key = (s.rule.id, sensor);
                // An idle series has no entry (most of them, most of the time).
                let state = ds.series.get(&key).unwrap_or(&idle);
                let mut probe = state.clone();
                probe.last_ts = probe.last_ts.max(known);
                let mut any = false;
                for &(ts, v) in &points {
                    if let Some(t) = probe.step(&s.eval, ts, v) {
                        fired.push((Arc::clone(&s.rule), device, Arc::clone(name), t));
                        any = true;
                    }
                }
                // The stored last_ts is only a floor (this writer's cache,
                // or the readings themselves, know the newest): a state is
                // written when something else in it changed.
                let moved = any
                    || probe.raising != state.raising
                    || probe.clearing != state.clearing
                    || probe.open != state.open
                    || probe.samples != state.samples;
                if moved {
                    let text =
                        (!probe.idle()).then(|| serde_json::to_string(&probe).unwrap_or_default());
                    writes.push((s.rule.id, device, sensor, text));
                }
                let was_idle = state.idle();
                if probe.idle() {
                    if !was_idle {
                        ds.series.remove(&key);
                    }
                } else {
                    ds.series.insert(key, probe);
                }
            }
        }
        tx.write_series(&writes).await?;
        for (rule, device, sensor, t) in fired {
            self.transition(tx, &rule, device, &sensor, t, now, out)
                .await?;
        }
        Ok(())
    }

    /// Which rules apply to the group's devices not yet known.
    async fn applying(
        &mut self,
        tx: &mut WriteTx<'_>,
        rows: &[RowToInsert],
    ) -> Result<(), StoreError> {
        let mut missing: Vec<DeviceKey> = Vec::new();
        let mut last = None;
        for r in rows {
            if last != Some(r.device) && !self.by_device.contains_key(&r.device) {
                missing.push(r.device);
            }
            last = Some(r.device);
        }
        if missing.is_empty() {
            return Ok(());
        }
        missing.sort_unstable();
        missing.dedup();
        for (device, name, tags) in tx.device_tags(&missing).await? {
            let applies: Vec<usize> = self
                .series
                .iter()
                .enumerate()
                .filter(|(_, s)| s.rule.spec.target.matches(&name, &tags))
                .map(|(i, _)| i)
                .collect();
            self.by_device.insert(device, applies.into());
            self.names.insert(device, Arc::from(name.as_str()));
        }
        Ok(())
    }

    /// Reads the series states of the devices this writer has none of (on
    /// PostgreSQL, also of those read more than RELOAD_SHARED ago).
    async fn read_states(
        &mut self,
        tx: &mut WriteTx<'_>,
        devices: &[DeviceKey],
    ) -> Result<(), StoreError> {
        let shared = tx.shared();
        let to_read: Vec<DeviceKey> = devices
            .iter()
            .filter(|d| {
                self.states
                    .get(d)
                    .is_none_or(|s| shared && s.read_at.elapsed() >= RELOAD_SHARED)
            })
            .copied()
            .collect();
        if to_read.is_empty() {
            return Ok(());
        }
        let read_at = std::time::Instant::now();
        for d in &to_read {
            self.states.insert(
                *d,
                DeviceStates {
                    read_at,
                    series: HashMap::new(),
                },
            );
        }
        for (rule, d, sensor, state) in tx.load_series(&to_read).await? {
            if let Some(ds) = self.states.get_mut(&d) {
                ds.series.insert((rule, sensor), state);
            }
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    async fn transition(
        &self,
        tx: &mut WriteTx<'_>,
        rule: &Rule,
        device: DeviceKey,
        sensor: &str,
        t: Transition,
        now: i64,
        out: &mut AlarmChanges,
    ) -> Result<(), StoreError> {
        let (alarm, kind, at) = match t {
            Transition::Raise { since, at, value } => {
                let name = self.device_name(tx, device).await?;
                let alarm = tx
                    .raise_alarm(rule, device, &name, sensor, Some(value), since, at, false)
                    .await?;
                let kind = raised_kind(alarm.as_ref());
                (alarm, kind, at)
            }
            Transition::Retrigger { at, value } => {
                match tx
                    .retrigger_alarm(rule.id, device, sensor, value, at)
                    .await?
                {
                    Some(alarm) => (Some(alarm), EventKind::Retriggered, at),
                    // No open alarm: an operator on another hub cleared it
                    // since this writer read the series (PostgreSQL, within
                    // RELOAD_SHARED). The condition held for its time anew:
                    // a new alarm.
                    None => {
                        let name = self.device_name(tx, device).await?;
                        let alarm = tx
                            .raise_alarm(rule, device, &name, sensor, Some(value), at, at, false)
                            .await?;
                        let kind = raised_kind(alarm.as_ref());
                        (alarm, kind, at)
                    }
                }
            }
            Transition::Clear { at, value } => (
                tx.clear_alarm_by_rule(rule.id, device, sensor, Some(value), at)
                    .await?,
                EventKind::Cleared,
                at,
            ),
        };
        if let Some(alarm) = alarm {
            self.event(tx, alarm, kind, at, now, out).await?;
        }
        Ok(())
    }

    async fn device_name(
        &self,
        tx: &mut WriteTx<'_>,
        device: DeviceKey,
    ) -> Result<String, StoreError> {
        if let Some(name) = self.names.get(&device) {
            return Ok(name.to_string());
        }
        Ok(tx
            .device_tags(&[device])
            .await?
            .into_iter()
            .next()
            .map(|(_, name, _)| name)
            .unwrap_or_default())
    }

    async fn event(
        &self,
        tx: &mut WriteTx<'_>,
        alarm: Alarm,
        kind: EventKind,
        at_ms: i64,
        now: i64,
        out: &mut AlarmChanges,
    ) -> Result<(), StoreError> {
        let id = tx
            .add_event(&alarm, kind, at_ms, &self.webhooks, now)
            .await?;
        out.events.push(AlarmEvent {
            id,
            kind,
            at_ms,
            alarm,
        });
        Ok(())
    }

    /// Carries out an operator's or the leader's change.
    pub async fn run(
        &mut self,
        tx: &mut WriteTx<'_>,
        op: &AlarmOp,
        now: i64,
        out: &mut AlarmChanges,
    ) -> Result<AlarmOutcome, StoreError> {
        Ok(match op {
            AlarmOp::PutRule(spec) => {
                out.rules_changed = true;
                // Readings later in this group see the new rule.
                self.generation = None;
                let (rule, cleared) = tx.put_rule(spec, now).await?;
                for alarm in cleared {
                    self.event(tx, alarm, EventKind::Cleared, now, now, out)
                        .await?;
                }
                AlarmOutcome::Rule(Box::new(rule))
            }
            AlarmOp::DeleteRule(name) => match tx.delete_rule(name, now).await? {
                Some((rule, cleared)) => {
                    out.rules_changed = true;
                    self.generation = None;
                    for alarm in cleared {
                        self.event(tx, alarm, EventKind::Cleared, now, now, out)
                            .await?;
                    }
                    AlarmOutcome::Deleted(Some(Box::new(rule)))
                }
                None => AlarmOutcome::Deleted(None),
            },
            AlarmOp::Ack { id, by, note } => match tx.ack_alarm(*id, by, note, now).await? {
                Some(alarm) => {
                    self.event(tx, alarm.clone(), EventKind::Acknowledged, now, now, out)
                        .await?;
                    AlarmOutcome::Changed(Box::new(alarm))
                }
                None => AlarmOutcome::Unchanged(tx.alarm(*id).await?.map(Box::new)),
            },
            AlarmOp::Clear { id, by, note } => {
                match tx.clear_alarm_by_operator(*id, by, note, now).await? {
                    Some(alarm) => {
                        // Its series state changed in the store.
                        self.states.remove(&DeviceKey(alarm.device_key));
                        self.event(tx, alarm.clone(), EventKind::Cleared, now, now, out)
                            .await?;
                        AlarmOutcome::Changed(Box::new(alarm))
                    }
                    None => AlarmOutcome::Unchanged(tx.alarm(*id).await?.map(Box::new)),
                }
            }
            AlarmOp::Inactivity {
                rule,
                version,
                raise,
                clear,
            } => {
                self.rules(tx).await?;
                // The rule as the leader read it, or nothing: a rule
                // changed or deleted since is judged again next round.
                let Some(rule) = self
                    .rules
                    .iter()
                    .find(|r| r.id == *rule && r.version == *version)
                    .cloned()
                else {
                    return Ok(AlarmOutcome::Count(0));
                };
                let sensor = rule.spec.sensor().to_owned();
                let after = match rule.spec.watch() {
                    Watch::Inactivity(i) => i.after.as_millis() as i64,
                    Watch::Series { .. } => return Ok(AlarmOutcome::Count(0)),
                };
                let mut n = 0;
                for s in raise {
                    // A reading may have come since the leader looked.
                    let last = tx.last_reading_ms(s.device, &sensor).await?;
                    if last.is_none_or(|last| now - last < after) {
                        continue;
                    }
                    if let Some(alarm) = tx
                        .raise_alarm(
                            &rule,
                            s.device,
                            &s.device_id,
                            &sensor,
                            None,
                            s.last_ms,
                            now,
                            true,
                        )
                        .await?
                    {
                        n += 1;
                        self.event(tx, alarm, EventKind::Raised, now, now, out)
                            .await?;
                    }
                }
                for (device, sensor) in clear {
                    if let Some(alarm) = tx
                        .clear_alarm_by_rule(rule.id, *device, sensor, None, now)
                        .await?
                    {
                        n += 1;
                        self.event(tx, alarm, EventKind::Cleared, now, now, out)
                            .await?;
                    }
                }
                AlarmOutcome::Count(n)
            }
            AlarmOp::Attempts(attempts) => {
                tx.record_attempts(attempts, now).await?;
                AlarmOutcome::Count(attempts.len() as u64)
            }
            AlarmOp::Prune { cutoff_ms, limit } => {
                AlarmOutcome::Count(tx.prune_alarms(*cutoff_ms, *limit).await?)
            }
        })
    }
}

/// A raise that found the series' alarm open counted a re-trigger on it.
fn raised_kind(alarm: Option<&Alarm>) -> EventKind {
    match alarm {
        Some(a) if a.count > 1 => EventKind::Retriggered,
        _ => EventKind::Raised,
    }
}
