//! The marker of one key and its changelog encoding.
//!
//! `markT1` sets `t1` (with the version and value of the push that starts);
//! `markT2` sets `t2` to the same `tn` once the broker acknowledged it. A
//! marker is *open* while `t1 != t2`: its push did not complete, or another
//! push overtook it, and the compensation scan re-pushes `value`.
//!
//! Encoding: Avro single-object encoding (`C3 01`, the schema's 8-byte Rabin
//! fingerprint, the datum) of `schemas/marker.avsc`, so a reader can tell
//! which schema wrote a record and the format can evolve.
//!
//! # Schema evolution
//!
//! Every marker schema a version of keyflight ever wrote is *released* and
//! kept, as `schemas/marker.v<N>.avsc`, in [`RELEASED`]; `schemas/marker.avsc`
//! is a copy of the newest, the *current* one (tests hold both to that).
//! The rule:
//!
//! * writing always uses the current schema;
//! * a record of the current schema is read by the hand-written fast path;
//! * a record of any other released schema (its fingerprint says which) is
//!   read by Avro schema resolution into the current schema (apache-avro,
//!   writer = that schema, reader = the current one): fields the writer
//!   lacks take the current schema's defaults, fields it has that the
//!   current schema lacks are dropped;
//! * anything else (an unknown fingerprint, a truncated datum, garbage) is a
//!   [`MarkerDecodeError`], never a guess and never a panic. The restore
//!   skips such a record and drops its key's state (`processor::restore`).
//!
//! Releasing a new version: add `schemas/marker.v<N+1>.avsc` and its line in
//! [`RELEASED`], copy it over `schemas/marker.avsc`, and change the fast path
//! ([`MarkerCodec::encode`], [`MarkerCodec::decode`]) and [`Marker`] to
//! match. Only ever add fields with defaults, so every released schema stays
//! readable by resolution; never remove a released file.

use std::collections::HashMap;

use apache_avro::types::Value;
use apache_avro::Schema;
use bytes::Bytes;

/// The current schema of changelog values (the one written), compiled in
/// from `schemas/`.
pub const MARKER_SCHEMA: &str = include_str!("../../schemas/marker.avsc");

/// Every released marker schema, oldest first, by file name: a changelog
/// written by any of them is read. The last is the current one
/// ([`MARKER_SCHEMA`]).
pub const RELEASED: &[(&str, &str)] = &[
    (
        "marker.v1.avsc",
        include_str!("../../schemas/marker.v1.avsc"),
    ),
    (
        "marker.v2.avsc",
        include_str!("../../schemas/marker.v2.avsc"),
    ),
    (
        "marker.v3.avsc",
        include_str!("../../schemas/marker.v3.avsc"),
    ),
];

/// `C3 01`, the marker of Avro single-object encoding.
const MAGIC: [u8; 2] = [0xC3, 0x01];
/// The magic and the 8-byte fingerprint of the writer's schema.
const HEADER_LEN: usize = 10;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Marker {
    /// tn of the last push that started.
    pub t1: u64,
    /// tn of the last acknowledged push (0 before the first).
    pub t2: u64,
    /// Version of the newest event the last started push carries.
    pub version: u64,
    /// Payload of the last started push; `None` for a delete.
    pub value: Option<Bytes>,
    /// Input offset of the newest event the last started push carries
    /// (`None`: unknown, as for a compensation push or a v1 marker): a
    /// record replayed at or below it is already reflected here.
    pub offset: Option<i64>,
    /// The changelog refused the marker as too large, so it was written
    /// without its value: `value` is `None` although the push was no
    /// delete. Such a marker is neither a delete's nor re-pushable.
    pub value_cut: bool,
}

impl Marker {
    /// markT1: a push with `tn` starts carrying `version` and `value`;
    /// `acked` is the tn of the key's last acknowledged push (t2 stays).
    pub fn started(acked: u64, tn: u64, version: u64, value: Option<Bytes>) -> Marker {
        Marker {
            t1: tn,
            t2: acked,
            version,
            value,
            offset: None,
            value_cut: false,
        }
    }

