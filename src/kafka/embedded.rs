//! An embedded Kafka-protocol broker for `keyflight dev` and `keyflight
//! demo`: librdkafka's mock cluster, listening on a real loopback port, so
//! any Kafka client can talk to it. Everything lives in memory and ends with
//! the process; development only.

use rdkafka::mocking::MockCluster;
use rdkafka::producer::DefaultProducerContext;

use crate::config::Settings;

/// A running embedded broker with keyflight's topics; stops when dropped.
pub struct Embedded {
    cluster: MockCluster<'static, DefaultProducerContext>,
}

impl Embedded {
    /// Starts a one-broker cluster and creates the input, pushed,
    /// dead-letter and changelog topics of `settings`, `partitions` each.
    pub fn start(
        settings: &Settings,
        partitions: i32,
    ) -> Result<Embedded, rdkafka::error::KafkaError> {
        let cluster = MockCluster::new(1)?;
        let pushed = settings.pushes_topic().unwrap_or(&settings.topics.pushed);
        for topic in [
            settings.topics.input.clone(),
            pushed.to_string(),
            settings.topics.dead_letter.clone(),
            settings.changelog_topic(),
        ] {
            cluster.create_topic(&topic, partitions, 1)?;
        }
        Ok(Embedded { cluster })
    }

    /// `host:port` for `bootstrap.servers`.
    pub fn bootstrap(&self) -> String {
        self.cluster.bootstrap_servers()
    }
}
