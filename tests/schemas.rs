//! Every schema in `schemas/` parses, and a marker round-trips through it.

use apache_avro::types::{Record, Value};
use apache_avro::{from_avro_datum, to_avro_datum, Schema};

fn schema(name: &str) -> Schema {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("schemas")
        .join(name);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    Schema::parse_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[test]
fn every_schema_parses() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("schemas");
    let mut parsed = 0;
    for entry in std::fs::read_dir(dir).unwrap() {
        let name = entry.unwrap().file_name().into_string().unwrap();
        if name.ends_with(".avsc") {
            schema(&name);
            parsed += 1;
        }
    }
    assert!(parsed >= 1);
}

#[test]
fn marker_round_trips_open_and_tombstone() {
    let schema = schema("marker.avsc");
    for value in [
        Value::Union(1, Box::new(Value::Bytes(b"{\"a\":1}".to_vec()))),
        Value::Union(0, Box::new(Value::Null)),
    ] {
        let mut record = Record::new(&schema).unwrap();
        record.put("t1", Value::Long(20));
        record.put("t2", Value::Long(10));
        record.put("version", Value::Long(7));
        record.put("value", value.clone());
        record.put("value_cut", Value::Boolean(false));
        let bytes = to_avro_datum(&schema, record).unwrap();
        let decoded = from_avro_datum(&schema, &mut bytes.as_slice(), None).unwrap();
        let Value::Record(fields) = decoded else {
            panic!("a record")
        };
        assert_eq!(fields[0], ("t1".to_string(), Value::Long(20)));
        assert_eq!(fields[3], ("value".to_string(), value));
    }
}