    /// The marker, noting the input offset of the push's newest event.
    pub fn at_offset(self, offset: Option<i64>) -> Marker {
        Marker { offset, ..self }
    }

    /// markT2: the push `tn` was acknowledged. When another push started
    /// since (t1 moved on), the marker stays open, as in the article.
    pub fn acknowledged(&self, tn: u64) -> Marker {
        Marker {
            t2: tn,
            ..self.clone()
        }
    }

    pub fn is_open(&self) -> bool {
        self.t1 != self.t2
    }

    /// A delete's marker, acknowledged: the key's version is kept (so an
    /// older event arriving late stays stale) until `deletes.retention`.
    pub fn is_deleted(&self) -> bool {
        self.value.is_none() && !self.value_cut && !self.is_open()
    }

    /// The marker without its value, as the changelog takes one it refused
    /// as too large.
    pub fn cut(self) -> Marker {
        Marker {
            value: None,
            value_cut: true,
            ..self
        }
    }
}

/// A changelog value that is not a marker this version can read.
#[derive(Debug, thiserror::Error)]
#[error("undecodable marker: {0}")]
pub struct MarkerDecodeError(String);

/// Encodes and decodes markers; build once, reuse.
pub struct MarkerCodec {
    /// `C3 01` and the current schema's fingerprint, computed once.
    header: Vec<u8>,
    /// The current schema: the reader of records of older ones.
    current: Schema,
    /// Every other released schema, by its fingerprint (the bytes of the
    /// single-object header after the magic), and its file name.
    released: HashMap<[u8; 8], (String, Schema)>,
}

impl MarkerCodec {
    pub fn new() -> Self {
        Self::with_released(&[])
    }

    /// A codec that reads, besides [`RELEASED`], records of `extra` schemas
    /// (name, JSON): the tests' hypothetical other versions.
    pub(crate) fn with_released(extra: &[(&str, &str)]) -> Self {
        let current = Schema::parse_str(MARKER_SCHEMA)
            .expect("schemas/marker.avsc is valid (checked by tests)");
        let header = single_object_header(&current);
        let mut released = HashMap::new();
        for (name, json) in RELEASED.iter().chain(extra) {
            let schema = Schema::parse_str(json)
                .unwrap_or_else(|e| panic!("released schema {name} is invalid: {e}"));
            let header_of = single_object_header(&schema);
            if header_of != header {
                let fingerprint = header_of[MAGIC.len()..].try_into().expect("8 bytes");
                released.insert(fingerprint, (name.to_string(), schema));
            }
        }
        Self {
            header,
            current,
            released,
        }
    }

    /// The single-object encoding of a marker, written directly (it runs
    /// twice per push): the header, then the record's fields in schema
    /// order as Avro longs, the union branch and the bytes. Tests check it
    /// against apache-avro's reader.
    pub fn encode(&self, marker: &Marker) -> Vec<u8> {
        let value_len = marker.value.as_ref().map_or(0, |v| v.len());
        let mut out = Vec::with_capacity(self.header.len() + 4 * 10 + value_len);
        out.extend_from_slice(&self.header);
        avro_long(&mut out, marker.t1 as i64);
        avro_long(&mut out, marker.t2 as i64);
        avro_long(&mut out, marker.version as i64);
        match &marker.value {
            None => avro_long(&mut out, 0), // union branch 0: null
            Some(bytes) => {
                avro_long(&mut out, 1); // union branch 1: bytes
                avro_long(&mut out, bytes.len() as i64);
                out.extend_from_slice(bytes);
            }
        }
        match marker.offset {
            None => avro_long(&mut out, 0), // union branch 0: null
            Some(offset) => {
                avro_long(&mut out, 1); // union branch 1: long
                avro_long(&mut out, offset);
            }
        }
        out.push(u8::from(marker.value_cut)); // an Avro boolean: one byte
        out
    }

