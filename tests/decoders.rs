//! Decoder fuzzing (property tests): arbitrary bytes, and valid encodings
//! mutated (bit flips, truncation, splices, length prefixes blown up), fed
//! to every decoder keyflight has: the input formats under both merge
//! policies, the record gate that decides dead letters, and the changelog's
//! marker codec. None may panic; a refusal is always an error value with a
//! reason. `PROPTEST_CASES` raises the case count.

use bytes::Bytes;
use keyflight::codec::{AvroFraming, Codec, InputFormat};
use keyflight::engine::MergePolicy;
use keyflight::state::{Marker, MarkerCodec};
use proptest::prelude::*;

fn codecs() -> Vec<Codec> {
    let mut all = Vec::new();
    for policy in [MergePolicy::Latest, MergePolicy::JsonMergePatch] {
        all.push(Codec::new(InputFormat::Json, policy, "version").with_max_value_bytes(4096));
        all.push(Codec::new(InputFormat::Avro, policy, "version").with_max_value_bytes(4096));
        all.push(
            Codec::new(InputFormat::Avro, policy, "version")
                .with_avro_framing(AvroFraming::Confluent, 7)
                .with_max_value_bytes(4096),
        );
    }
    all.push(Codec::new(InputFormat::Raw, MergePolicy::Latest, "version"));
    all
}

/// Valid values of every format, the seeds mutations start from.
fn seeds() -> Vec<Vec<u8>> {
    let avro = Codec::new(InputFormat::Avro, MergePolicy::JsonMergePatch, "version");
    let document = serde_json::json!({"name": "x", "n": 3, "ok": true, "f": 1.5, "gone": null});
    let payload = keyflight::engine::Payload::Value(keyflight::engine::Value::Json(document));
    let avro_event = avro.encode(&payload, 42).unwrap().to_vec();
    let confluent_event = Codec::new(InputFormat::Avro, MergePolicy::JsonMergePatch, "version")
        .with_avro_framing(AvroFraming::Confluent, 7)
        .encode(&payload, 42)
        .unwrap()
        .to_vec();
    let marker = MarkerCodec::new().encode(&Marker {
        t1: 5,
        t2: 3,
        version: 9,
        value: Some(Bytes::from_static(b"{\"a\":1}")),
        offset: None,
        value_cut: false,
    });
    vec![
        br#"{"version": 7, "name": "x", "nested": {"a": [1, 2, {"b": null}]}}"#.to_vec(),
        avro_event,
        confluent_event,
        marker,
    ]
}

#[derive(Debug, Clone)]
enum Mutation {
    Flip(usize, u8),
    Truncate(usize),
    Insert(usize, Vec<u8>),
    /// Overwrite with a zig-zag varint claiming a huge length or count.
    HugeLength(usize),
}

fn mutate(mut bytes: Vec<u8>, mutations: &[Mutation]) -> Vec<u8> {
    for m in mutations {
        let len = bytes.len().max(1);
        match m {
            Mutation::Flip(at, bit) => {
                if !bytes.is_empty() {
                    bytes[at % len] ^= 1 << (bit % 8);
                }
            }
            Mutation::Truncate(at) => bytes.truncate(at % len),
            Mutation::Insert(at, more) => {
                let at = (at % len).min(bytes.len());
                bytes.splice(at..at, more.iter().copied());
            }
            Mutation::HugeLength(at) => {
                let at = (at % len).min(bytes.len());
                let end = (at + 5).min(bytes.len());
                bytes.splice(at..end, [0xfe, 0xff, 0xff, 0xff, 0x0f]);
            }
        }
    }
    bytes
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<usize>(), any::<u8>()).prop_map(|(a, b)| Mutation::Flip(a, b)),
        any::<usize>().prop_map(Mutation::Truncate),
        (any::<usize>(), proptest::collection::vec(any::<u8>(), 1..8))
            .prop_map(|(a, v)| Mutation::Insert(a, v)),
        any::<usize>().prop_map(Mutation::HugeLength),
    ]
}

/// Every decoder on `bytes`: no panic, and every error names a reason.
fn decode_everywhere(bytes: &[u8]) {
    for codec in codecs() {
        match codec.decode_record(Some(b"key"), Some(bytes)) {
            Ok(decoded) => {
                // Whatever decodes can be stored and pushed again.
                let _ = codec.encode(&decoded.payload, decoded.version.unwrap_or(0));
                let _ = codec.stored(Some(&Bytes::copy_from_slice(bytes)));
            }
            Err(e) => {
                assert!(!e.reason().is_empty());
                assert!(!e.to_string().is_empty());
            }
        }
        assert!(codec.decode_record(None, Some(bytes)).is_err(), "no key");
    }
    if let Err(e) = MarkerCodec::new().decode(bytes) {
        assert!(e.to_string().starts_with("undecodable marker"));
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(
        std::env::var("PROPTEST_CASES").ok().and_then(|c| c.parse().ok()).unwrap_or(512)
    ))]

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        decode_everywhere(&bytes);
    }

    #[test]
    fn mutated_valid_values_never_panic(
        seed in 0usize..3,
        mutations in proptest::collection::vec(mutation(), 1..6),
    ) {
        let bytes = mutate(seeds()[seed].clone(), &mutations);
        decode_everywhere(&bytes);
    }
}

#[test]
fn the_seeds_decode() {
    let seeds = seeds();
    let json = Codec::new(InputFormat::Json, MergePolicy::Latest, "version");
    assert_eq!(json.decode(Some(&seeds[0])).unwrap().version, Some(7));
    let avro = Codec::new(InputFormat::Avro, MergePolicy::Latest, "version");
    assert_eq!(avro.decode(Some(&seeds[1])).unwrap().version, Some(42));
    let confluent = avro.with_avro_framing(AvroFraming::Confluent, 7);
    assert_eq!(confluent.decode(Some(&seeds[2])).unwrap().version, Some(42));
    assert_eq!(MarkerCodec::new().decode(&seeds[3]).unwrap().version, 9);
}

#[test]
fn an_oversized_value_is_refused_before_it_is_parsed() {
    let codec =
        Codec::new(InputFormat::Json, MergePolicy::Latest, "version").with_max_value_bytes(16);
    let err = codec
        .decode_record(Some(b"k"), Some(&[b' '; 17]))
        .unwrap_err();
    assert_eq!(err.reason(), "too-large");
}
