"""Encode and decode keyflight events with fastavro, a third-party Avro
implementation, for tests/interop.rs.

    fastavro_events.py encode SCHEMA FRAMING SCHEMA_ID < events.jsonl > values.txt
    fastavro_events.py decode SCHEMA FRAMING SCHEMA_ID < values.txt > events.jsonl

An event line is {"key": ..., "version": int|null, "fields": {...}}; a value
line is "<key>\t<hex of the framed Avro bytes>". FRAMING is "confluent"
(magic byte 0, 4-byte big-endian schema id) or "single-object" (C3 01, the
schema's CRC-64-AVRO fingerprint little-endian). Only fastavro and the
standard library are used, so both directions are independent of keyflight.
"""

import io
import json
import struct
import sys

import fastavro
from fastavro.schema import fingerprint, to_parsing_canonical_form


def framing_prefix(schema, framing, schema_id):
    if framing == "confluent":
        return b"\x00" + struct.pack(">I", schema_id)
    if framing == "single-object":
        # fastavro's hex is the fingerprint's little-endian bytes, the
        # order the Avro specification's single-object header uses.
        canonical = to_parsing_canonical_form(schema)
        return b"\xc3\x01" + bytes.fromhex(fingerprint(canonical, "CRC-64-AVRO"))
    raise SystemExit(f"unknown framing {framing!r}")


def encode(schema, prefix):
    for line in sys.stdin:
        event = json.loads(line)
        out = io.BytesIO()
        out.write(prefix)
        datum = {"version": event["version"], "fields": event["fields"]}
        fastavro.schemaless_writer(out, schema, datum)
        print(f"{event['key']}\t{out.getvalue().hex()}")


def decode(schema, prefix):
    for line in sys.stdin:
        key, value = line.rstrip("\n").split("\t")
        raw = bytes.fromhex(value)
        if not raw.startswith(prefix):
            raise SystemExit(f"{key}: framing {raw[:len(prefix)].hex()} is not {prefix.hex()}")
        datum = fastavro.schemaless_reader(io.BytesIO(raw[len(prefix):]), schema)
        print(json.dumps({"key": key, "version": datum["version"], "fields": datum["fields"]}, sort_keys=True))


def main():
    command, schema_path, framing, schema_id = sys.argv[1:5]
    with open(schema_path) as f:
        schema = fastavro.parse_schema(json.load(f))
    prefix = framing_prefix(schema, framing, int(schema_id))
    {"encode": encode, "decode": decode}[command](schema, prefix)


if __name__ == "__main__":
    main()