    /// Reads a marker of any released schema: one written by
    /// [`MarkerCodec::encode`] (or any Avro single-object writer of
    /// `schemas/marker.avsc`) directly, as restore reads one per changelog
    /// record and every push reads one; one of an older released schema by
    /// Avro schema resolution. Anything else is an error, never a panic.
    pub fn decode(&self, bytes: &[u8]) -> Result<Marker, MarkerDecodeError> {
        match bytes.strip_prefix(self.header.as_slice()) {
            Some(datum) => decode_current(datum),
            None => self.decode_released(bytes),
        }
    }

    /// Reads a record of a released schema other than the current one, by
    /// resolution into the current schema.
    fn decode_released(&self, bytes: &[u8]) -> Result<Marker, MarkerDecodeError> {
        if !bytes.starts_with(&MAGIC) {
            return Err(MarkerDecodeError(
                "not Avro single-object encoded (no C3 01 header)".into(),
            ));
        }
        let Some((fingerprint, datum)) = bytes[MAGIC.len()..].split_first_chunk::<8>() else {
            return Err(MarkerDecodeError(format!(
                "truncated single-object header ({} of {HEADER_LEN} bytes)",
                bytes.len()
            )));
        };
        let Some((name, writer)) = self.released.get(fingerprint) else {
            return Err(MarkerDecodeError(format!(
                "written with an unknown schema (fingerprint {}): not a marker schema this version released",
                hex(fingerprint)
            )));
        };
        let mut reader = Exact {
            rest: datum,
            ran_out: false,
        };
        let written = apache_avro::from_avro_datum(writer, &mut reader, None);
        // apache-avro reads a union missing at the end as null: a datum is
        // whole only if nothing was read past its end and nothing is left.
        if reader.ran_out {
            return Err(MarkerDecodeError(format!("datum of {name} is truncated")));
        }
        let written = written.map_err(|e| MarkerDecodeError(format!("datum of {name}: {e}")))?;
        if !reader.rest.is_empty() {
            return Err(MarkerDecodeError(format!(
                "datum of {name}: {} bytes after its end",
                reader.rest.len()
            )));
        }
        let resolved = written.resolve(&self.current).map_err(|e| {
            MarkerDecodeError(format!(
                "{name} does not resolve to schemas/marker.avsc: {e}"
            ))
        })?;
        marker_of(resolved).map_err(|field| {
            MarkerDecodeError(format!(
                "{name} resolved to schemas/marker.avsc without a valid `{field}`"
            ))
        })
    }
}

/// Reads the datum of a record of the current schema, directly.
fn decode_current(mut datum: &[u8]) -> Result<Marker, MarkerDecodeError> {
    let t1 = read_long(&mut datum, "t1")?;
    let t2 = read_long(&mut datum, "t2")?;
    let version = read_long(&mut datum, "version")?;
    let value = match read_long(&mut datum, "value")? {
        0 => None,
        1 => {
            let len = read_long(&mut datum, "value")?;
            let len = usize::try_from(len)
                .ok()
                .filter(|len| *len <= datum.len())
                .ok_or_else(|| {
                    MarkerDecodeError(format!("field `value`: length {len} does not fit"))
                })?;
            let (value, rest) = datum.split_at(len);
            datum = rest;
            Some(Bytes::copy_from_slice(value))
        }
        branch => {
            return Err(MarkerDecodeError(format!(
                "field `value`: union branch {branch} (expected 0 or 1)"
            )))
        }
    };
    let offset = match read_long(&mut datum, "offset")? {
        0 => None,
        1 => Some(read_long(&mut datum, "offset")?),
        branch => {
            return Err(MarkerDecodeError(format!(
                "field `offset`: union branch {branch} (expected 0 or 1)"
            )))
        }
    };
    let value_cut = match datum.first() {
        Some(0) => false,
        Some(1) => true,
        Some(other) => {
            return Err(MarkerDecodeError(format!(
                "field `value_cut`: byte {other} is no boolean"
            )))
        }
        None => {
            return Err(MarkerDecodeError(
                "field `value_cut`: the datum ends before it".into(),
            ))
        }
    };
    Ok(Marker {
        t1: t1 as u64,
        t2: t2 as u64,
        version: version as u64,
        value,
        offset,
        value_cut,
    })
}

