//! Alarm rules: what an operator writes, checked once here for every door.
//!
//! A rule is stored as the JSON of [`RuleSpec`]; exactly one of
//! `threshold`, `rate` or `inactivity` says what it watches:
//!
//! ```json
//! {"name": "hot", "severity": "major", "description": "cold room too warm",
//!  "target": {"tags": {"site": "north"}},
//!  "threshold": {"sensor": "temp", "raise": "> 30", "raise_for": "1m",
//!                "clear": "< 28", "clear_for": "1m"}}
//! ```

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Longest rule name.
pub const MAX_NAME: usize = 64;
/// Longest description.
pub const MAX_DESCRIPTION: usize = 1024;
/// Longest `for`, window or inactivity duration: 30 days.
pub const MAX_DURATION: Duration = Duration::from_secs(30 * 86_400);

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Severity {
    Critical,
    Major,
    Minor,
    Warning,
}

impl Severity {
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Critical => "critical",
            Severity::Major => "major",
            Severity::Minor => "minor",
            Severity::Warning => "warning",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "critical" => Severity::Critical,
            "major" => Severity::Major,
            "minor" => Severity::Minor,
            "warning" => Severity::Warning,
            _ => return None,
        })
    }
}

/// A comparison of a value with a constant: `> 30`, `<= -2.5`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Check {
    pub op: CmpOp,
    pub value: f64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CmpOp {
    Gt,
    Ge,
    Lt,
    Le,
    Eq,
    Ne,
}

impl CmpOp {
    fn as_str(self) -> &'static str {
        match self {
            CmpOp::Gt => ">",
            CmpOp::Ge => ">=",
            CmpOp::Lt => "<",
            CmpOp::Le => "<=",
            CmpOp::Eq => "==",
            CmpOp::Ne => "!=",
        }
    }
}

impl Check {
    pub fn holds(&self, v: f64) -> bool {
        match self.op {
            CmpOp::Gt => v > self.value,
            CmpOp::Ge => v >= self.value,
            CmpOp::Lt => v < self.value,
            CmpOp::Le => v <= self.value,
            CmpOp::Eq => v == self.value,
            CmpOp::Ne => v != self.value,
        }
    }

    /// The check that holds exactly when this one does not (for a finite
    /// value): the default clear condition.
    pub fn negated(&self) -> Check {
        let op = match self.op {
            CmpOp::Gt => CmpOp::Le,
            CmpOp::Ge => CmpOp::Lt,
            CmpOp::Lt => CmpOp::Ge,
            CmpOp::Le => CmpOp::Gt,
            CmpOp::Eq => CmpOp::Ne,
            CmpOp::Ne => CmpOp::Eq,
        };
        Check {
            op,
            value: self.value,
        }
    }

    pub fn parse(text: &str) -> Result<Check, RuleError> {
        let t = text.trim();
        let (op, rest) = [
            (">=", CmpOp::Ge),
            ("<=", CmpOp::Le),
            ("==", CmpOp::Eq),
            ("!=", CmpOp::Ne),
            (">", CmpOp::Gt),
            ("<", CmpOp::Lt),
            ("=", CmpOp::Eq),
        ]
        .iter()
        .find_map(|(p, op)| t.strip_prefix(p).map(|rest| (*op, rest)))
        .ok_or_else(|| {
            RuleError(format!(
                "condition {text:?}: expected > >= < <= == or != then a number"
            ))
        })?;
        let value: f64 = rest.trim().parse().map_err(|_| {
            RuleError(format!(
                "condition {text:?}: {:?} is not a number",
                rest.trim()
            ))
        })?;
        if !value.is_finite() {
            return Err(RuleError(format!(
                "condition {text:?}: the number must be finite"
            )));
        }
        Ok(Check { op, value })
    }
}

impl fmt::Display for Check {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.op.as_str(), self.value)
    }
}

impl Serialize for Check {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Check {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        Check::parse(&text).map_err(serde::de::Error::custom)
    }
}

/// Which devices a rule watches: one device, devices with all these tags,
/// or (neither given) every device.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Target {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub tags: BTreeMap<String, String>,
}

impl Target {
    pub fn matches(&self, device: &str, tags: &BTreeMap<String, String>) -> bool {
        self.device.as_deref().is_none_or(|d| d == device)
            && self.tags.iter().all(|(k, v)| tags.get(k) == Some(v))
    }
}

/// A value crossing a line, held for a while; cleared by its own
/// condition (hysteresis), by default the raise condition's opposite.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Threshold {
    pub sensor: String,
    pub raise: Check,
    #[serde(
        default,
        with = "humantime_serde",
        skip_serializing_if = "Duration::is_zero"
    )]
    pub raise_for: Duration,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clear: Option<Check>,
    #[serde(
        default,
        with = "humantime_serde",
        skip_serializing_if = "Duration::is_zero"
    )]
    pub clear_for: Duration,
}

