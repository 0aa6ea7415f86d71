//! Avro input: the event record of `schemas/event.avsc`, framed with
//! single-object encoding or Confluent's wire format, read to a version and
//! attributes and written back for pushes.

use apache_avro::types::Value as Avro;
use apache_avro::Schema;
use bytes::Bytes;
use serde::{Deserialize, Serialize};

use super::{Codec, DecodeError};

/// The bytes before an Avro datum.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AvroFraming {
    /// Avro single-object encoding: `C3 01`, the schema's 8-byte Rabin fingerprint.
    #[default]
    SingleObject,
    /// Confluent's wire format: `00`, the 4-byte big-endian Schema Registry id.
    Confluent,
}

/// The first byte of Confluent's wire format.
const CONFLUENT_MAGIC: u8 = 0;

/// The schema of `avro` input events, compiled in from `schemas/`.
pub const EVENT_SCHEMA: &str = include_str!("../../schemas/event.avsc");

impl Codec {
    /// The Avro value of a framed event.
    pub(super) fn read_avro(&self, bytes: &[u8]) -> Result<Avro, DecodeError> {
        let (schema, reader) = self.avro.as_ref().expect("built for avro");
        let bad = |e: apache_avro::Error| DecodeError::Avro(e.to_string());
        match self.framing {
            AvroFraming::SingleObject => reader.read_value(&mut &bytes[..]).map_err(bad),
            AvroFraming::Confluent => {
                let datum =
                    match bytes {
                        [CONFLUENT_MAGIC, id @ ..] if id.len() >= 4 => {
                            let found = u32::from_be_bytes([id[0], id[1], id[2], id[3]]);
                            if found != self.schema_id {
                                return Err(DecodeError::Avro(format!(
                                    "Confluent schema id {found}, expected input.schema_id = {}",
                                    self.schema_id
                                )));
                            }
                            &id[4..]
                        }
                        _ => return Err(DecodeError::Avro(
                            "not in Confluent wire format (magic byte 0 and a 4-byte schema id)"
                                .into(),
                        )),
                    };
                apache_avro::from_avro_datum(schema, &mut &datum[..], None).map_err(bad)
            }
        }
    }

    /// A push's Avro value, framed.
    pub(super) fn write_avro(&self, schema: &Schema, record: Avro) -> Bytes {
        let mut out = Vec::with_capacity(256);
        match self.framing {
            AvroFraming::SingleObject => out.extend_from_slice(&self.single_object_header),
            AvroFraming::Confluent => {
                out.push(CONFLUENT_MAGIC);
                out.extend_from_slice(&self.schema_id.to_be_bytes());
            }
        }
        out.extend(
            apache_avro::to_avro_datum(schema, record)
                .expect("a push always matches the event schema"),
        );
        Bytes::from(out)
    }
}

pub(super) type Attributes = serde_json::Map<String, serde_json::Value>;

/// An Avro event's version and its attributes as a JSON object.
pub(super) fn avro_fields(value: Avro) -> Result<(Option<u64>, Attributes), DecodeError> {
    let bad = DecodeError::Avro;
    let Avro::Record(record) = value else {
        return Err(bad("not a record".into()));
    };
    let mut version = None;
    let mut fields = Attributes::new();
    for (name, value) in record {
        match (name.as_str(), value) {
            ("version", Avro::Union(_, inner)) => match *inner {
                Avro::Null => {}
                Avro::Long(v) if v >= 0 => version = Some(v as u64),
                other => return Err(bad(format!("version {other:?} is not a non-negative long"))),
            },
            ("fields", Avro::Map(map)) => {
                for (key, value) in map {
                    let json = match value {
                        Avro::Union(_, inner) => match *inner {
                            Avro::Null => serde_json::Value::Null,
                            Avro::Boolean(b) => b.into(),
                            Avro::Long(l) => l.into(),
                            Avro::Double(d) => serde_json::Number::from_f64(d)
                                .map_or(serde_json::Value::Null, Into::into),
                            Avro::String(s) => s.into(),
                            other => return Err(bad(format!("attribute `{key}` holds {other:?}"))),
                        },
                        other => return Err(bad(format!("attribute `{key}` holds {other:?}"))),
                    };
                    fields.insert(key, json);
                }
            }
            (other, _) => return Err(bad(format!("unexpected field `{other}`"))),
        }
    }
    Ok((version, fields))
}

/// A push as an Avro event of `schemas/event.avsc`.
pub(super) fn avro_event(version: u64, document: &serde_json::Value) -> Avro {
    let attribute = |value: &serde_json::Value| match value {
        serde_json::Value::Null => Avro::Union(0, Box::new(Avro::Null)),
        serde_json::Value::Bool(b) => Avro::Union(1, Box::new(Avro::Boolean(*b))),
        serde_json::Value::Number(n) => match n.as_i64() {
            Some(l) => Avro::Union(2, Box::new(Avro::Long(l))),
            None => Avro::Union(3, Box::new(Avro::Double(n.as_f64().unwrap_or_default()))),
        },
        serde_json::Value::String(s) => Avro::Union(4, Box::new(Avro::String(s.clone()))),
        // Not produced by Avro input; kept as JSON text rather than dropped.
        nested => Avro::Union(4, Box::new(Avro::String(nested.to_string()))),
    };
    let fields = match document {
        serde_json::Value::Object(map) => {
            map.iter().map(|(k, v)| (k.clone(), attribute(v))).collect()
        }
        _ => Default::default(),
    };
    Avro::Record(vec![
        (
            "version".into(),
            Avro::Union(1, Box::new(Avro::Long(version as i64))),
        ),
        ("fields".into(), Avro::Map(fields)),
    ])
}
