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

use apache_avro::Schema;
use bytes::Bytes;

/// The schema of changelog values, compiled in from `schemas/`.
pub const MARKER_SCHEMA: &str = include_str!("../../schemas/marker.avsc");

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
        }
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
}

/// A changelog value that is not a marker this version can read.
#[derive(Debug, thiserror::Error)]
#[error("undecodable marker: {0}")]
pub struct MarkerDecodeError(String);

/// Encodes and decodes markers; build once, reuse.
pub struct MarkerCodec {
    /// `C3 01` and the schema's fingerprint, computed once.
    header: Vec<u8>,
}

impl MarkerCodec {
    pub fn new() -> Self {
        let schema = Schema::parse_str(MARKER_SCHEMA)
            .expect("schemas/marker.avsc is valid (checked by tests)");
        let header = apache_avro::headers::RabinFingerprintHeader::from_schema(&schema);
        let header = apache_avro::headers::HeaderBuilder::build_header(&header);
        Self { header }
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
        out
    }

    /// Reads a marker written by [`MarkerCodec::encode`] (or any Avro
    /// single-object writer of `schemas/marker.avsc`), directly: restore
    /// reads one per changelog record and every push reads one. Anything
    /// else is an error, never a panic.
    pub fn decode(&self, bytes: &[u8]) -> Result<Marker, MarkerDecodeError> {
        let Some(mut datum) = bytes.strip_prefix(self.header.as_slice()) else {
            return Err(MarkerDecodeError(
                "not a marker of schemas/marker.avsc (single-object header differs)".into(),
            ));
        };
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
                Some(Bytes::copy_from_slice(&datum[..len]))
            }
            branch => {
                return Err(MarkerDecodeError(format!(
                    "field `value`: union branch {branch} (expected 0 or 1)"
                )))
            }
        };
        Ok(Marker {
            t1: t1 as u64,
            t2: t2 as u64,
            version: version as u64,
            value,
        })
    }
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

    proptest! {
        #[test]
        fn any_marker_round_trips(t1 in 0u64..i64::MAX as u64, t2 in 0u64..i64::MAX as u64, version in 0u64..i64::MAX as u64,
                                  value in proptest::option::of(proptest::collection::vec(any::<u8>(), 0..64))) {
            let codec = MarkerCodec::new();
            let marker = Marker { t1, t2, version, value: value.map(Bytes::from) };
            prop_assert_eq!(codec.decode(&codec.encode(&marker)).unwrap(), marker);
        }

        #[test]
        fn direct_encoding_equals_apache_avros(t1 in any::<u64>(), t2 in any::<u64>(), version in any::<u64>(),
                                               value in proptest::option::of(proptest::collection::vec(any::<u8>(), 0..300))) {
            let marker = Marker { t1, t2, version, value: value.map(Bytes::from) };
            let schema = Schema::parse_str(MARKER_SCHEMA).unwrap();
            let record = Avro::Record(vec![
                ("t1".into(), Avro::Long(t1 as i64)),
                ("t2".into(), Avro::Long(t2 as i64)),
                ("version".into(), Avro::Long(version as i64)),
                ("value".into(), match &marker.value {
                    Some(b) => Avro::Union(1, Box::new(Avro::Bytes(b.to_vec()))),
                    None => Avro::Union(0, Box::new(Avro::Null)),
                }),
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
            let bytes = codec.encode(&Marker { t1, t2, version, value: value.map(Bytes::from) });
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
