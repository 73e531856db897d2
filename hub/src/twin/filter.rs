//! The fleet filter: a small language over a device's tags, its twin's
//! reported and desired documents, `online` and `in_sync`.
//!
//! ```text
//! tags.site = plant-7 and reported.hello.firmware != 1.4
//! reported.battery < 20 and online = true
//! in_sync = false and desired.sample_rate_hz exists
//! ```
//! - `filter := clause ("and" clause)*`, `clause := field ("exists" | op literal)`,
//!   `op := = | != | < | >`.
//! - Fields: `tags.KEY`, `reported.K1.K2…`, `desired.K1.K2…`, `online`,
//!   `in_sync` (false: the delta is not empty). Keys are separated by dots.
//! - A literal is a bare word (`plant-7`, `1.4`, `20`, `true`) or a quoted
//!   string (`"a b"`, with `\"` and `\\`). A bare word equals a string of the
//!   same text, a number of the same value, or the boolean it names; a
//!   quoted one only a string.
//! - `!=` matches a device without the field (it does not have that value);
//!   `<` and `>` compare numbers and never match a field that is not one.
//!
//! This module parses and evaluates; `store` turns the same clauses into
//! SQL for each backend, so a listing filters in the database.

use std::collections::BTreeMap;
use std::fmt;

use serde_json::Value;

use super::doc::{Doc, at};

/// Longest filter text accepted.
pub const MAX_FILTER_BYTES: usize = 4096;
/// Most clauses in one filter.
pub const MAX_CLAUSES: usize = 16;