/// The marker in a record of the current schema, or the field that is not
/// as the current schema has it.
fn marker_of(record: Value) -> Result<Marker, &'static str> {
    let Value::Record(fields) = record else {
        return Err("record");
    };
    let field = |name: &'static str| {
        fields
            .iter()
            .find(|(field, _)| field == name)
            .map(|(_, value)| value)
            .ok_or(name)
    };
    let long = |name| match field(name)? {
        Value::Long(n) => Ok(*n as u64),
        _ => Err(name),
    };
    let value = match field("value")? {
        Value::Union(_, value) => match value.as_ref() {
            Value::Null => None,
            Value::Bytes(bytes) => Some(Bytes::copy_from_slice(bytes)),
            _ => return Err("value"),
        },
        _ => return Err("value"),
    };
    let offset = match field("offset")? {
        Value::Union(_, offset) => match offset.as_ref() {
            Value::Null => None,
            Value::Long(n) => Some(*n),
            _ => return Err("offset"),
        },
        _ => return Err("offset"),
    };
    let value_cut = match field("value_cut")? {
        Value::Boolean(cut) => *cut,
        _ => return Err("value_cut"),
    };
    Ok(Marker {
        t1: long("t1")?,
        t2: long("t2")?,
        version: long("version")?,
        value,
        offset,
        value_cut,
    })
}

/// A datum being read, which notes whether the reader asked for more than
/// it holds.
struct Exact<'a> {
    rest: &'a [u8],
    ran_out: bool,
}

impl std::io::Read for Exact<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if buf.len() > self.rest.len() {
            self.ran_out = true;
        }
        self.rest.read(buf)
    }
}

