//! Input formats: a record's value to the engine's [`Payload`] (plus the
//! event's own version), and a push's payload back to bytes.
//!
//! * `json`: the value is a JSON document; an optional numeric top-level
//!   field (`version` by default) is the event's version. Under `latest` the
//!   original bytes are pushed unchanged; under `json-merge-patch` the parsed
//!   document is folded and re-serialised.
//! * `raw`: opaque bytes, ordered by offset; `latest` only.
//!
//! A null value is a delete. Every failure is a [`DecodeError`] whose text is
//! the dead-letter reason; no input makes a decoder panic.

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::engine::{MergePolicy, Payload, Value};

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum InputFormat {
    #[default]
    Json,
    Raw,
}

/// Why a record cannot be processed (the dead-letter reason).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("invalid JSON: {0}")]
    Json(String),
    #[error("field `{field}` must be a non-negative integer version, found {found}")]
    Version { field: String, found: String },
}

impl DecodeError {
    /// A short, stable name for the reason (a header and a metric label).
    pub fn reason(&self) -> &'static str {
        match self {
            DecodeError::Json(_) => "invalid-json",
            DecodeError::Version { .. } => "invalid-version",
        }
    }
}

/// A decoded record value.
#[derive(Debug, Clone, PartialEq)]
pub struct Decoded {
    pub version: Option<u64>,
    pub payload: Payload,
}

/// Decodes values of one input format for one merge policy.
#[derive(Debug, Clone)]
pub struct Codec {
    format: InputFormat,
    policy: MergePolicy,
    version_field: String,
}

impl Codec {
    pub fn new(format: InputFormat, policy: MergePolicy, version_field: impl Into<String>) -> Self {
        Self {
            format,
            policy,
            version_field: version_field.into(),
        }
    }

    pub fn decode(&self, value: Option<&[u8]>) -> Result<Decoded, DecodeError> {
        let Some(bytes) = value else {
            return Ok(Decoded {
                version: None,
                payload: Payload::Tombstone,
            });
        };
        match self.format {
            InputFormat::Raw => Ok(Decoded {
                version: None,
                payload: Payload::Value(Value::Bytes(Bytes::copy_from_slice(bytes))),
            }),
            InputFormat::Json => {
                let document: serde_json::Value =
                    serde_json::from_slice(bytes).map_err(|e| DecodeError::Json(e.to_string()))?;
                let version = match document.get(&self.version_field) {
                    None | Some(serde_json::Value::Null) => None,
                    Some(found) => Some(found.as_u64().ok_or_else(|| DecodeError::Version {
                        field: self.version_field.clone(),
                        found: truncate(&found.to_string(), 64),
                    })?),
                };
                let value = match self.policy {
                    MergePolicy::Latest => Value::Bytes(Bytes::copy_from_slice(bytes)),
                    MergePolicy::JsonMergePatch => Value::Json(document),
                };
                Ok(Decoded {
                    version,
                    payload: Payload::Value(value),
                })
            }
        }
    }

    /// A stored value (a marker's, in this format) back as a payload, for
    /// seeding and compensation.
    pub fn stored(&self, value: Option<&Bytes>) -> Payload {
        match value {
            None => Payload::Tombstone,
            Some(bytes) => match (self.policy, serde_json::from_slice(bytes)) {
                (MergePolicy::JsonMergePatch, Ok(document)) => {
                    Payload::Value(Value::Json(document))
                }
                _ => Payload::Value(Value::Bytes(bytes.clone())),
            },
        }
    }

    /// The bytes a push carries (`None`: a tombstone).
    pub fn encode(&self, payload: &Payload) -> Option<Bytes> {
        match payload {
            Payload::Tombstone => None,
            Payload::Value(Value::Bytes(bytes)) => Some(bytes.clone()),
            Payload::Value(Value::Json(document)) => Some(Bytes::from(document.to_string())),
        }
    }
}

fn truncate(text: &str, max: usize) -> String {
    match text.char_indices().nth(max) {
        Some((cut, _)) => format!("{}…", &text[..cut]),
        None => text.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    fn json_codec(policy: MergePolicy) -> Codec {
        Codec::new(InputFormat::Json, policy, "version")
    }

    #[test]
    fn json_reads_the_version_and_keeps_bytes_under_latest() {
        let raw = br#"{"version": 7, "name": "x"}"#;
        let decoded = json_codec(MergePolicy::Latest).decode(Some(raw)).unwrap();
        assert_eq!(decoded.version, Some(7));
        assert_eq!(
            decoded.payload,
            Payload::Value(Value::Bytes(Bytes::from_static(raw)))
        );
        let codec = json_codec(MergePolicy::Latest);
        assert_eq!(
            codec.encode(&decoded.payload).as_deref(),
            Some(&raw[..]),
            "pushed unchanged"
        );
    }

    #[test]
    fn json_merge_patch_parses_the_document() {
        let decoded = json_codec(MergePolicy::JsonMergePatch)
            .decode(Some(br#"{"a": 1}"#))
            .unwrap();
        assert_eq!(decoded.version, None);
        assert_eq!(
            decoded.payload,
            Payload::Value(Value::Json(json!({"a": 1})))
        );
    }

    #[test]
    fn null_value_is_a_delete() {
        for codec in [
            json_codec(MergePolicy::Latest),
            Codec::new(InputFormat::Raw, MergePolicy::Latest, "version"),
        ] {
            assert_eq!(codec.decode(None).unwrap().payload, Payload::Tombstone);
            assert_eq!(codec.encode(&Payload::Tombstone), None);
        }
    }

    #[test]
    fn bad_json_and_bad_versions_are_reasons() {
        let codec = json_codec(MergePolicy::Latest);
        let err = codec.decode(Some(b"{not json")).unwrap_err();
        assert_eq!(err.reason(), "invalid-json");
        for bad in [
            &br#"{"version": -1}"#[..],
            br#"{"version": "3"}"#,
            br#"{"version": 1.5}"#,
        ] {
            let err = codec.decode(Some(bad)).unwrap_err();
            assert_eq!(err.reason(), "invalid-version", "{err}");
        }
        let custom = Codec::new(InputFormat::Json, MergePolicy::Latest, "seq");
        assert_eq!(
            custom
                .decode(Some(br#"{"seq": 4, "version": "x"}"#))
                .unwrap()
                .version,
            Some(4)
        );
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            for policy in [MergePolicy::Latest, MergePolicy::JsonMergePatch] {
                let _ = json_codec(policy).decode(Some(&bytes));
            }
            let raw = Codec::new(InputFormat::Raw, MergePolicy::Latest, "version");
            prop_assert!(raw.decode(Some(&bytes)).is_ok());
        }
    }
}
