//! How a series' readings move an alarm: plain code, no IO. The writer
//! feeds each series' committed readings in time order to
//! [`SeriesState::step`] and writes what it returns in the same commit.
//!
//! - Times are the readings' own: `raise_for` holds when the raise
//!   condition held on every reading from one stamped at least `raise_for`
//!   before the current one. An alarm's start, raise and clear times are
//!   readings' timestamps.
//! - A reading stamped at or before the newest one already evaluated for
//!   its series (late, or backfilled behind newer data) is stored but does
//!   not move the alarm: it cannot start, hold or break a condition
//!   "now" that later readings already decided.
//! - A rate rule keeps up to [`RATE_SAMPLES`] samples per window.

use serde::{Deserialize, Serialize};

use super::rules::{Check, CmpOp, Eval};

/// Samples a rate rule keeps per window (one per window/32 of time).
pub const RATE_SAMPLES: i64 = 32;

/// A condition holding since a reading's time.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Run {
    pub since: i64,
    /// Whether this run already raised or re-triggered the alarm.
    #[serde(default)]
    pub counted: bool,
}

/// One (rule, device, sensor)'s evaluation state. Stored while not idle.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SeriesState {
    /// The newest reading evaluated.
    #[serde(default)]
    pub last_ts: i64,
    /// The raise condition has held since.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub raising: Option<Run>,
    /// While an alarm is open: its clear condition has held since.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clearing: Option<i64>,
    /// An alarm of this series is open.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub open: bool,
    /// A rate rule's samples (ts, value), oldest first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub samples: Vec<(i64, f64)>,
}

/// What a reading did to its series' alarm.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Transition {
    /// The raise condition held for `raise_for`, from `since` to `at`.
    Raise { since: i64, at: i64, value: f64 },
    /// It held for `raise_for` again while the alarm was open.
    Retrigger { at: i64, value: f64 },
    /// The clear condition held for `clear_for`.
    Clear { at: i64, value: f64 },
}

impl SeriesState {
    /// Nothing worth storing: no condition pending, no alarm, no samples.
    pub fn idle(&self) -> bool {
        self.raising.is_none() && self.clearing.is_none() && !self.open && self.samples.is_empty()
    }

    /// Evaluates one reading. Late readings (stamped at or before the
    /// newest evaluated one) change nothing.
    pub fn step(&mut self, eval: &Eval, ts: i64, value: f64) -> Option<Transition> {
        if ts <= self.last_ts {
            return None;
        }
        self.last_ts = ts;
        let x = match eval.rate_window {
            Some(window) => self.rate(window, ts, value)?,
            None => value,
        };
        let raise = eval.raise.holds(x);
        if !raise {
            self.raising = None;
        }
        if !self.open {
            if !raise {
                return None;
            }
            let run = self.raising.get_or_insert(Run {
                since: ts,
                counted: false,
            });
            if ts - run.since < eval.raise_for {
                return None;
            }
            run.counted = true;
            self.open = true;
            self.clearing = None;
            return Some(Transition::Raise {
                since: run.since,
                at: ts,
                value: x,
            });
        }
        let mut retrigger = None;
        if raise {
            let run = self.raising.get_or_insert(Run {
                since: ts,
                counted: false,
            });
            if !run.counted && ts - run.since >= eval.raise_for {
                run.counted = true;
                retrigger = Some(Transition::Retrigger { at: ts, value: x });
            }
        }
        if eval.clear.holds(x) {
            let since = *self.clearing.get_or_insert(ts);
            if ts - since >= eval.clear_for {
                self.open = false;
                self.clearing = None;
                self.raising = None;
                return Some(Transition::Clear { at: ts, value: x });
            }
        } else {
            self.clearing = None;
        }
        retrigger
    }

