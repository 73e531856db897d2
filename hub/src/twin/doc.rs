//! A twin's documents as plain values: JSON merge patches (RFC 7386), the
//! limits every document keeps to, per-key update times, and the delta
//! between desired and reported. No IO: the writer calls these inside its
//! transaction, tests call them directly.

use serde_json::{Map, Value};

/// A twin document: always a JSON object at the root.
pub type Doc = Map<String, Value>;

/// What a document may be (`twin.*` settings).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DocLimits {
    /// Serialized (compact) size of a whole document.
    pub max_bytes: usize,
    /// Levels of nesting: `{"a":1}` is 1 deep, `{"a":{"b":1}}` 2.
    pub max_depth: usize,
    /// Bytes of one key.
    pub max_key_bytes: usize,
}

impl Default for DocLimits {
    fn default() -> Self {
        Self {
            max_bytes: 32 * 1024,
            max_depth: 10,
            max_key_bytes: 128,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DocError {
    #[error("not JSON: {0}")]
    NotJson(String),
    #[error("a twin patch is a JSON object")]
    NotObject,
    #[error(
        "the document would be {size} bytes, over the limit of {max} (twin.max_document_bytes)"
    )]
    TooLarge { size: usize, max: usize },
    #[error("the document is nested deeper than {max} levels (twin.max_depth)")]
    TooDeep { max: usize },
    #[error("a key is {len} bytes, over the limit of {max} (twin.max_key_bytes)")]
    KeyTooLong { len: usize, max: usize },
    #[error("a key is empty or holds a control character: {0:?}")]
    BadKey(String),
    #[error("a string holds a NUL character (\\u0000), which documents cannot store")]
    Nul,
}

/// Parses a merge patch: a JSON object whose keys and nesting are within
/// `limits` (its size is checked on the document it makes).
pub fn parse_patch(text: &str, limits: &DocLimits) -> Result<Doc, DocError> {
    if text.len() > limits.max_bytes.saturating_mul(2) {
        return Err(DocError::TooLarge {
            size: text.len(),
            max: limits.max_bytes,
        });
    }
    let value: Value = serde_json::from_str(text).map_err(|e| DocError::NotJson(e.to_string()))?;
    let Value::Object(patch) = value else {
        return Err(DocError::NotObject);
    };
    check_shape(&patch, limits, 1)?;
    Ok(patch)
}

/// Checks a whole document: shape and size.
pub fn check(doc: &Doc, limits: &DocLimits) -> Result<(), DocError> {
    check_shape(doc, limits, 1)?;
    let size = encoded_len(doc);
    if size > limits.max_bytes {
        return Err(DocError::TooLarge {
            size,
            max: limits.max_bytes,
        });
    }
    Ok(())
}

/// The compact JSON text of a document.
pub fn encode(doc: &Doc) -> String {
    // A map of JSON values always serializes.
    serde_json::to_string(doc).unwrap_or_else(|_| "{}".into())
}

/// A stored document; a value that is not an object (hand-edited) reads
/// as empty rather than failing the read.
pub fn decode(text: &str) -> Doc {
    match serde_json::from_str::<Value>(text) {
        Ok(Value::Object(doc)) => doc,
        _ => Doc::new(),
    }
}

fn encoded_len(doc: &Doc) -> usize {
    encode(doc).len()
}

fn check_shape(map: &Doc, limits: &DocLimits, depth: usize) -> Result<(), DocError> {
    if depth > limits.max_depth {
        return Err(DocError::TooDeep {
            max: limits.max_depth,
        });
    }
    for (key, value) in map {
        if key.len() > limits.max_key_bytes {
            return Err(DocError::KeyTooLong {
                len: key.len(),
                max: limits.max_key_bytes,
            });
        }
        if key.is_empty() || key.chars().any(char::is_control) {
            // (NUL is a control character: refused here too.)
            return Err(DocError::BadKey(key.chars().take(32).collect()));
        }
        check_value(value, limits, depth)?;
    }
    Ok(())
}

fn check_value(value: &Value, limits: &DocLimits, depth: usize) -> Result<(), DocError> {
    match value {
        Value::Object(inner) => check_shape(inner, limits, depth + 1),
        // PostgreSQL's jsonb cannot hold it: one such value would fail
        // every commit it is part of.
        Value::String(s) if s.contains('\0') => Err(DocError::Nul),
        Value::Array(items) => {
            if depth + 1 > limits.max_depth {
                return Err(DocError::TooDeep {
                    max: limits.max_depth,
                });
            }
            items
                .iter()
                .try_for_each(|v| check_value(v, limits, depth + 1))
        }
        _ => Ok(()),
    }
}

/// Applies a merge patch (RFC 7386): `null` deletes a key, an object merges
/// into an object, anything else replaces.
pub fn merge(target: &mut Doc, patch: &Doc) {
    for (key, value) in patch {
        match value {
            Value::Null => {
                target.remove(key);
            }
            Value::Object(inner) => {
                let slot = target
                    .entry(key.clone())
                    .or_insert_with(|| Value::Object(Doc::new()));
                if !slot.is_object() {
                    *slot = Value::Object(Doc::new());
                }
                if let Value::Object(existing) = slot {
                    merge(existing, inner);
                }
            }
            other => {
                target.insert(key.clone(), other.clone());
            }
        }
    }
}

/// Records when each key a patch set was last updated: the metadata
/// mirrors the document, with each leaf's time (ms) where the document has
/// its value; deleted keys leave it.
pub fn stamp(meta: &mut Doc, patch: &Doc, now_ms: i64) {
    merge(meta, &stamped(patch, now_ms));
}

fn stamped(patch: &Doc, now_ms: i64) -> Doc {
    patch
        .iter()
        .map(|(key, value)| {
            let stamp = match value {
                Value::Null => Value::Null,
                Value::Object(inner) if !inner.is_empty() => Value::Object(stamped(inner, now_ms)),
                _ => Value::from(now_ms),
            };
            (key.clone(), stamp)
        })
        .collect()
}

/// The desired keys whose value differs from the reported one, nested the
/// way the document is (as AWS computes a shadow's delta): an object on
/// both sides is compared key by key, anything else as a whole.
pub fn delta(desired: &Doc, reported: &Doc) -> Doc {
    let mut out = Doc::new();
    for (key, want) in desired {
        match (want, reported.get(key)) {
            (Value::Object(want), Some(Value::Object(have))) => {
                let inner = delta(want, have);
                if !inner.is_empty() {
                    out.insert(key.clone(), Value::Object(inner));
                }
            }
            (want, Some(have)) if want == have => {}
            (want, _) => {
                out.insert(key.clone(), want.clone());
            }
        }
    }
    out
}

/// The value at a path of keys, if there is one.
pub fn at<'a>(doc: &'a Doc, path: &[String]) -> Option<&'a Value> {
    let (first, rest) = path.split_first()?;
    let mut value = doc.get(first)?;
    for key in rest {
        value = value.as_object()?.get(key)?;
    }
    Some(value)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    fn doc(v: Value) -> Doc {
        match v {
            Value::Object(m) => m,
            _ => panic!("not an object"),
        }
    }

    #[test]
    fn merge_follows_rfc_7386_examples() {
        // The RFC's appendix A, for object roots.
        let cases = [
            (json!({"a":"b"}), json!({"a":"c"}), json!({"a":"c"})),
            (json!({"a":"b"}), json!({"b":"c"}), json!({"a":"b","b":"c"})),
            (json!({"a":"b"}), json!({"a":null}), json!({})),
            (
                json!({"a":"b","b":"c"}),
                json!({"a":null}),
                json!({"b":"c"}),
            ),
            (json!({"a":["b"]}), json!({"a":"c"}), json!({"a":"c"})),
            (json!({"a":"c"}), json!({"a":["b"]}), json!({"a":["b"]})),
            (
                json!({"a":{"b":"c"}}),
                json!({"a":{"b":"d","c":null}}),
                json!({"a":{"b":"d"}}),
            ),
            (json!({"a":[{"b":"c"}]}), json!({"a":[1]}), json!({"a":[1]})),
            (json!({"e":null}), json!({"a":1}), json!({"e":null,"a":1})),
            (
                json!({}),
                json!({"a":{"bb":{"ccc":null}}}),
                json!({"a":{"bb":{}}}),
            ),
            (
                json!({"a":"foo"}),
                json!({"a":{"b":1}}),
                json!({"a":{"b":1}}),
            ),
        ];
        for (target, patch, want) in cases {
            let mut t = doc(target.clone());
            merge(&mut t, &doc(patch.clone()));
            assert_eq!(Value::Object(t), want, "{target} + {patch}");
        }
    }

    #[test]
    fn delta_is_nested_with_the_path_from_the_root() {
        let desired = doc(json!({
            "rate": 2, "fw": "1.4", "led": {"color": "red", "on": true}, "list": [1, 2]
        }));
        let reported = doc(json!({
            "rate": 2, "fw": "1.3", "led": {"color": "red", "on": false}, "list": [1, 2], "extra": 1
        }));
        assert_eq!(
            Value::Object(delta(&desired, &reported)),
            json!({"fw": "1.4", "led": {"on": true}})
        );
        assert!(delta(&reported, &reported).is_empty());
        assert_eq!(
            Value::Object(delta(&doc(json!({"a": {"b": 1}})), &doc(json!({"a": 5})))),
            json!({"a": {"b": 1}})
        );
    }

    #[test]
    fn metadata_mirrors_the_document() {
        let mut meta = Doc::new();
        stamp(
            &mut meta,
            &doc(json!({"a": 1, "b": {"c": 2, "d": [1]}})),
            10,
        );
        assert_eq!(
            Value::Object(meta.clone()),
            json!({"a": 10, "b": {"c": 10, "d": 10}})
        );
        stamp(&mut meta, &doc(json!({"a": null, "b": {"c": 3}})), 20);
        assert_eq!(Value::Object(meta), json!({"b": {"c": 20, "d": 10}}));
    }

    #[test]
    fn limits_refuse_with_clear_errors() {
        let limits = DocLimits::default();
        assert!(matches!(
            parse_patch("[1]", &limits),
            Err(DocError::NotObject)
        ));
        assert!(matches!(
            parse_patch("{", &limits),
            Err(DocError::NotJson(_))
        ));
        let mut deep = String::from("1");
        for _ in 0..10 {
            deep = format!("{{\"k\":{deep}}}");
        }
        assert!(parse_patch(&deep, &limits).is_ok(), "10 levels are allowed");
        let deeper = format!("{{\"k\":{deep}}}");
        assert!(matches!(
            parse_patch(&deeper, &limits),
            Err(DocError::TooDeep { max: 10 })
        ));
        let long_key = format!("{{\"{}\":1}}", "k".repeat(129));
        assert!(matches!(
            parse_patch(&long_key, &limits),
            Err(DocError::KeyTooLong { len: 129, .. })
        ));
        assert!(parse_patch(&format!("{{\"{}\":1}}", "k".repeat(128)), &limits).is_ok());
        assert!(matches!(
            parse_patch("{\"a\\u001b[2J\":1}", &limits),
            Err(DocError::BadKey(_))
        ));
        assert!(matches!(
            parse_patch("{\"a\":[\"x\\u0000\"]}", &limits),
            Err(DocError::Nul)
        ));
        assert!(parse_patch("{\"a\":\"tab\\there\"}", &limits).is_ok());
        let big = doc(json!({"blob": "x".repeat(32 * 1024)}));
        assert!(matches!(
            check(&big, &limits),
            Err(DocError::TooLarge { .. })
        ));
        let fits = doc(json!({"b": "x".repeat(32 * 1024 - 8)}));
        assert_eq!(encode(&fits).len(), 32 * 1024);
        assert!(check(&fits, &limits).is_ok());
    }

    fn value() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            (-100i64..100).prop_map(Value::from),
            "[a-c]{0,2}".prop_map(Value::from),
        ];
        leaf.prop_recursive(3, 16, 3, |inner| {
            prop::collection::btree_map("[a-c]", inner, 0..3)
                .prop_map(|m| Value::Object(m.into_iter().collect()))
        })
    }

    fn object() -> impl Strategy<Value = Doc> {
        prop::collection::btree_map("[a-c]", value(), 0..4).prop_map(|m| m.into_iter().collect())
    }

    fn without_nulls(doc: &Doc) -> Doc {
        doc.iter()
            .filter(|(_, v)| !v.is_null())
            .map(|(k, v)| match v {
                Value::Object(inner) => (k.clone(), Value::Object(without_nulls(inner))),
                other => (k.clone(), other.clone()),
            })
            .collect()
    }

    proptest! {
        #![proptest_config(crate::fuzz_config())]

        /// Applying a patch twice is applying it once (a resent patch
        /// changes nothing more), and a patch's own non-null values are
        /// what the document then holds.
        #[test]
        fn merge_is_idempotent(mut target in object(), patch in object()) {
            merge(&mut target, &patch);
            let once = target.clone();
            merge(&mut target, &patch);
            prop_assert_eq!(&once, &target);
            let wanted = without_nulls(&patch);
            prop_assert!(delta(&wanted, &once).is_empty());
        }

        /// The delta is empty exactly when reported already holds what
        /// desired says, and applying the delta to reported empties it.
        #[test]
        fn applying_the_delta_converges(desired in object(), mut reported in object()) {
            let desired = without_nulls(&desired);
            let d = delta(&desired, &reported);
            merge(&mut reported, &d);
            prop_assert!(delta(&desired, &reported).is_empty());
        }
    }
}