#[derive(Debug, Clone, PartialEq)]
pub enum Field {
    Online,
    InSync,
    Tag(String),
    Reported(Vec<String>),
    Desired(Vec<String>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Eq,
    Ne,
    Lt,
    Gt,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Literal {
    /// Unquoted: a string, a number or a boolean, whichever the field holds.
    Word(String),
    /// Quoted: a string only.
    Text(String),
}

impl Literal {
    /// The number a bare word names, if it names one.
    pub fn number(&self) -> Option<f64> {
        match self {
            Literal::Word(w) => w.parse::<f64>().ok().filter(|n| n.is_finite()),
            Literal::Text(_) => None,
        }
    }

    /// The boolean a bare word names, if it names one.
    pub fn boolean(&self) -> Option<bool> {
        match self {
            Literal::Word(w) if w == "true" => Some(true),
            Literal::Word(w) if w == "false" => Some(false),
            _ => None,
        }
    }

    /// The string it equals.
    pub fn string(&self) -> &str {
        match self {
            Literal::Word(s) | Literal::Text(s) => s,
        }
    }

    /// Whether a JSON value equals this literal.
    fn equals(&self, value: &Value) -> bool {
        match value {
            Value::String(s) => s == self.string(),
            Value::Number(n) => self
                .number()
                .zip(n.as_f64())
                .is_some_and(|(want, have)| want == have),
            Value::Bool(b) => self.boolean() == Some(*b),
            _ => false,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Test {
    Exists,
    Compare(Op, Literal),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Clause {
    pub field: Field,
    pub test: Test,
}

/// Clauses that must all hold. Empty matches every device.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Filter {
    pub clauses: Vec<Clause>,
}

/// What a filter looks at of one device.
#[derive(Debug, Clone, Copy)]
pub struct DeviceView<'a> {
    pub online: bool,
    pub in_sync: bool,
    pub tags: &'a BTreeMap<String, String>,
    pub reported: &'a Doc,
    pub desired: &'a Doc,
}

impl Filter {
    /// Every tag equal to the given value (the `key=value` selectors).
    pub fn tags(tags: &BTreeMap<String, String>) -> Self {
        Self {
            clauses: tags
                .iter()
                .map(|(k, v)| Clause {
                    field: Field::Tag(k.clone()),
                    test: Test::Compare(Op::Eq, Literal::Text(v.clone())),
                })
                .collect(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.clauses.is_empty()
    }

    /// Both filters' clauses.
    pub fn and(mut self, other: Filter) -> Self {
        self.clauses.extend(other.clauses);
        self
    }

    /// Whether some clause requires a tag's value or presence (a selector
    /// must: one device's own report cannot choose what operators send
    /// it). `tags.k != v` does not count: devices without the tag match it.
    pub fn names_a_tag(&self) -> bool {
        self.clauses.iter().any(|c| {
            matches!(c.field, Field::Tag(_))
                && matches!(c.test, Test::Exists | Test::Compare(Op::Eq, _))
        })
    }

    /// The clause about `online`, which only the hub's registry knows.
    pub fn online(&self) -> impl Iterator<Item = &Clause> {
        self.clauses
            .iter()
            .filter(|c| matches!(c.field, Field::Online))
    }

    pub fn matches(&self, device: &DeviceView<'_>) -> bool {
        self.clauses.iter().all(|c| c.matches(device))
    }
}

impl Clause {
    pub fn matches(&self, device: &DeviceView<'_>) -> bool {
        let tag;
        let value: Option<&Value> = match &self.field {
            Field::Online => return self.flag(device.online),
            Field::InSync => return self.flag(device.in_sync),
            Field::Tag(key) => {
                tag = device.tags.get(key).map(|v| Value::String(v.clone()));
                tag.as_ref()
            }
            Field::Reported(path) => at(device.reported, path),
            Field::Desired(path) => at(device.desired, path),
        };
        match &self.test {
            Test::Exists => value.is_some(),
            Test::Compare(Op::Eq, lit) => value.is_some_and(|v| lit.equals(v)),
            Test::Compare(Op::Ne, lit) => !value.is_some_and(|v| lit.equals(v)),
            Test::Compare(op, lit) => {
                let (Some(have), Some(want)) = (value.and_then(Value::as_f64), lit.number()) else {
                    return false;
                };
                if *op == Op::Lt {
                    have < want
                } else {
                    have > want
                }
            }
        }
    }

    /// `online` and `in_sync`: `= true|false` or `!=`; the parser allows no
    /// other test on them.
    pub fn flag(&self, have: bool) -> bool {
        match &self.test {
            Test::Compare(Op::Eq, lit) => lit.boolean() == Some(have),
            Test::Compare(Op::Ne, lit) => lit.boolean() == Some(!have),
            _ => false,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
enum Token {
    Word(String),
    Text(String),
    Op(Op),
}

fn tokens(text: &str) -> Result<Vec<Token>, String> {
    let mut out = Vec::new();
    let mut chars = text.char_indices().peekable();
    while let Some(&(at, c)) = chars.peek() {
        if c.is_whitespace() {
            chars.next();
            continue;
        }
        match c {
            '"' => {
                chars.next();
                let mut s = String::new();
                loop {
                    match chars.next() {
                        Some((_, '"')) => break,
                        Some((_, '\\')) => match chars.next() {
                            Some((_, e @ ('"' | '\\'))) => s.push(e),
                            _ => return Err(format!("a bad escape in the string at {at}")),
                        },
                        Some((_, c)) => s.push(c),
                        None => return Err(format!("the string at {at} is not closed")),
                    }
                }
                out.push(Token::Text(s));
            }
            '=' => {
                chars.next();
                out.push(Token::Op(Op::Eq));
            }
            '<' => {
                chars.next();
                out.push(Token::Op(Op::Lt));
            }
            '>' => {
                chars.next();
                out.push(Token::Op(Op::Gt));
            }
            '!' => {
                chars.next();
                match chars.next() {
                    Some((_, '=')) => out.push(Token::Op(Op::Ne)),
                    _ => return Err(format!("'!' at {at} must be part of '!='")),
                }
            }
            _ => {
                let mut w = String::new();
                while let Some(&(_, c)) = chars.peek() {
                    if c.is_whitespace() || matches!(c, '"' | '=' | '<' | '>' | '!') {
                        break;
                    }
                    w.push(c);
                    chars.next();
                }
                out.push(Token::Word(w));
            }
        }
    }
    Ok(out)
}

fn field(word: &str) -> Result<Field, String> {
    let (root, rest) = word.split_once('.').unwrap_or((word, ""));
    // Tags are one level: the rest is the key, dots and all (`k8s.io/zone`).
    if root == "tags" && !rest.is_empty() {
        return Ok(Field::Tag(rest.to_owned()));
    }
    let path: Vec<String> = if rest.is_empty() {
        Vec::new()
    } else {
        rest.split('.').map(str::to_owned).collect()
    };
    if path.iter().any(String::is_empty) {
        return Err(format!("{word:?}: a path has no empty keys"));
    }
    // A key of digits would read an array element on PostgreSQL and a
    // key on SQLite: neither is offered.
    if path.iter().any(|k| k.bytes().all(|b| b.is_ascii_digit())) {
        return Err(format!(
            "{word:?}: a path names object keys, not array positions"
        ));
    }
    match (root, path.len()) {
        ("online", 0) => Ok(Field::Online),
        ("in_sync", 0) => Ok(Field::InSync),
        ("tags", 1) => Ok(Field::Tag(path.into_iter().next().unwrap_or_default())),
        ("reported", n) if n > 0 => Ok(Field::Reported(path)),
        ("desired", n) if n > 0 => Ok(Field::Desired(path)),
        _ => Err(format!(
            "unknown field {word:?} (tags.KEY, reported.PATH, desired.PATH, online, in_sync)"
        )),
    }
}

/// Parses a filter; an empty text is the filter that matches everything.
pub fn parse(text: &str) -> Result<Filter, String> {
    if text.len() > MAX_FILTER_BYTES {
        return Err(format!("a filter is at most {MAX_FILTER_BYTES} bytes"));
    }
    if text.chars().any(char::is_control) {
        return Err("a filter holds no control characters".into());
    }
    let mut toks = tokens(text)?.into_iter().peekable();
    let mut clauses = Vec::new();
    while toks.peek().is_some() {
        if !clauses.is_empty() {
            match toks.next() {
                Some(Token::Word(w)) if w.eq_ignore_ascii_case("and") => {}
                other => {
                    return Err(format!(
                        "expected 'and' between clauses, found {}",
                        shown(other.as_ref())
                    ));
                }
            }
        }
        let field = match toks.next() {
            Some(Token::Word(w)) => field(&w)?,
            other => return Err(format!("expected a field, found {}", shown(other.as_ref()))),
        };
        let test = match toks.next() {
            Some(Token::Word(w)) if w.eq_ignore_ascii_case("exists") => Test::Exists,
            Some(Token::Op(op)) => {
                let lit = match toks.next() {
                    Some(Token::Word(w)) => Literal::Word(w),
                    Some(Token::Text(s)) => Literal::Text(s),
                    other => {
                        return Err(format!(
                            "expected a value after {op}, found {}",
                            shown(other.as_ref())
                        ));
                    }
                };
                if matches!(op, Op::Lt | Op::Gt) && lit.number().is_none() {
                    return Err(format!("{op} compares numbers, not {:?}", lit.string()));
                }
                Test::Compare(op, lit)
            }
            other => {
                return Err(format!(
                    "expected =, !=, <, > or exists, found {}",
                    shown(other.as_ref())
                ));
            }
        };
        if matches!(field, Field::Online | Field::InSync) {
            let ok =
                matches!(&test, Test::Compare(Op::Eq | Op::Ne, lit) if lit.boolean().is_some());
            if !ok {
                return Err("online and in_sync are = true or = false".into());
            }
        }
        clauses.push(Clause { field, test });
        if clauses.len() > MAX_CLAUSES {
            return Err(format!("a filter has at most {MAX_CLAUSES} clauses"));
        }
    }
    Ok(Filter { clauses })
}

fn shown(tok: Option<&Token>) -> String {
    match tok {
        None => "the end".into(),
        Some(Token::Word(w)) => format!("{w:?}"),
        Some(Token::Text(s)) => format!("\"{s}\""),
        Some(Token::Op(op)) => op.to_string(),
    }
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Op::Eq => "=",
            Op::Ne => "!=",
            Op::Lt => "<",
            Op::Gt => ">",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn doc(v: Value) -> Doc {
        v.as_object().cloned().unwrap_or_default()
    }

    #[test]
    fn the_issue_s_questions_parse_and_match() {
        let tags: BTreeMap<String, String> = [("site".into(), "plant-7".into())].into();
        let reported = doc(json!({"hello": {"firmware": "1.3"}, "battery": 15}));
        let desired = doc(json!({"sample_rate_hz": 2}));
        let view = DeviceView {
            online: true,
            in_sync: false,
            tags: &tags,
            reported: &reported,
            desired: &desired,
        };
        let yes = [
            "reported.hello.firmware != 1.4",
            "tags.site = plant-7 and in_sync = false",
            "reported.battery < 20",
            "reported.battery>10 AND online=true",
            "desired.sample_rate_hz exists",
            "desired.sample_rate_hz = 2",
            "tags.site = \"plant-7\"",
            "reported.missing != x",
            "",
        ];
        for text in yes {
            let f = parse(text).unwrap_or_else(|e| panic!("{text}: {e}"));
            assert!(f.matches(&view), "{text}");
        }
        let no = [
            "reported.hello.firmware = 1.4",
            "reported.battery > 20",
            "tags.site = plant-8",
            "in_sync = true",
            "online != true",
            "reported.missing exists",
            "reported.missing = x",
            "reported.battery = \"15\"",
            "reported.hello < 5",
        ];
        for text in no {
            let f = parse(text).unwrap_or_else(|e| panic!("{text}: {e}"));
            assert!(!f.matches(&view), "{text}");
        }
    }

    #[test]
    fn numbers_strings_and_booleans_compare_by_kind() {
        let tags = BTreeMap::new();
        let reported = doc(json!({"fw": 1.4, "on": true, "s": "1.40"}));
        let empty = Doc::new();
        let view = DeviceView {
            online: false,
            in_sync: true,
            tags: &tags,
            reported: &reported,
            desired: &empty,
        };
        let m = |t: &str| parse(t).unwrap().matches(&view);
        assert!(m("reported.fw = 1.4"));
        assert!(m("reported.fw = 1.40"));
        assert!(!m("reported.fw = \"1.4\""));
        assert!(m("reported.on = true"));
        assert!(!m("reported.on = 1"));
        assert!(m("reported.s = 1.40"));
        assert!(!m("reported.s = 1.4"));
    }

    #[test]
    fn bad_filters_say_why() {
        for (text, why) in [
            ("firmware = 1", "unknown field"),
            ("tags = a", "unknown field"),
            ("reported.list.0 = 1", "array positions"),
            ("reported..a = 1", "empty keys"),
            ("reported.a ~ 1", "expected =, !=, <, > or exists"),
            ("reported.a < big", "compares numbers"),
            ("reported.a = 1 or reported.b = 2", "expected 'and'"),
            ("reported.a =", "expected a value"),
            ("online = yes", "= true or = false"),
            ("online exists", "= true or = false"),
            ("reported.a = \"open", "not closed"),
            ("reported.a ! 1", "'!='"),
            ("reported.a = \u{1b}", "control"),
        ] {
            let err = parse(text).unwrap_err();
            assert!(err.contains(why), "{text}: {err}");
        }
        let many = vec!["online = true"; MAX_CLAUSES + 1].join(" and ");
        assert!(parse(&many).unwrap_err().contains("at most"));
    }

    #[test]
    fn label_selectors_are_tag_clauses() {
        let want: BTreeMap<String, String> = [("site".into(), "a b".into())].into();
        let f = Filter::tags(&want);
        assert!(f.names_a_tag());
        assert_eq!(f, parse("tags.site = \"a b\"").unwrap());
        assert!(!parse("reported.site = a").unwrap().names_a_tag());
        assert!(parse("tags.site exists").unwrap().names_a_tag());
        // Matched by every device without the tag: not a selection.
        assert!(!parse("tags.x != y").unwrap().names_a_tag());
        assert_eq!(
            parse("tags.k8s.io/zone = a").unwrap().clauses[0].field,
            Field::Tag("k8s.io/zone".into())
        );
    }
}