/// The change per minute over a window: `(v - v₀) / (t - t₀)` with the
/// oldest kept sample in the window; evaluated once the samples span at
/// least half the window.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rate {
    pub sensor: String,
    #[serde(with = "humantime_serde")]
    pub window: Duration,
    /// On the change per minute.
    pub raise: Check,
    #[serde(
        default,
        with = "humantime_serde",
        skip_serializing_if = "Duration::is_zero"
    )]
    pub raise_for: Duration,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clear: Option<Check>,
    #[serde(
        default,
        with = "humantime_serde",
        skip_serializing_if = "Duration::is_zero"
    )]
    pub clear_for: Duration,
}

/// No reading from a device (or, with `sensor`, of that sensor) for
/// `after`, by the hub's clock.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Inactivity {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sensor: Option<String>,
    #[serde(with = "humantime_serde")]
    pub after: Duration,
}

/// A rule as an operator writes it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleSpec {
    pub name: String,
    pub severity: Severity,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub description: String,
    #[serde(default)]
    pub target: Target,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub threshold: Option<Threshold>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate: Option<Rate>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inactivity: Option<Inactivity>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct RuleError(pub String);

/// What a rule watches, in the form the evaluator uses.
#[derive(Debug, Clone, PartialEq)]
pub enum Watch<'a> {
    /// Readings of a sensor: a threshold or a rate.
    Series {
        sensor: &'a str,
        eval: Eval,
    },
    Inactivity(&'a Inactivity),
}

/// How one series is judged: the raise and clear checks with how long
/// each must hold (ms), and for a rate its window (ms).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Eval {
    pub raise: Check,
    pub raise_for: i64,
    pub clear: Check,
    pub clear_for: i64,
    pub rate_window: Option<i64>,
}

fn ms(d: Duration) -> i64 {
    d.as_millis().min(i64::MAX as u128) as i64
}

impl RuleSpec {
    /// Parses and checks a rule's JSON.
    pub fn from_json(text: &str) -> Result<RuleSpec, RuleError> {
        let spec: RuleSpec =
            serde_json::from_str(text).map_err(|e| RuleError(format!("bad rule: {e}")))?;
        spec.check()?;
        Ok(spec)
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }

    /// Every rule a door accepts passes this.
    pub fn check(&self) -> Result<(), RuleError> {
        let bad = |m: String| Err(RuleError(m));
        if self.name.is_empty() || self.name.len() > MAX_NAME {
            return bad(format!("a rule name is 1 to {MAX_NAME} bytes"));
        }
        if self.name.chars().any(|c| c.is_control() || c == '/') {
            return bad("a rule name has no control characters and no '/'".into());
        }
        if self.description.len() > MAX_DESCRIPTION {
            return bad(format!("a description is at most {MAX_DESCRIPTION} bytes"));
        }
        if let Some(d) = &self.target.device {
            crate::domain::DeviceId::parse(d)
                .map_err(|e| RuleError(format!("target.device: {e}")))?;
        }
        // target.tags are checked by the operator core (operator::check_tags).
        let kinds = usize::from(self.threshold.is_some())
            + usize::from(self.rate.is_some())
            + usize::from(self.inactivity.is_some());
        if kinds != 1 {
            return bad("a rule has exactly one of threshold, rate or inactivity".into());
        }
        let sensor_ok = |s: &str| -> Result<(), RuleError> {
            if s.is_empty()
                || s.len() > crate::domain::MAX_ID_LEN
                || s.chars().any(char::is_control)
            {
                return Err(RuleError(format!(
                    "a sensor name is 1 to {} bytes without control characters",
                    crate::domain::MAX_ID_LEN
                )));
            }
            Ok(())
        };
        let duration_ok = |what: &str, d: Duration, zero_ok: bool| -> Result<(), RuleError> {
            if d > MAX_DURATION || (!zero_ok && d.is_zero()) {
                return Err(RuleError(format!(
                    "{what} is {} to 30 days",
                    if zero_ok { "0" } else { "1ms" }
                )));
            }
            Ok(())
        };
        if let Some(t) = &self.threshold {
            sensor_ok(&t.sensor)?;
            duration_ok("raise_for", t.raise_for, true)?;
            duration_ok("clear_for", t.clear_for, true)?;
        }
        if let Some(r) = &self.rate {
            sensor_ok(&r.sensor)?;
            duration_ok("window", r.window, false)?;
            if r.window < Duration::from_secs(1) {
                return bad("a rate window is at least 1s".into());
            }
            duration_ok("raise_for", r.raise_for, true)?;
            duration_ok("clear_for", r.clear_for, true)?;
        }
        if let Some(i) = &self.inactivity {
            if let Some(s) = &i.sensor {
                sensor_ok(s)?;
            }
            duration_ok("after", i.after, false)?;
            if i.after < Duration::from_secs(1) {
                return bad("inactivity is at least 1s".into());
            }
        }
        Ok(())
    }