/// `C3 01` and the schema's CRC-64-AVRO (Rabin) fingerprint.
fn single_object_header(schema: &Schema) -> Vec<u8> {
    use apache_avro::headers::{HeaderBuilder, RabinFingerprintHeader};
    RabinFingerprintHeader::from_schema(schema).build_header()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Reads an Avro `long` (zig-zag varint, at most 10 bytes) off the front.
fn read_long(bytes: &mut &[u8], field: &str) -> Result<i64, MarkerDecodeError> {
    let mut z: u64 = 0;
    for (i, byte) in bytes.iter().enumerate().take(10) {
        z |= u64::from(byte & 0x7F) << (7 * i);
        if byte & 0x80 == 0 {
            *bytes = &bytes[i + 1..];
            return Ok(((z >> 1) as i64) ^ -((z & 1) as i64));
        }
    }
    Err(MarkerDecodeError(format!(
        "field `{field}`: truncated or overlong varint"
    )))
}

impl Default for MarkerCodec {
    fn default() -> Self {
        Self::new()
    }
}

/// Avro's `long`: zig-zag, then a little-endian base-128 varint.
fn avro_long(out: &mut Vec<u8>, n: i64) {
    let mut z = ((n << 1) ^ (n >> 63)) as u64;
    while z >= 0x80 {
        out.push((z as u8) | 0x80);
        z >>= 7;
    }
    out.push(z as u8);
}

#[cfg(test)]
mod tests {
    use super::*;
    use apache_avro::types::Value as Avro;
    use proptest::prelude::*;

    #[test]
    fn article_case_1_leaves_the_marker_open() {
        // D starts (t1 = td); E starts (t1 = te) and ends (t2 = te); D ends (t2 = td).
        let d = Marker::started(0, 10, 4, Some(Bytes::from_static(b"D")));
        let e = Marker::started(d.t2, 20, 5, Some(Bytes::from_static(b"E")));
        let e_done = e.acknowledged(20);
        assert!(!e_done.is_open());
        let d_done = e_done.acknowledged(10);
        assert!(d_done.is_open(), "t1 = te, t2 = td: the scan re-pushes E");
        assert_eq!(d_done.value.as_deref(), Some(&b"E"[..]));
    }

    #[test]
    fn encoding_is_single_object_and_round_trips() {
        let codec = MarkerCodec::new();
        let marker = Marker {
            t1: 5,
            t2: 3,
            version: 9,
            value: None,
            offset: None,
            value_cut: false,
        };
        let bytes = codec.encode(&marker);
        assert_eq!(&bytes[..2], &[0xC3, 0x01], "Avro single-object magic");
        assert_eq!(codec.decode(&bytes).unwrap(), marker);
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        let codec = MarkerCodec::new();
        for bytes in [
            &b""[..],
            b"\xC3\x01",
            b"{\"t1\":1}",
            &[0xC3, 0x01, 0, 0, 0, 0, 0, 0, 0, 0, 0xFF],
        ] {
            assert!(codec.decode(bytes).is_err());
        }
    }

    /// A hypothetical older release: the current schema without `value`,
    /// which the current schema defaults to null.
    const WITHOUT_VALUE: (&str, &str) = (
        "marker.v0a.avsc",
        r#"{"type": "record", "name": "Marker", "namespace": "io.keyflight.changelog",
            "fields": [{"name": "t1", "type": "long"}, {"name": "t2", "type": "long"},
                       {"name": "version", "type": "long"}]}"#,
    );

    /// Another: `t1` an int (promoted to long), `value` plain bytes (the
    /// current schema's union reads it), and a field the current schema
    /// lacks (dropped).
    const WITH_NOTE: (&str, &str) = (
        "marker.v0b.avsc",
        r#"{"type": "record", "name": "Marker", "namespace": "io.keyflight.changelog",
            "fields": [{"name": "t1", "type": "int"}, {"name": "t2", "type": "long"},
                       {"name": "version", "type": "long"}, {"name": "value", "type": "bytes"},
                       {"name": "note", "type": "string"}]}"#,
    );

    /// One the current schema cannot read: `version` has no default.
    const WITHOUT_VERSION: (&str, &str) = (
        "marker.v0c.avsc",
        r#"{"type": "record", "name": "Marker", "namespace": "io.keyflight.changelog",
            "fields": [{"name": "t1", "type": "long"}, {"name": "t2", "type": "long"}]}"#,
    );

    /// `fields` as a single-object record of `schema`, by apache-avro.
    fn written_by(schema: &str, fields: Vec<(&str, Avro)>) -> Vec<u8> {
        let schema = Schema::parse_str(schema).unwrap();
        let record = Avro::Record(fields.into_iter().map(|(n, v)| (n.into(), v)).collect());
        let mut out = Vec::new();
        apache_avro::GenericSingleObjectWriter::new_with_capacity(&schema, 64)
            .unwrap()
            .write_value_ref(&record, &mut out)
            .unwrap();
        out
    }

    fn with_note(t1: i32, value: &[u8], note: &str) -> Vec<u8> {
        written_by(
            WITH_NOTE.1,
            vec![
                ("t1", Avro::Int(t1)),
                ("t2", Avro::Long(3)),
                ("version", Avro::Long(9)),
                ("value", Avro::Bytes(value.to_vec())),
                ("note", Avro::String(note.into())),
            ],
        )
    }

    #[test]
    fn a_marker_of_an_older_release_without_a_field_reads_with_the_current_default() {
        let old = written_by(
            WITHOUT_VALUE.1,
            vec![
                ("t1", Avro::Long(5)),
                ("t2", Avro::Long(3)),
                ("version", Avro::Long(9)),
            ],
        );
        let codec = MarkerCodec::with_released(&[WITHOUT_VALUE]);
        assert_eq!(
            codec.decode(&old).unwrap(),
            Marker {
                t1: 5,
                t2: 3,
                version: 9,
                value: None,
                offset: None,
                value_cut: false
            }
        );
    }

    #[test]
    fn a_marker_of_an_older_release_with_other_fields_reads_by_resolution() {
        let codec = MarkerCodec::with_released(&[WITHOUT_VALUE, WITH_NOTE]);
        assert_eq!(
            codec.decode(&with_note(5, b"V", "dropped")).unwrap(),
            Marker {
                t1: 5,
                t2: 3,
                version: 9,
                value: Some(Bytes::from_static(b"V")),
                offset: None,
                value_cut: false
            }
        );
        // The current schema's records still take the fast path.
        let current = Marker::started(3, 5, 9, None);
        assert_eq!(codec.decode(&codec.encode(&current)).unwrap(), current);
    }

    #[test]
    fn an_unknown_fingerprint_is_a_clear_error() {
        // Released nowhere: this version cannot know what the bytes mean.
        let old = with_note(5, b"V", "n");
        let error = MarkerCodec::new().decode(&old).unwrap_err().to_string();
        let fingerprint = hex(&old[2..10]);
        assert!(
            error.contains("unknown schema") && error.contains(&fingerprint),
            "{error}"
        );
    }

    #[test]
    fn every_truncated_marker_of_an_older_release_is_a_clear_error() {
        // apache-avro alone reads a cut-off string or union as null; the
        // codec refuses every prefix, and bytes after the datum.
        let codec = MarkerCodec::with_released(&[WITH_NOTE]);
        let old = with_note(5, b"value", "a note");
        for cut in 0..old.len() {
            let error = codec.decode(&old[..cut]).unwrap_err().to_string();
            if cut >= 2 {
                assert!(
                    error.contains("truncated"),
                    "prefix of {cut} bytes: {error}"
                );
            }
        }
        let mut longer = old.clone();
        longer.push(0);
        let error = codec.decode(&longer).unwrap_err().to_string();
        assert!(error.contains("1 bytes after its end"), "{error}");
    }

    #[test]
    fn an_older_release_the_current_schema_cannot_read_is_an_error_not_a_guess() {
        let old = written_by(
            WITHOUT_VERSION.1,
            vec![("t1", Avro::Long(5)), ("t2", Avro::Long(3))],
        );
        let codec = MarkerCodec::with_released(&[WITHOUT_VERSION]);
        let error = codec.decode(&old).unwrap_err().to_string();
        assert!(
            error.contains("marker.v0c.avsc does not resolve"),
            "{error}"
        );
    }

    #[test]
    fn the_current_schema_is_the_newest_release() {
        let (name, newest) = RELEASED.last().unwrap();
        assert_eq!(
            MARKER_SCHEMA, *newest,
            "schemas/marker.avsc must be a copy of the newest release, {name}"
        );
    }

    #[test]
    fn every_marker_schema_file_is_released_and_readable_by_the_current() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("schemas");
        let mut files: Vec<(String, String)> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|entry| entry.unwrap().file_name().into_string().unwrap())
            .filter(|name| name.starts_with("marker.v") && name.ends_with(".avsc"))
            .map(|name| {
                let text = std::fs::read_to_string(dir.join(&name)).unwrap();
                (name, text)
            })
            .collect();
        files.sort_by_key(|(name, _)| {
            let n = &name["marker.v".len()..name.len() - ".avsc".len()];
            n.parse::<u32>().expect("marker.v<N>.avsc")
        });
        let released: Vec<(String, String)> = RELEASED
            .iter()
            .map(|(n, t)| (n.to_string(), t.to_string()))
            .collect();
        assert_eq!(files, released, "schemas/marker.v*.avsc and RELEASED");
        let current = Schema::parse_str(MARKER_SCHEMA).unwrap();
        for (name, text) in RELEASED {
            let writer = Schema::parse_str(text).unwrap();
            apache_avro::schema_compatibility::SchemaCompatibility::can_read(&writer, &current)
                .unwrap_or_else(|e| panic!("{name} cannot be read by the current schema: {e}"));
        }
    }

    /// A marker of the first release (no `offset`) reads as it was, with
    /// the offset unknown: changelogs written before v2 restore.
    #[test]
    fn a_v1_marker_reads_with_its_offset_unknown() {
        let v1 = Schema::parse_str(RELEASED[0].1).unwrap();
        let record = Avro::Record(vec![
            ("t1".into(), Avro::Long(20)),
            ("t2".into(), Avro::Long(10)),
            ("version".into(), Avro::Long(4)),
            (
                "value".into(),
                Avro::Union(1, Box::new(Avro::Bytes(b"D".to_vec()))),
            ),
        ]);
        let mut bytes = Vec::new();
        apache_avro::GenericSingleObjectWriter::new_with_capacity(&v1, 64)
            .unwrap()
            .write_value_ref(&record, &mut bytes)
            .unwrap();
        let marker = MarkerCodec::new().decode(&bytes).unwrap();
        assert_eq!(
            marker,
            Marker::started(10, 20, 4, Some(Bytes::from_static(b"D")))
        );
        assert_eq!(marker.offset, None);
    }

    proptest! {
        #[test]
        fn any_marker_round_trips(t1 in 0u64..i64::MAX as u64, t2 in 0u64..i64::MAX as u64, version in 0u64..i64::MAX as u64,
                                  value in proptest::option::of(proptest::collection::vec(any::<u8>(), 0..64)),
                                  offset in proptest::option::of(any::<i64>()), value_cut in any::<bool>()) {
            let codec = MarkerCodec::new();
            let marker = Marker { t1, t2, version, value: value.map(Bytes::from), offset, value_cut };
            prop_assert_eq!(codec.decode(&codec.encode(&marker)).unwrap(), marker);
        }

        #[test]
        fn direct_encoding_equals_apache_avros(t1 in any::<u64>(), t2 in any::<u64>(), version in any::<u64>(),
                                               value in proptest::option::of(proptest::collection::vec(any::<u8>(), 0..300)),
                                               offset in proptest::option::of(any::<i64>()), value_cut in any::<bool>()) {
            let marker = Marker { t1, t2, version, value: value.map(Bytes::from), offset, value_cut };
            let schema = Schema::parse_str(MARKER_SCHEMA).unwrap();
            let record = Avro::Record(vec![
                ("t1".into(), Avro::Long(t1 as i64)),
                ("t2".into(), Avro::Long(t2 as i64)),
                ("version".into(), Avro::Long(version as i64)),
                ("value".into(), match &marker.value {
                    Some(b) => Avro::Union(1, Box::new(Avro::Bytes(b.to_vec()))),
                    None => Avro::Union(0, Box::new(Avro::Null)),
                }),
                ("offset".into(), match marker.offset {
                    Some(o) => Avro::Union(1, Box::new(Avro::Long(o))),
                    None => Avro::Union(0, Box::new(Avro::Null)),
                }),
                ("value_cut".into(), Avro::Boolean(value_cut)),
            ]);
            let mut reference = Vec::new();
            apache_avro::GenericSingleObjectWriter::new_with_capacity(&schema, 64)
                .unwrap()
                .write_value_ref(&record, &mut reference)
                .unwrap();
            prop_assert_eq!(MarkerCodec::new().encode(&marker), reference);
        }

        #[test]
        fn every_truncated_marker_is_an_error(t1 in any::<u64>(), t2 in any::<u64>(), version in any::<u64>(),
                                              value in proptest::option::of(proptest::collection::vec(any::<u8>(), 0..40))) {
            // Stricter than apache-avro's reader, which reads a missing
            // union branch at the end as null.
            let codec = MarkerCodec::new();
            let bytes = codec.encode(&Marker { t1, t2, version, value: value.map(Bytes::from), offset: Some(7) , value_cut: false });
            for cut in 0..bytes.len() {
                prop_assert!(codec.decode(&bytes[..cut]).is_err(), "prefix of {} bytes", cut);
            }
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = MarkerCodec::new().decode(&bytes);
        }
    }
}
