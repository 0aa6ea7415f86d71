//! Input formats: a record's value to the engine's [`Payload`] (plus the
//! event's own version), and a push's payload back to bytes.
//!
//! * `json`: the value is a JSON document; an optional numeric top-level
//!   field (`version` by default) is the event's version. Under `latest` the
//!   original bytes are pushed unchanged; under `json-merge-patch` the parsed
//!   document is folded and re-serialised.
//! * `avro`: the record of `schemas/event.avsc` (an optional version and a
//!   map of scalar attributes; merge patches apply to the map), framed with
//!   Avro single-object encoding (`C3 01` + the schema's 8-byte Rabin
//!   fingerprint) or Confluent's wire format (`00` + the 4-byte big-endian
//!   Schema Registry id, which must be `input.schema_id`). Under `latest` the
//!   original bytes are pushed unchanged; otherwise pushes are re-encoded
//!   with the same schema and framing.
//! * `raw`: opaque bytes, ordered by offset; `latest` only.
//!
//! A null value is a delete. Every failure is a [`DecodeError`] whose text is
//! the dead-letter reason; no input makes a decoder panic.

mod avro;
mod json;

use apache_avro::GenericSingleObjectReader;
use apache_avro::Schema;
use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::engine::{MergePolicy, Payload, Value};

use avro::{avro_event, avro_fields};
pub use avro::{AvroFraming, EVENT_SCHEMA};
use json::{top_level_field, truncate};

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum InputFormat {
    #[default]
    Json,
    Avro,
    Raw,
}

/// Why a record cannot be processed (the dead-letter reason).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("invalid JSON: {0}")]
    Json(String),
    #[error("field `{field}` must be a non-negative integer version, found {found}")]
    Version { field: String, found: String },
    #[error("the delete's version header must be a non-negative integer, found {0:?}")]
    DeleteVersion(String),
    #[error("invalid Avro event (schemas/event.avsc): {0}")]
    Avro(String),
    #[error("a record without a key cannot be merged per key")]
    NullKey,
    #[error("the value is {size} bytes, above input.max_value_bytes = {max}")]
    TooLarge { size: usize, max: usize },
}

impl DecodeError {
    /// A short, stable name for the reason (a header and a metric label).
    pub fn reason(&self) -> &'static str {
        match self {
            DecodeError::Json(_) => "invalid-json",
            DecodeError::Version { .. } | DecodeError::DeleteVersion(_) => "invalid-version",
            DecodeError::Avro(_) => "invalid-avro",
            DecodeError::NullKey => "null-key",
            DecodeError::TooLarge { .. } => "too-large",
        }
    }
}

/// A delete's version from its header (`deletes.version_header`): decimal.
/// The processor and `verify` read it alike.
pub fn delete_version(header: &[u8]) -> Result<u64, DecodeError> {
    std::str::from_utf8(header)
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| DecodeError::DeleteVersion(String::from_utf8_lossy(header).into_owned()))
}

/// A decoded record value.
#[derive(Debug, Clone, PartialEq)]
pub struct Decoded {
    pub version: Option<u64>,
    pub payload: Payload,
}

impl Decoded {
    /// A null value: the key's delete.
    const TOMBSTONE: Decoded = Decoded {
        version: None,
        payload: Payload::Tombstone,
    };
}

/// Decodes values of one input format for one merge policy.
pub struct Codec {
    format: InputFormat,
    policy: MergePolicy,
    version_field: String,
    max_value_bytes: usize,
    avro: Option<(Schema, GenericSingleObjectReader)>,
    /// `C3 01` and the event schema's fingerprint, computed once.
    single_object_header: Vec<u8>,
    framing: AvroFraming,
    schema_id: u32,
}

/// Values above this are refused unless configured otherwise: 960 KiB, so
/// that a value with its key and headers fits librdkafka's default
/// `message.max.bytes` (1 000 000; see [`crate::kafka::limits`]).
pub const DEFAULT_MAX_VALUE_BYTES: usize = 960 * 1024;

impl Codec {
    pub fn new(format: InputFormat, policy: MergePolicy, version_field: impl Into<String>) -> Self {
        let avro = (format == InputFormat::Avro).then(|| {
            let schema = Schema::parse_str(EVENT_SCHEMA)
                .expect("schemas/event.avsc is valid (checked by tests)");
            let reader =
                GenericSingleObjectReader::new(schema.clone()).expect("event schema resolves");
            (schema, reader)
        });
        Self {
            format,
            policy,
            version_field: version_field.into(),
            max_value_bytes: DEFAULT_MAX_VALUE_BYTES,
            single_object_header: avro.as_ref().map_or_else(Vec::new, |(schema, _)| {
                let header = apache_avro::headers::RabinFingerprintHeader::from_schema(schema);
                apache_avro::headers::HeaderBuilder::build_header(&header)
            }),
            avro,
            framing: AvroFraming::SingleObject,
            schema_id: 0,
        }
    }

