//! Payloads and merge policies: how the events of one key fold into the
//! value the next push carries.

use bytes::Bytes;
use serde::{Deserialize, Serialize};

/// A decoded event value.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    /// Opaque bytes (the `raw` input format, or any format under `latest`).
    Bytes(Bytes),
    /// A JSON document (needed by `json-merge-patch`).
    Json(serde_json::Value),
}

/// What a key holds after folding its events: a value, or a delete.
#[derive(Clone, Debug, PartialEq)]
pub enum Payload {
    Value(Value),
    /// The key was deleted (a record with a null value); pushed as a tombstone.
    Tombstone,
}

/// How the events that arrive while a push is in flight fold into the next.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MergePolicy {
    /// The newest event replaces everything before it.
    #[default]
    Latest,
    /// Events are RFC 7396 JSON merge patches applied in arrival order, so a
    /// push always carries the whole current document and no field is lost.
    JsonMergePatch,
}

/// An event the policy cannot fold.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MergeError {
    #[error("json-merge-patch needs a JSON value, got opaque bytes")]
    NotJson,
}

impl MergePolicy {
    /// Folds `incoming` into `current` (the key's whole value so far, `None`
    /// when nothing is known). On error `current` is left untouched.
    #[inline]
    pub fn fold(self, current: &mut Option<Payload>, incoming: Payload) -> Result<(), MergeError> {
        match (self, incoming) {
            (MergePolicy::Latest, incoming)
            | (MergePolicy::JsonMergePatch, incoming @ Payload::Tombstone) => {
                *current = Some(incoming);
            }
            (MergePolicy::JsonMergePatch, Payload::Value(Value::Json(patch))) => {
                let mut doc = match current.take() {
                    Some(Payload::Value(Value::Json(doc))) => doc,
                    // Nothing yet, a delete, or bytes: RFC 7396 patches an empty target.
                    _ => serde_json::Value::Null,
                };
                json_patch::merge(&mut doc, &patch);
                *current = Some(Payload::Value(Value::Json(doc)));
            }
            (MergePolicy::JsonMergePatch, Payload::Value(Value::Bytes(_))) => {
                return Err(MergeError::NotJson)
            }
        }
        Ok(())
    }

    /// Whether an idle key's value must stay in memory between pushes: a
    /// merge patch folds onto it, while `latest` never needs the old value.
    #[inline]
    pub fn retains_value(self) -> bool {
        matches!(self, MergePolicy::JsonMergePatch)
    }

    pub fn name(self) -> &'static str {
        match self {
            MergePolicy::Latest => "latest",
            MergePolicy::JsonMergePatch => "json-merge-patch",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn j(v: serde_json::Value) -> Payload {
        Payload::Value(Value::Json(v))
    }

    #[test]
    fn latest_replaces() {
        let mut cur = Some(j(json!({"a": 1})));
        MergePolicy::Latest
            .fold(&mut cur, j(json!({"b": 2})))
            .unwrap();
        assert_eq!(cur, Some(j(json!({"b": 2}))));
        MergePolicy::Latest
            .fold(&mut cur, Payload::Tombstone)
            .unwrap();
        assert_eq!(cur, Some(Payload::Tombstone));
    }

    #[test]
    fn merge_patch_folds_in_order_and_removes_nulls() {
        let p = MergePolicy::JsonMergePatch;
        let mut cur = None;
        p.fold(&mut cur, j(json!({"a": 1, "b": {"x": 1}}))).unwrap();
        p.fold(&mut cur, j(json!({"b": {"y": 2}, "c": 3}))).unwrap();
        p.fold(&mut cur, j(json!({"a": null, "c": 4}))).unwrap();
        assert_eq!(cur, Some(j(json!({"b": {"x": 1, "y": 2}, "c": 4}))));
    }

    #[test]
    fn merge_patch_after_delete_starts_from_empty() {
        let p = MergePolicy::JsonMergePatch;
        let mut cur = Some(j(json!({"a": 1})));
        p.fold(&mut cur, Payload::Tombstone).unwrap();
        p.fold(&mut cur, j(json!({"b": 2}))).unwrap();
        assert_eq!(cur, Some(j(json!({"b": 2}))));
    }

    #[test]
    fn merge_patch_rfc7396_examples() {
        // A selection of the examples in RFC 7396, appendix A.
        let cases = [
            (json!({"a": "b"}), json!({"a": "c"}), json!({"a": "c"})),
            (
                json!({"a": "b"}),
                json!({"b": "c"}),
                json!({"a": "b", "b": "c"}),
            ),
            (json!({"a": "b"}), json!({"a": null}), json!({})),
            (json!({"a": ["b"]}), json!({"a": "c"}), json!({"a": "c"})),
            (json!({"a": "c"}), json!({"a": ["b"]}), json!({"a": ["b"]})),
            (json!(["a", "b"]), json!(["c", "d"]), json!(["c", "d"])),
            (json!({"a": "b"}), json!(["c"]), json!(["c"])),
            (
                json!({"e": null}),
                json!({"a": 1}),
                json!({"e": null, "a": 1}),
            ),
            (
                json!([1, 2]),
                json!({"a": "b", "c": null}),
                json!({"a": "b"}),
            ),
        ];
        for (target, patch, expected) in cases {
            let mut cur = Some(j(target.clone()));
            MergePolicy::JsonMergePatch
                .fold(&mut cur, j(patch.clone()))
                .unwrap();
            assert_eq!(cur, Some(j(expected)), "target {target} patch {patch}");
        }
    }

    #[test]
    fn merge_patch_refuses_bytes_and_keeps_state() {
        let mut cur = Some(j(json!({"a": 1})));
        let err = MergePolicy::JsonMergePatch.fold(
            &mut cur,
            Payload::Value(Value::Bytes(Bytes::from_static(b"x"))),
        );
        assert_eq!(err, Err(MergeError::NotJson));
        assert_eq!(cur, Some(j(json!({"a": 1}))));
    }
}