    /// The change per minute over the window, once the kept samples span
    /// half of it; keeps one sample per window/32 and the newest sample
    /// at or before the window's start.
    fn rate(&mut self, window: i64, ts: i64, value: f64) -> Option<f64> {
        let spacing = (window / RATE_SAMPLES).max(1);
        if self.samples.last().is_none_or(|&(t, _)| ts - t >= spacing) {
            self.samples.push((ts, value));
        }
        let start = ts - window;
        let drop = self
            .samples
            .iter()
            .take_while(|&&(t, _)| t <= start)
            .count()
            .saturating_sub(1);
        self.samples.drain(..drop);
        let &(t0, v0) = self.samples.first()?;
        if ts - t0 < window / 2 || ts == t0 {
            return None;
        }
        let rate = (value - v0) / (ts - t0) as f64 * 60_000.0;
        rate.is_finite().then_some(rate)
    }

    /// An operator cleared the series' alarm: the condition must hold
    /// for `raise_for` again before another is raised.
    pub fn operator_cleared(&mut self) {
        self.open = false;
        self.clearing = None;
        self.raising = None;
    }
}

/// Which values could move an idle series of one sensor, for the sensor's
/// rules together: an idle threshold series changes only on a value its
/// raise condition holds for, so a group whose values pass none of them
/// (and whose series are all idle) needs no evaluation at all. A rate rule
/// keeps samples from every value: with one, every value passes.
#[derive(Debug, Clone, Default)]
pub struct IdleFilter {
    every: bool,
    /// The lowest `>`/`>=` line and the highest `<`/`<=` line.
    above: Option<Check>,
    below: Option<Check>,
    /// `==` and `!=` checks, as they are.
    other: Vec<Check>,
}

impl IdleFilter {
    pub fn add(&mut self, eval: &Eval) {
        if eval.rate_window.is_some() {
            self.every = true;
            return;
        }
        let c = eval.raise;
        // Of two lines the wider one passes every value the other does;
        // at the same value `>=` passes more than `>`.
        let wider = |old: &Option<Check>, lower: bool| match old {
            None => true,
            Some(o) if o.value == c.value => matches!(c.op, CmpOp::Ge | CmpOp::Le),
            Some(o) => (c.value < o.value) == lower,
        };
        match c.op {
            CmpOp::Gt | CmpOp::Ge => {
                if wider(&self.above, true) {
                    self.above = Some(c);
                }
            }
            CmpOp::Lt | CmpOp::Le => {
                if wider(&self.below, false) {
                    self.below = Some(c);
                }
            }
            CmpOp::Eq | CmpOp::Ne => self.other.push(c),
        }
    }

    /// Whether `value` could move an idle series of one of the rules
    /// added (false: it moves none of them).
    pub fn passes(&self, value: f64) -> bool {
        self.every
            || self.above.is_some_and(|c| c.holds(value))
            || self.below.is_some_and(|c| c.holds(value))
            || self.other.iter().any(|c| c.holds(value))
    }
}

/// One device (or device sensor) an inactivity rule looks at.
#[derive(Debug, Clone, PartialEq)]
pub struct Quiet {
    /// When the hub last stored a reading of it (its clock, ms); for a
    /// device that never sent one, when it was first seen.
    pub last_ms: i64,
    pub open: bool,
}