    /// Reads and writes Avro with `framing`; `schema_id` is the Schema
    /// Registry id Confluent framing expects and writes.
    pub fn with_avro_framing(mut self, framing: AvroFraming, schema_id: u32) -> Self {
        self.framing = framing;
        self.schema_id = schema_id;
        self
    }

    /// Refuses values above `max` bytes (see [`Codec::decode_record`]).
    pub fn with_max_value_bytes(mut self, max: usize) -> Self {
        self.max_value_bytes = max;
        // A corrupt Avro length prefix must not make the decoder reserve
        // gigabytes: bound any single allocation (a process-wide setting,
        // the first codec sets it).
        apache_avro::util::max_allocation_bytes(max.saturating_mul(8).max(64 * 1024 * 1024));
        self
    }

    /// Decides what a consumed record is: an event (its version and payload)
    /// or a dead letter (the error says why). The one rule both `run` and
    /// `verify` apply, so they always agree on what is dead-lettered.
    pub fn decode_record(
        &self,
        key: Option<&[u8]>,
        value: Option<&[u8]>,
    ) -> Result<Decoded, DecodeError> {
        self.refuse(key, value.map(<[u8]>::len))?;
        self.decode(value)
    }

    /// [`Codec::decode_record`] of a value already held in `Bytes`: a
    /// payload kept as it came shares it rather than copying it.
    pub fn decode_record_bytes(
        &self,
        key: Option<&[u8]>,
        value: Option<&Bytes>,
    ) -> Result<Decoded, DecodeError> {
        self.refuse(key, value.map(Bytes::len))?;
        match value {
            None => Ok(Decoded::TOMBSTONE),
            Some(bytes) => self.decode_value(bytes, || bytes.clone()),
        }
    }

    /// The record-level rules: a key, and a value within the size bound.
    fn refuse(&self, key: Option<&[u8]>, value_size: Option<usize>) -> Result<(), DecodeError> {
        if key.is_none() {
            return Err(DecodeError::NullKey);
        }
        if let Some(size) = value_size.filter(|&n| n > self.max_value_bytes) {
            return Err(DecodeError::TooLarge {
                size,
                max: self.max_value_bytes,
            });
        }
        Ok(())
    }

    pub fn decode(&self, value: Option<&[u8]>) -> Result<Decoded, DecodeError> {
        match value {
            None => Ok(Decoded::TOMBSTONE),
            Some(bytes) => self.decode_value(bytes, || Bytes::copy_from_slice(bytes)),
        }
    }

