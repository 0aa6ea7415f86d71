//! Tests against a real Kafka-compatible broker (Tansu over TCP).

use std::collections::BTreeMap;
use std::process::Command;
use std::time::Duration;

use crate::support::{create_topic, Broker};
use rdkafka::admin::{AdminClient, AdminOptions, ResourceSpecifier};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Message, Offset, TopicPartitionList};

const TIMEOUT: Duration = Duration::from_secs(30);

/// Partition counts of every topic, as the broker reports them.
fn partitions(broker: &Broker) -> BTreeMap<String, usize> {
    let client: BaseConsumer = broker.client_config().create().unwrap();
    let metadata = client.fetch_metadata(None, TIMEOUT).unwrap();
    metadata
        .topics()
        .iter()
        .map(|t| (t.name().to_string(), t.partitions().len()))
        .collect()
}

async fn cleanup_policy(broker: &Broker, topic: &str) -> Option<String> {
    let admin: AdminClient<DefaultClientContext> = broker.client_config().create().unwrap();
    let results = admin
        .describe_configs(&[ResourceSpecifier::Topic(topic)], &AdminOptions::new())
        .await
        .unwrap();
    let resource = results.into_iter().next()?.expect("topic config described");
    resource
        .entries
        .into_iter()
        .find(|e| e.name == "cleanup.policy")?
        .value
}

#[tokio::test(flavor = "multi_thread")]
async fn produce_consume_round_trip_keeps_order_and_watermarks() {
    let broker = Broker::start();
    let topic = broker.unique("roundtrip");
    create_topic(&broker, &topic, 1).await;

    let producer: FutureProducer = broker
        .client_config()
        .set("enable.idempotence", "true")
        .set("linger.ms", "5")
        .create()
        .unwrap();
    let sends: Vec<_> = (0..200)
        .map(|i| {
            let key = format!("k{}", i % 7);
            let value = format!("{{\"n\":{i}}}");
            let producer = producer.clone();
            let topic = topic.clone();
            async move {
                producer
                    .send(
                        FutureRecord::to(&topic)
                            .key(&key)
                            .payload(&value)
                            .partition(0),
                        TIMEOUT,
                    )
                    .await
                    .map_err(|(e, _)| e)
            }
        })
        .collect();
    for result in futures_join(sends).await {
        result.expect("delivered");
    }

    let consumer: BaseConsumer = broker
        .client_config()
        .set("group.id", broker.unique("g"))
        .create()
        .unwrap();
    // The high watermark is last offset + 1 (memory:// storage gets this wrong).
    let (low, high) = consumer.fetch_watermarks(&topic, 0, TIMEOUT).unwrap();
    assert_eq!((low, high), (0, 200));

    let mut assignment = TopicPartitionList::new();
    assignment
        .add_partition_offset(&topic, 0, Offset::Beginning)
        .unwrap();
    consumer.assign(&assignment).unwrap();
    let mut seen = Vec::new();
    let deadline = std::time::Instant::now() + TIMEOUT;
    while seen.len() < 200 && std::time::Instant::now() < deadline {
        if let Some(message) = consumer.poll(Duration::from_millis(500)) {
            let message = message.expect("no consume error");
            let key = String::from_utf8(message.key().unwrap().to_vec()).unwrap();
            let value: serde_json::Value =
                serde_json::from_slice(message.payload().unwrap()).unwrap();
            seen.push((message.offset(), key, value["n"].as_i64().unwrap()));
        }
    }
    assert_eq!(seen.len(), 200, "every record consumed");
    for (i, (offset, key, n)) in seen.iter().enumerate() {
        // Per-partition order holds; sends ran concurrently, so compare each
        // record with itself rather than with its send order.
        assert_eq!(*offset, i as i64);
        assert_eq!(key, &format!("k{}", n % 7));
    }
    let mut values: Vec<i64> = seen.iter().map(|s| s.2).collect();
    values.sort();
    assert_eq!(values, (0..200).collect::<Vec<_>>());
}