/// An inactivity rule's decision for one device: raise (silent for
/// `after`, and no alarm open), clear (a reading came, and an alarm is
/// open), or nothing.
pub fn inactivity(now_ms: i64, after_ms: i64, q: &Quiet) -> Option<bool> {
    let silent = now_ms - q.last_ms >= after_ms;
    match (silent, q.open) {
        (true, false) => Some(true),
        (false, true) => Some(false),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn eval(raise: &str, raise_for: i64, clear: &str, clear_for: i64) -> Eval {
        Eval {
            raise: Check::parse(raise).unwrap(),
            raise_for,
            clear: Check::parse(clear).unwrap(),
            clear_for,
            rate_window: None,
        }
    }

    /// Feeds (ts, value) pairs; the transitions, in order.
    fn run(e: &Eval, s: &mut SeriesState, points: &[(i64, f64)]) -> Vec<Transition> {
        points
            .iter()
            .filter_map(|&(t, v)| s.step(e, t, v))
            .collect()
    }

    #[test]
    fn hysteresis_raises_and_clears_exactly_once() {
        // > 30 for 60 s raises, < 28 for 60 s clears; 29 is in the band.
        let e = eval("> 30", 60_000, "< 28", 60_000);
        let mut s = SeriesState::default();
        let mut pts = Vec::new();
        let mut t = 0;
        for v in [
            25.0, 31.0, 32.0, 29.0, 31.0, 31.0, 31.0, 31.0, 31.0, 31.0, 31.0,
        ] {
            pts.push((t, v));
            t += 10_000;
        }
        // In the band and back above: still one alarm, no clear.
        for v in [
            29.0, 29.5, 31.0, 29.0, 27.0, 27.0, 27.0, 27.0, 27.0, 27.0, 27.0, 29.0, 27.0,
        ] {
            pts.push((t, v));
            t += 10_000;
        }
        let got = run(&e, &mut s, &pts);
        assert_eq!(got.len(), 2, "{got:?}");
        // The run that raised began at the 31.0 after the 29.0 (t=40 s).
        assert_eq!(
            got[0],
            Transition::Raise {
                since: 40_000,
                at: 100_000,
                value: 31.0
            }
        );
        assert!(matches!(got[1], Transition::Clear { value: 27.0, .. }));
        assert!(s.idle(), "{s:?}");
    }

    #[test]
    fn a_dip_shorter_than_the_hold_restarts_the_count() {
        let e = eval("> 30", 30_000, "<= 30", 0);
        let mut s = SeriesState::default();
        let pts = [
            (0, 31.0),
            (20_000, 31.0),
            (25_000, 10.0),
            (40_000, 31.0),
            (69_000, 31.0),
        ];
        assert!(run(&e, &mut s, &pts).is_empty());
        assert!(matches!(
            s.step(&e, 70_000, 31.0),
            Some(Transition::Raise { since: 40_000, .. })
        ));
    }

    #[test]
    fn late_readings_move_nothing() {
        let e = eval("> 30", 0, "<= 30", 0);
        let mut s = SeriesState::default();
        assert!(s.step(&e, 100, 10.0).is_none());
        // Older than the newest evaluated: stored elsewhere, ignored here.
        assert!(s.step(&e, 50, 99.0).is_none());
        assert!(s.step(&e, 100, 99.0).is_none());
        assert!(s.idle());
        assert!(matches!(
            s.step(&e, 101, 99.0),
            Some(Transition::Raise { .. })
        ));
    }

    #[test]
    fn retriggers_count_each_new_run() {
        let e = eval("> 30", 0, "< 20", 0);
        let mut s = SeriesState::default();
        let got = run(
            &e,
            &mut s,
            &[
                (1, 31.0),
                (2, 32.0),
                (3, 25.0),
                (4, 33.0),
                (5, 34.0),
                (6, 19.0),
            ],
        );
        assert_eq!(got.len(), 3, "{got:?}");
        assert!(matches!(got[1], Transition::Retrigger { at: 4, .. }));
        assert!(matches!(got[2], Transition::Clear { at: 6, .. }));
    }

    #[test]
    fn rate_of_change_per_minute() {
        // Rising 2 per minute over a 10-minute window: raise at > 1/min.
        let e = Eval {
            raise: Check {
                op: CmpOp::Gt,
                value: 1.0,
            },
            raise_for: 0,
            clear: Check {
                op: CmpOp::Le,
                value: 1.0,
            },
            clear_for: 0,
            rate_window: Some(600_000),
        };
        let mut s = SeriesState::default();
        let mut got = Vec::new();
        // Readings' timestamps are after 2000 (the hub refuses older), so
        // after a new state's last_ts of 0.
        let t0 = 1_000_000;
        for i in 0..=20 {
            let t = t0 + i * 60_000;
            if let Some(tr) = s.step(&e, t, 2.0 * i as f64) {
                got.push((i, tr));
            }
        }
        // Evaluated from half a window (5 min) on.
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].0, 5);
        assert!(s.samples.len() <= RATE_SAMPLES as usize + 1);
        // Flat from then on: clears once the window no longer rises.
        let mut clear = None;
        for i in 21..=40 {
            if let Some(tr) = s.step(&e, t0 + i * 60_000, 40.0) {
                clear = Some((i, tr));
                break;
            }
        }
        let (i, tr) = clear.expect("cleared");
        assert!(matches!(tr, Transition::Clear { .. }));
        // The window's first sample is minute i-10, worth 2(i-10) until
        // minute 30: (40 - 2(i-10)) / 10 <= 1 from minute 25 on.
        assert_eq!(i, 25);
    }

    #[test]
    fn state_survives_its_json() {
        let s = SeriesState {
            last_ts: 5,
            raising: Some(Run {
                since: 1,
                counted: true,
            }),
            clearing: Some(3),
            open: true,
            samples: vec![(1, 2.5)],
        };
        let text = serde_json::to_string(&s).unwrap();
        assert_eq!(serde_json::from_str::<SeriesState>(&text).unwrap(), s);
        assert_eq!(
            serde_json::to_string(&SeriesState::default()).unwrap(),
            r#"{"last_ts":0}"#
        );
    }

    #[test]
    fn inactivity_raises_after_silence_and_clears_on_a_reading() {
        let q = |last_ms, open| Quiet { last_ms, open };
        assert_eq!(inactivity(10_000, 5_000, &q(4_000, false)), Some(true));
        assert_eq!(inactivity(10_000, 5_000, &q(4_000, true)), None);
        assert_eq!(inactivity(10_000, 5_000, &q(9_000, true)), Some(false));
        assert_eq!(inactivity(10_000, 5_000, &q(9_000, false)), None);
    }

    fn check() -> impl Strategy<Value = Check> {
        let op = prop_oneof![
            Just(CmpOp::Gt),
            Just(CmpOp::Ge),
            Just(CmpOp::Lt),
            Just(CmpOp::Le),
            Just(CmpOp::Eq),
            Just(CmpOp::Ne),
        ];
        // Few distinct values, so that lines and readings meet often.
        (op, -3i32..3).prop_map(|(op, v)| Check {
            op,
            value: f64::from(v) / 2.0,
        })
    }

    proptest! {
        /// A value the filter stops leaves every idle series of its rules
        /// idle, with no transition: skipping it changes nothing.
        #[test]
        fn the_idle_filter_stops_only_values_that_move_nothing(
            raises in prop::collection::vec(check(), 1..6),
            rate in any::<bool>(),
            v in prop_oneof![(-8i32..8).prop_map(|v| f64::from(v) / 4.0), Just(f64::NAN)],
        ) {
            let evals: Vec<Eval> = raises
                .iter()
                .enumerate()
                .map(|(i, &raise)| Eval {
                    raise,
                    raise_for: 0,
                    clear: raise.negated(),
                    clear_for: 0,
                    rate_window: (rate && i == 0).then_some(60_000),
                })
                .collect();
            let mut filter = IdleFilter::default();
            for e in &evals {
                filter.add(e);
            }
            let moved = evals.iter().any(|e| {
                let mut s = SeriesState::default();
                s.step(e, 1_000, v).is_some() || !s.idle()
            });
            prop_assert!(filter.passes(v) || !moved, "{evals:?} {v}");
            // Without a rate rule it is exact: it passes what moves one.
            if !rate {
                prop_assert_eq!(filter.passes(v), moved, "{:?} {}", evals, v);
            }
        }
    }
}