    /// Decodes a value; `kept` gives it as `Bytes` where the payload is
    /// the value as it came.
    fn decode_value(
        &self,
        bytes: &[u8],
        kept: impl FnOnce() -> Bytes,
    ) -> Result<Decoded, DecodeError> {
        match self.format {
            InputFormat::Raw => Ok(Decoded {
                version: None,
                payload: Payload::Value(Value::Bytes(kept())),
            }),
            InputFormat::Avro => {
                let (version, fields) = avro_fields(self.read_avro(bytes)?)?;
                let value = match self.policy {
                    MergePolicy::Latest => Value::Bytes(kept()),
                    MergePolicy::JsonMergePatch => Value::Json(serde_json::Value::Object(fields)),
                };
                Ok(Decoded {
                    version,
                    payload: Payload::Value(value),
                })
            }
            InputFormat::Json => {
                let json = |e: serde_json::Error| DecodeError::Json(e.to_string());
                // Under `latest` the document is pushed as it came: read the
                // version field only, without building the document.
                let (found, value) = match self.policy {
                    MergePolicy::Latest => (
                        top_level_field(bytes, &self.version_field).map_err(json)?,
                        Value::Bytes(kept()),
                    ),
                    MergePolicy::JsonMergePatch => {
                        let document: serde_json::Value =
                            serde_json::from_slice(bytes).map_err(json)?;
                        (
                            document.get(&self.version_field).cloned(),
                            Value::Json(document),
                        )
                    }
                };
                let version = match found {
                    None | Some(serde_json::Value::Null) => None,
                    Some(found) => Some(found.as_u64().ok_or_else(|| DecodeError::Version {
                        field: self.version_field.clone(),
                        found: truncate(&found.to_string(), 64),
                    })?),
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
            Some(bytes) => match self.decode(Some(bytes)) {
                Ok(decoded) => decoded.payload,
                Err(_) => Payload::Value(Value::Bytes(bytes.clone())),
            },
        }
    }

    /// The bytes a push of `version` carries (`None`: a tombstone).
    pub fn encode(&self, payload: &Payload, version: u64) -> Option<Bytes> {
        match payload {
            Payload::Tombstone => None,
            Payload::Value(Value::Bytes(bytes)) => Some(bytes.clone()),
            Payload::Value(Value::Json(document)) => match &self.avro {
                Some((schema, _)) => Some(self.write_avro(schema, avro_event(version, document))),
                None => Some(Bytes::from(document.to_string())),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use apache_avro::types::Value as Avro;
    use proptest::prelude::*;
    use serde_json::json;

    fn json_codec(policy: MergePolicy) -> Codec {
        Codec::new(InputFormat::Json, policy, "version")
    }

    #[test]
    fn a_value_in_bytes_is_shared_not_copied_and_decodes_alike() {
        let value = Bytes::from_static(br#"{"version": 7, "a": 1}"#);
        for format in [InputFormat::Json, InputFormat::Raw] {
            let codec = Codec::new(format, MergePolicy::Latest, "version");
            let shared = codec.decode_record_bytes(Some(b"k"), Some(&value)).unwrap();
            let copied = codec.decode_record(Some(b"k"), Some(&value)).unwrap();
            assert_eq!(shared, copied);
            let Payload::Value(Value::Bytes(payload)) = shared.payload else {
                panic!("latest keeps the value as it came");
            };
            assert_eq!(payload.as_ptr(), value.as_ptr(), "{format:?}: shared");
        }
        let codec = json_codec(MergePolicy::Latest).with_max_value_bytes(4);
        let refused = |r: Result<Decoded, DecodeError>| r.unwrap_err().reason();
        assert_eq!(
            refused(codec.decode_record_bytes(Some(b"k"), Some(&value))),
            refused(codec.decode_record(Some(b"k"), Some(&value)))
        );
        assert_eq!(
            refused(codec.decode_record_bytes(None, None)),
            refused(codec.decode_record(None, None))
        );
        assert_eq!(
            codec.decode_record_bytes(Some(b"k"), None).unwrap().payload,
            Payload::Tombstone
        );
    }

    proptest! {
        #[test]
        fn the_version_reader_agrees_with_a_full_parse(doc in json_document(), field in "[a-c]{1}") {
            let text = doc.to_string();
            let full = serde_json::from_str::<serde_json::Value>(&text)
                .unwrap()
                .get(&field)
                .cloned();
            prop_assert_eq!(top_level_field(text.as_bytes(), &field).unwrap(), full);
        }

        #[test]
        fn the_version_reader_refuses_what_a_full_parse_refuses(bytes in proptest::collection::vec(any::<u8>(), 0..40)) {
            let full = serde_json::from_slice::<serde_json::Value>(&bytes).is_ok();
            prop_assert_eq!(top_level_field(&bytes, "version").is_ok(), full);
        }
    }

    #[test]
    fn the_version_reader_matches_a_field_name_written_with_escapes() {
        let text = br#"{"vers\u0069on": 7, "a\"b": 1}"#;
        assert_eq!(top_level_field(text, "version").unwrap(), Some(json!(7)));
        assert_eq!(top_level_field(text, "a\"b").unwrap(), Some(json!(1)));
    }

    fn json_document() -> impl Strategy<Value = serde_json::Value> {
        let leaf = prop_oneof![
            Just(serde_json::Value::Null),
            any::<bool>().prop_map(serde_json::Value::from),
            any::<i64>().prop_map(serde_json::Value::from),
            "[a-z]{0,4}".prop_map(serde_json::Value::from),
        ];
        leaf.prop_recursive(3, 24, 4, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..4).prop_map(serde_json::Value::from),
                proptest::collection::btree_map("[a-c]{1}", inner, 0..4)
                    .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
            ]
        })
    }

    fn confluent(policy: MergePolicy, id: u32) -> Codec {
        Codec::new(InputFormat::Avro, policy, "version")
            .with_avro_framing(AvroFraming::Confluent, id)
    }

    #[test]
    fn confluent_framing_round_trips_and_checks_the_schema_id() {
        let codec = confluent(MergePolicy::JsonMergePatch, 42);
        let payload = Payload::Value(Value::Json(json!({"name": "x", "n": 3})));
        let bytes = codec.encode(&payload, 9).unwrap();
        assert_eq!(&bytes[..5], &[0, 0, 0, 0, 42], "magic byte, big-endian id");
        let decoded = codec.decode(Some(&bytes)).unwrap();
        assert_eq!(decoded.version, Some(9));
        assert_eq!(decoded.payload, payload);

        let other = confluent(MergePolicy::JsonMergePatch, 43).decode(Some(&bytes));
        let error = other.unwrap_err();
        assert_eq!(error.reason(), "invalid-avro");
        assert!(
            error
                .to_string()
                .contains("schema id 42, expected input.schema_id = 43"),
            "{error}"
        );

        let single_object = Codec::new(InputFormat::Avro, MergePolicy::JsonMergePatch, "version")
            .encode(&payload, 9)
            .unwrap();
        assert!(codec
            .decode(Some(&single_object))
            .unwrap_err()
            .to_string()
            .contains("Confluent wire format"));
        assert!(
            codec.decode(Some(&[0, 0, 0])).is_err(),
            "too short for an id"
        );
    }

    #[test]
    fn confluent_latest_pushes_the_original_bytes() {
        let writer = confluent(MergePolicy::JsonMergePatch, 5);
        let bytes = writer
            .encode(&Payload::Value(Value::Json(json!({"a": 1}))), 3)
            .unwrap();
        let latest = confluent(MergePolicy::Latest, 5);
        let decoded = latest.decode(Some(&bytes)).unwrap();
        assert_eq!(decoded.version, Some(3));
        assert_eq!(latest.encode(&decoded.payload, 3).unwrap(), bytes);
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
            codec.encode(&decoded.payload, 7).as_deref(),
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
            assert_eq!(codec.encode(&Payload::Tombstone, 1), None);
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

    fn avro_event_bytes(version: Option<u64>, fields: &[(&str, Avro)]) -> Vec<u8> {
        let schema = Schema::parse_str(EVENT_SCHEMA).unwrap();
        let record = Avro::Record(vec![
            (
                "version".into(),
                match version {
                    Some(v) => Avro::Union(1, Box::new(Avro::Long(v as i64))),
                    None => Avro::Union(0, Box::new(Avro::Null)),
                },
            ),
            (
                "fields".into(),
                Avro::Map(
                    fields
                        .iter()
                        .map(|(k, v)| (k.to_string(), v.clone()))
                        .collect(),
                ),
            ),
        ]);
        let mut out = Vec::new();
        apache_avro::GenericSingleObjectWriter::new_with_capacity(&schema, 64)
            .unwrap()
            .write_value_ref(&record, &mut out)
            .unwrap();
        out
    }

    #[test]
    fn avro_events_decode_and_merged_pushes_re_encode() {
        let codec = Codec::new(InputFormat::Avro, MergePolicy::JsonMergePatch, "version");
        let bytes = avro_event_bytes(
            Some(3),
            &[
                ("name", Avro::Union(4, Box::new(Avro::String("x".into())))),
                ("n", Avro::Union(2, Box::new(Avro::Long(2)))),
            ],
        );
        let decoded = codec.decode(Some(&bytes)).unwrap();
        assert_eq!(decoded.version, Some(3));
        assert_eq!(
            decoded.payload,
            Payload::Value(Value::Json(json!({"name": "x", "n": 2})))
        );
        let pushed = codec.encode(&decoded.payload, 9).unwrap();
        assert_eq!(&pushed[..2], &[0xC3, 0x01]);
        let again = codec.decode(Some(&pushed)).unwrap();
        assert_eq!((again.version, again.payload), (Some(9), decoded.payload));
        // Under latest the original bytes are pushed unchanged.
        let latest = Codec::new(InputFormat::Avro, MergePolicy::Latest, "version");
        let decoded = latest.decode(Some(&bytes)).unwrap();
        assert_eq!(
            latest.encode(&decoded.payload, 3).as_deref(),
            Some(&bytes[..])
        );
    }

    #[test]
    fn null_keys_and_oversized_values_are_reasons() {
        let codec = json_codec(MergePolicy::Latest).with_max_value_bytes(8);
        assert_eq!(
            codec.decode_record(None, Some(b"{}")).unwrap_err().reason(),
            "null-key"
        );
        let err = codec
            .decode_record(Some(b"k"), Some(b"{\"a\": 12345}"))
            .unwrap_err();
        assert_eq!(err.reason(), "too-large");
        assert!(err.to_string().contains("12 bytes"), "{err}");
        assert!(codec.decode_record(Some(b"k"), Some(b"{}")).is_ok());
        assert!(codec.decode_record(Some(b"k"), None).is_ok(), "a delete");
    }

    #[test]
    fn json_is_not_an_avro_event() {
        let codec = Codec::new(InputFormat::Avro, MergePolicy::Latest, "version");
        assert_eq!(
            codec.decode(Some(b"{\"a\":1}")).unwrap_err().reason(),
            "invalid-avro"
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
            let avro = Codec::new(InputFormat::Avro, MergePolicy::JsonMergePatch, "version");
            let _ = avro.decode(Some(&bytes));
            // Arbitrary bytes behind a valid header reach the datum decoder.
            let mut framed = avro_event_bytes(None, &[])[..10].to_vec();
            framed.extend_from_slice(&bytes);
            let _ = avro.decode(Some(&framed));
        }
    }
}