    pub fn watch(&self) -> Watch<'_> {
        if let Some(t) = &self.threshold {
            return Watch::Series {
                sensor: &t.sensor,
                eval: Eval {
                    raise: t.raise,
                    raise_for: ms(t.raise_for),
                    clear: t.clear.unwrap_or_else(|| t.raise.negated()),
                    clear_for: ms(t.clear_for),
                    rate_window: None,
                },
            };
        }
        if let Some(r) = &self.rate {
            return Watch::Series {
                sensor: &r.sensor,
                eval: Eval {
                    raise: r.raise,
                    raise_for: ms(r.raise_for),
                    clear: r.clear.unwrap_or_else(|| r.raise.negated()),
                    clear_for: ms(r.clear_for),
                    rate_window: Some(ms(r.window)),
                },
            };
        }
        match &self.inactivity {
            Some(i) => Watch::Inactivity(i),
            // check() guarantees one kind; an unchecked rule watches
            // nothing rather than panic.
            None => Watch::Inactivity(&NEVER),
        }
    }

    /// The sensor an alarm of this rule names ('' for a device-wide
    /// inactivity rule).
    pub fn sensor(&self) -> &str {
        match self.watch() {
            Watch::Series { sensor, .. } => sensor,
            Watch::Inactivity(i) => i.sensor.as_deref().unwrap_or(""),
        }
    }
}

static NEVER: Inactivity = Inactivity {
    sensor: None,
    after: MAX_DURATION,
};

/// A stored rule.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Rule {
    pub id: i64,
    pub version: u64,
    pub created_ms: i64,
    pub updated_ms: i64,
    #[serde(flatten)]
    pub spec: RuleSpec,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(json: &str) -> Result<RuleSpec, RuleError> {
        RuleSpec::from_json(json)
    }

    #[test]
    fn a_threshold_rule_parses_and_round_trips() {
        let s = spec(
            r#"{"name":"hot","severity":"major","target":{"tags":{"site":"n"}},
                "threshold":{"sensor":"temp","raise":"> 30","raise_for":"1m","clear":"<28","clear_for":"1m"}}"#,
        )
        .unwrap();
        let Watch::Series { sensor, eval } = s.watch() else {
            panic!("a series rule")
        };
        assert_eq!(sensor, "temp");
        assert_eq!(
            eval.raise,
            Check {
                op: CmpOp::Gt,
                value: 30.0
            }
        );
        assert_eq!(
            eval.clear,
            Check {
                op: CmpOp::Lt,
                value: 28.0
            }
        );
        assert_eq!((eval.raise_for, eval.clear_for), (60_000, 60_000));
        assert_eq!(RuleSpec::from_json(&s.to_json()).unwrap(), s);
    }

    #[test]
    fn the_default_clear_is_the_opposite() {
        let s =
            spec(r#"{"name":"x","severity":"minor","threshold":{"sensor":"t","raise":">= 5"}}"#)
                .unwrap();
        let Watch::Series { eval, .. } = s.watch() else {
            panic!()
        };
        assert!(eval.clear.holds(4.9) && !eval.clear.holds(5.0));
    }

    #[test]
    fn bad_rules_are_refused_with_a_reason() {
        for (json, why) in [
            (
                r#"{"name":"","severity":"major","threshold":{"sensor":"t","raise":">1"}}"#,
                "name",
            ),
            (
                r#"{"name":"a","severity":"huge","threshold":{"sensor":"t","raise":">1"}}"#,
                "huge",
            ),
            (r#"{"name":"a","severity":"major"}"#, "exactly one"),
            (
                r#"{"name":"a","severity":"major","threshold":{"sensor":"t","raise":"~1"}}"#,
                "expected",
            ),
            (
                r#"{"name":"a","severity":"major","threshold":{"sensor":"t","raise":"> x"}}"#,
                "not a number",
            ),
            (
                r#"{"name":"a","severity":"major","threshold":{"sensor":"t","raise":">1"},"rate":{"sensor":"t","window":"1m","raise":">1"}}"#,
                "exactly one",
            ),
            (
                r#"{"name":"a","severity":"major","inactivity":{"after":"0s"}}"#,
                "after",
            ),
            (
                r#"{"name":"a","severity":"major","inactivity":{"after":"1m"},"bogus":1}"#,
                "unknown field",
            ),
            (
                r#"{"name":"a","severity":"major","threshold":{"sensor":"t","raise":">1","raise_for":"400d"}}"#,
                "raise_for",
            ),
        ] {
            let err = spec(json).unwrap_err().to_string();
            assert!(err.contains(why), "{json}: {err}");
        }
    }

    #[test]
    fn targets_match_device_and_tags() {
        let tags: BTreeMap<String, String> = [("site".to_owned(), "n".to_owned())].into();
        let t = Target {
            device: None,
            tags: tags.clone(),
        };
        assert!(t.matches("d1", &tags));
        assert!(!t.matches("d1", &BTreeMap::new()));
        let d = Target {
            device: Some("d1".into()),
            tags: BTreeMap::new(),
        };
        assert!(d.matches("d1", &BTreeMap::new()) && !d.matches("d2", &tags));
        assert!(Target::default().matches("any", &BTreeMap::new()));
    }
}