/// Awaits every future (a tiny join_all, to avoid a dependency for tests).
async fn futures_join<F>(futures: Vec<F>) -> Vec<F::Output>
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    let handles: Vec<_> = futures.into_iter().map(tokio::spawn).collect();
    let mut out = Vec::with_capacity(handles.len());
    for handle in handles {
        out.push(handle.await.unwrap());
    }
    out
}

/// A config file with topic names unique to this test.
fn config_for(
    broker: &Broker,
    dir: &tempfile::TempDir,
    app: &str,
) -> (std::path::PathBuf, [String; 4]) {
    let names = [
        broker.unique("in"),
        broker.unique("pushed"),
        broker.unique("dlq"),
        format!("{app}-markers-changelog"),
    ];
    let path = dir.path().join("keyflight.toml");
    std::fs::write(
        &path,
        format!(
            "application_id = \"{app}\"\n[topics]\ninput = \"{}\"\npushed = \"{}\"\ndead_letter = \"{}\"\n",
            names[0], names[1], names[2]
        ),
    )
    .unwrap();
    (path, names)
}

fn keyflight(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_keyflight"))
        .args(args)
        .output()
        .expect("keyflight runs")
}

#[tokio::test(flavor = "multi_thread")]
async fn topics_create_creates_then_is_idempotent() {
    let broker = Broker::start();
    let dir = tempfile::tempdir().unwrap();
    let app = broker.unique("app");
    let (config, names) = config_for(&broker, &dir, &app);
    let config = config.to_str().unwrap();

    let first = keyflight(&[
        "--config",
        config,
        "topics",
        "create",
        "--brokers",
        &broker.bootstrap,
        "--partitions",
        "2",
    ]);
    let stdout = String::from_utf8_lossy(&first.stdout);
    assert!(
        first.status.success(),
        "stdout: {stdout}\nstderr: {}",
        String::from_utf8_lossy(&first.stderr)
    );
    assert_eq!(stdout.matches("created").count(), 4, "{stdout}");

    let found = partitions(&broker);
    for name in &names {
        assert_eq!(found.get(name), Some(&2), "{name} in {found:?}");
    }
    assert_eq!(
        cleanup_policy(&broker, &names[3]).await.as_deref(),
        Some("compact"),
        "the changelog is compacted"
    );

    // Second run, without --partitions: everything exists and is compatible.
    let second = keyflight(&[
        "--brokers",
        &broker.bootstrap,
        "--config",
        config,
        "topics",
        "create",
    ]);
    let stdout = crate::support::succeeded(&second);
    assert_eq!(stdout.matches("exists").count(), 4, "{stdout}");
    assert_eq!(partitions(&broker), found, "nothing changed");
}

#[tokio::test(flavor = "multi_thread")]
async fn topics_create_reports_a_changelog_partition_mismatch() {
    let broker = Broker::start();
    let dir = tempfile::tempdir().unwrap();
    let app = broker.unique("app");
    let (config, names) = config_for(&broker, &dir, &app);
    // Someone made the changelog by hand with the wrong partition count.
    create_topic(&broker, &names[0], 4).await;
    create_topic(&broker, &names[3], 2).await;

    let out = keyflight(&[
        "--config",
        config.to_str().unwrap(),
        "--brokers",
        &broker.bootstrap,
        "topics",
        "create",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&names[3])
            && stderr.contains("has 2 partitions")
            && stderr.contains("has 4"),
        "{stderr}"
    );
    let found = partitions(&broker);
    assert!(
        !found.contains_key(&names[1]),
        "nothing created on a mismatch: {found:?}"
    );

    // --partitions that disagrees with the existing input topic.
    let out = keyflight(&[
        "--config",
        config.to_str().unwrap(),
        "--brokers",
        &broker.bootstrap,
        "topics",
        "create",
        "--partitions",
        "3",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr.contains("exists with 4 partitions, but --partitions asks for 3"),
        "{stderr}"
    );
}

#[test]
fn topics_create_without_a_broker_fails_with_a_clear_error() {
    // A port nothing listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let out = keyflight(&[
        "topics",
        "create",
        "--brokers",
        &format!("127.0.0.1:{port}"),
        "--timeout",
        "2s",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("cannot reach the Kafka cluster"),
        "{stderr}"
    );
}
