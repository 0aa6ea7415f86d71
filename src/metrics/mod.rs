//! Prometheus metrics, readiness, and the HTTP endpoint that serves them.
//!
//! [`Metrics`] owns one registry per process (not the global default, so
//! several processors can live in one test process) and every metric family,
//! all named `keyflight_*` after Prometheus conventions. Code never touches
//! the families directly: a happening is an internal event
//! (`crate::internal_events`) that logs and counts itself in one place.
//! [`PartitionMetrics`] holds a partition's series resolved once, so the hot
//! path is an atomic add, not a label lookup.
//!
//! [`Health`] answers `/readyz`: ready once the member holds an assignment
//! and every assigned partition is restored and consuming. [`server`] serves
//! `/metrics`, `/healthz` and `/readyz`.

pub mod scrape;
pub mod server;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use prometheus::{
    exponential_buckets, Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter,
    IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};

/// Every metric family of a keyflight process.
pub struct Metrics {
    registry: Registry,
    pub(crate) events_consumed: IntCounterVec,
    pub(crate) events_merged: IntCounterVec,
    pub(crate) events_stale: IntCounterVec,
    pub(crate) pushes: IntCounterVec,
    pub(crate) push_failures: IntCounterVec,
    pub(crate) push_latency: HistogramVec,
    pub(crate) keys_in_flight: IntGaugeVec,
    pub(crate) keys_waiting: IntGaugeVec,
    pub(crate) pushes_skipped: IntCounterVec,
    pub(crate) markers_expired: IntCounterVec,
    pub(crate) open_markers: IntGaugeVec,
    pub(crate) compensation_scan: Histogram,
    pub(crate) compensation_repushed: IntCounterVec,
    pub(crate) dead_letters: IntCounterVec,
    pub(crate) changelog_written: IntCounterVec,
    pub(crate) changelog_restored: IntCounterVec,
    pub(crate) changelog_unreadable: IntCounterVec,
    pub(crate) dead_letters_abandoned: IntCounterVec,
    pub(crate) restore_duration: prometheus::GaugeVec,
    pub(crate) committed_offset: IntGaugeVec,
    pub(crate) consumer_lag: IntGaugeVec,
    pub(crate) partition_pauses: IntCounterVec,
    pub(crate) transactions: IntCounterVec,
    pub(crate) partition_paused: IntGaugeVec,
    pub(crate) http_requests: IntCounterVec,
    pub(crate) http_request_duration: Histogram,
    pub(crate) http_retries: IntCounter,
    pub(crate) http_in_flight: IntGauge,
    pub(crate) assigned_partitions: IntGauge,
    pub(crate) ready: IntGauge,
    pub health: Health,
}

/// Push kinds, the `kind` label of `keyflight_pushes_total`.
pub const NORMAL: &str = "normal";
pub const COMPENSATION: &str = "compensation";

/// Registers `metric` and hands it back.
fn register<M: prometheus::core::Collector + Clone + 'static>(registry: &Registry, metric: M) -> M {
    registry
        .register(Box::new(metric.clone()))
        .expect("unique metric");
    metric
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        fn counter(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
            register(
                registry,
                IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric"),
            )
        }
        fn gauge(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
            register(
                registry,
                IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric"),
            )
        }
        let p = &["partition"];
        let push_latency = register(
            &registry,
            HistogramVec::new(
                HistogramOpts::new(
                    "keyflight_push_latency_seconds",
                    "Time from a push's start (markT1) to the broker's acknowledgement.",
                )
                .buckets(exponential_buckets(0.000_5, 2.0, 16).expect("valid buckets")),
                &["kind"],
            )
            .expect("valid metric"),
        );
        let compensation_scan = register(
            &registry,
            Histogram::with_opts(
                HistogramOpts::new(
                    "keyflight_compensation_scan_duration_seconds",
                    "Duration of one partition's compensation scan of its open markers.",
                )
                .buckets(exponential_buckets(0.000_05, 4.0, 10).expect("valid buckets")),
            )
            .expect("valid metric"),
        );
        let restore_duration = register(
            &registry,
            prometheus::GaugeVec::new(
                Opts::new(
                    "keyflight_restore_duration_seconds",
                    "Duration of the partition's last restore from the changelog.",
                ),
                p,
            )
            .expect("valid metric"),
        );
        let http_request_duration = register(
            &registry,
            Histogram::with_opts(
                HistogramOpts::new(
                    "keyflight_http_request_duration_seconds",
                    "Time from an HTTP sink request's start to its answer (or failure).",
                )
                .buckets(exponential_buckets(0.000_5, 2.0, 16).expect("valid buckets")),
            )
            .expect("valid metric"),
        );
        let http_retries = register(
            &registry,
            IntCounter::new(
                "keyflight_http_retries_total",
                "HTTP sink requests that failed in a way worth another attempt (5xx, 408, 429, timeout, no connection).",
            )
            .expect("valid metric"),
        );
        let http_in_flight = register(
            &registry,
            IntGauge::new(
                "keyflight_http_requests_in_flight",
                "HTTP sink requests sent and not yet answered.",
            )
            .expect("valid metric"),
        );
        let assigned_partitions = register(
            &registry,
            IntGauge::new(
                "keyflight_assigned_partitions",
                "Input partitions assigned to this member.",
            )
            .expect("valid metric"),
        );
        let ready = register(
            &registry,
            IntGauge::new(
                "keyflight_ready",
                "1 when every assigned partition is restored and consuming (as /readyz).",
            )
            .expect("valid metric"),
        );
        let build = IntGaugeVec::new(
            Opts::new("keyflight_build_info", "Always 1; the running version."),
            &["version"],
        )
        .expect("valid metric");
        registry
            .register(Box::new(build.clone()))
            .expect("unique metric");
        build.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);

        Self {
            events_consumed: counter(
                &registry,
                "keyflight_events_consumed_total",
                "Input records read from the partition (events and dead letters).",
                p,
            ),
            events_merged: counter(
                &registry,
                "keyflight_events_merged_total",
                "Events folded into the pending push of a key already in flight.",
                p,
            ),
            events_stale: counter(
                &registry,
                "keyflight_events_stale_dropped_total",
                "Events dropped because the key already saw a newer version.",
                p,
            ),
            pushes: counter(
                &registry,
                "keyflight_pushes_total",
                "Pushes acknowledged by the broker, by kind (normal, compensation).",
                &["partition", "kind"],
            ),
            push_failures: counter(
                &registry,
                "keyflight_push_failures_total",
                "Pushes the broker did not accept; each is retried with the key's newest value.",
                p,
            ),
            push_latency,
            keys_in_flight: gauge(
                &registry,
                "keyflight_keys_in_flight",
                "Keys with a push in flight.",
                p,
            ),
            pushes_skipped: counter(
                &registry,
                "keyflight_pushes_skipped_total",
                "Pushes not produced because their value equals the key's last acknowledged one (singleflight.skip_unchanged).",
                p,
            ),
            markers_expired: counter(
                &registry,
                "keyflight_markers_expired_total",
                "Idle keys' markers removed by the expiry sweep (state.ttl).",
                p,
            ),
            keys_waiting: gauge(
                &registry,
                "keyflight_keys_waiting",
                "Keys whose events wait for their push window (singleflight.delay, min_interval).",
                p,
            ),
            open_markers: gauge(
                &registry,
                "keyflight_open_markers",
                "Markers whose last push has not finished (t1 != t2), at the last restore or scan.",
                p,
            ),
            compensation_scan,
            compensation_repushed: counter(
                &registry,
                "keyflight_compensation_repushed_keys_total",
                "Keys the compensation scan pushed again.",
                p,
            ),
            dead_letters: counter(
                &registry,
                "keyflight_dead_letters_total",
                "Records sent unchanged to the dead-letter topic, by reason.",
                &["partition", "reason"],
            ),
            changelog_written: counter(
                &registry,
                "keyflight_changelog_records_written_total",
                "Marker records the changelog acknowledged.",
                p,
            ),
            changelog_restored: counter(
                &registry,
                "keyflight_changelog_records_restored_total",
                "Changelog records applied to the local store while restoring.",
                p,
            ),
            changelog_unreadable: counter(
                &registry,
                "keyflight_changelog_records_unreadable_total",
                "Changelog records no released marker schema reads, skipped while restoring (their keys' state is dropped).",
                p,
            ),
            dead_letters_abandoned: counter(
                &registry,
                "keyflight_dead_letters_abandoned_total",
                "Dead letters given up: the dead-letter topic refused them for good, or kept failing for push.give_up_after (each logged with its record's place).",
                p,
            ),
            restore_duration,
            committed_offset: gauge(
                &registry,
                "keyflight_committed_offset",
                "The group's committed offset on the input partition (the next event to process).",
                p,
            ),
            consumer_lag: gauge(
                &registry,
                "keyflight_consumer_lag_records",
                "Input records after the committed offset (high watermark - committed).",
                p,
            ),
            partition_pauses: counter(
                &registry,
                "keyflight_partition_pauses_total",
                "Times the input partition was paused because its task had fallen behind (backpressure).",
                p,
            ),
            transactions: counter(
                &registry,
                "keyflight_transactions_total",
                "Exactly-once transactions ended, by outcome: committed, or aborted (the partition was dropped).",
                &["partition", "outcome"],
            ),
            partition_paused: gauge(
                &registry,
                "keyflight_partition_paused",
                "1 while the input partition is paused for backpressure, else 0.",
                p,
            ),
            http_requests: counter(
                &registry,
                "keyflight_http_requests_total",
                "HTTP sink requests answered, by status class (2xx, 3xx, 4xx, 5xx), or `error` for no answer (timeout, connection).",
                &["class"],
            ),
            http_request_duration,
            http_retries,
            http_in_flight,
            assigned_partitions,
            ready,
            health: Health::default(),
            registry,
        }
    }

    /// The partition's series, resolved once.
    pub fn partition(self: &Arc<Self>, partition: i32) -> PartitionMetrics {
        let label = partition.to_string();
        let l = &[label.as_str()];
        PartitionMetrics {
            events_consumed: self.events_consumed.with_label_values(l),
            events_merged: self.events_merged.with_label_values(l),
            events_stale: self.events_stale.with_label_values(l),
            pushes_normal: self.pushes.with_label_values(&[&label, NORMAL]),
            pushes_compensation: self.pushes.with_label_values(&[&label, COMPENSATION]),
            push_failures: self.push_failures.with_label_values(l),
            latency_normal: self.push_latency.with_label_values(&[NORMAL]),
            latency_compensation: self.push_latency.with_label_values(&[COMPENSATION]),
            keys_in_flight: self.keys_in_flight.with_label_values(l),
            keys_waiting: self.keys_waiting.with_label_values(l),
            pushes_skipped: self.pushes_skipped.with_label_values(l),
            markers_expired: self.markers_expired.with_label_values(l),
            open_markers: self.open_markers.with_label_values(l),
            compensation_scan: self.compensation_scan.clone(),
            compensation_repushed: self.compensation_repushed.with_label_values(l),
            dead_letters: self.dead_letters.clone(),
            changelog_written: self.changelog_written.with_label_values(l),
            changelog_restored: self.changelog_restored.with_label_values(l),
            changelog_unreadable: self.changelog_unreadable.with_label_values(l),
            dead_letters_abandoned: self.dead_letters_abandoned.with_label_values(l),
            restore_duration: self.restore_duration.with_label_values(l),
            label,
            partition,
            member: self.clone(),
        }
    }

    /// Drops the gauges of a partition this member no longer holds, so sums
    /// over members count each partition once. Counters stay.
    pub fn forget_partition(&self, partition: i32) {
        let label = partition.to_string();
        let l = &[label.as_str()];
        let _ = self.keys_in_flight.remove_label_values(l);
        let _ = self.keys_waiting.remove_label_values(l);
        let _ = self.open_markers.remove_label_values(l);
        let _ = self.restore_duration.remove_label_values(l);
        let _ = self.committed_offset.remove_label_values(l);
        let _ = self.consumer_lag.remove_label_values(l);
        let _ = self.partition_paused.remove_label_values(l);
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        // Both derived from the assignment at each scrape, like /readyz.
        self.ready
            .set(i64::from(self.health.readiness().is_ready()));
        self.assigned_partitions
            .set(self.health.partitions() as i64);
        let mut out = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .expect("text encoding cannot fail on valid metrics");
        String::from_utf8(out).expect("the text format is UTF-8")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// One partition's series.
pub struct PartitionMetrics {
    pub(crate) member: Arc<Metrics>,
    pub(crate) partition: i32,
    pub(crate) label: String,
    pub(crate) events_consumed: IntCounter,
    pub(crate) events_merged: IntCounter,
    pub(crate) events_stale: IntCounter,
    pub(crate) pushes_normal: IntCounter,
    pub(crate) pushes_compensation: IntCounter,
    pub(crate) push_failures: IntCounter,
    pub(crate) latency_normal: Histogram,
    pub(crate) latency_compensation: Histogram,
    pub(crate) keys_in_flight: IntGauge,
    pub(crate) keys_waiting: IntGauge,
    pub(crate) pushes_skipped: IntCounter,
    pub(crate) markers_expired: IntCounter,
    pub(crate) open_markers: IntGauge,
    pub(crate) compensation_scan: Histogram,
    pub(crate) compensation_repushed: IntCounter,
    pub(crate) dead_letters: IntCounterVec,
    pub(crate) changelog_written: IntCounter,
    pub(crate) changelog_restored: IntCounter,
    pub(crate) changelog_unreadable: IntCounter,
    pub(crate) dead_letters_abandoned: IntCounter,
    pub(crate) restore_duration: prometheus::Gauge,
}

/// Where each assigned partition is on its way to consuming.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    Restoring,
    Consuming,
}

/// What `/readyz` answers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Readiness {
    Ready { partitions: Vec<i32> },
    NotReady(String),
}

impl Readiness {
    pub fn is_ready(&self) -> bool {
        matches!(self, Readiness::Ready { .. })
    }
}

/// The member's assignment and each partition's phase.
#[derive(Default)]
pub struct Health {
    state: Mutex<HealthState>,
}

#[derive(Default)]
struct HealthState {
    /// An assignment is in force (false before the first and during a rebalance).
    assigned: bool,
    stopping: bool,
    partitions: BTreeMap<i32, Phase>,
}

impl Health {
    fn with<T>(&self, f: impl FnOnce(&mut HealthState) -> T) -> T {
        f(&mut self.state.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// A rebalance handed these partitions over (they start restoring).
    pub fn assigned(&self, partitions: &[i32]) {
        self.with(|s| {
            s.assigned = true;
            for p in partitions {
                s.partitions.entry(*p).or_insert(Phase::Restoring);
            }
        })
    }

    /// A rebalance is taking these away; not ready until the next assignment.
    pub fn revoking(&self, partitions: &[i32]) {
        self.with(|s| {
            s.assigned = false;
            for p in partitions {
                s.partitions.remove(p);
            }
        })
    }

    pub fn consuming(&self, partition: i32) {
        self.with(|s| {
            if let Some(phase) = s.partitions.get_mut(&partition) {
                *phase = Phase::Consuming;
            }
        })
    }

    /// Partitions currently assigned (restoring or consuming).
    pub fn partitions(&self) -> usize {
        self.with(|s| s.partitions.len())
    }

    pub fn stopping(&self) {
        self.with(|s| s.stopping = true)
    }

    pub fn readiness(&self) -> Readiness {
        self.with(|s| {
            let restoring: Vec<i32> = s
                .partitions
                .iter()
                .filter(|(_, phase)| **phase == Phase::Restoring)
                .map(|(p, _)| *p)
                .collect();
            if s.stopping {
                Readiness::NotReady("stopping".into())
            } else if !s.assigned {
                Readiness::NotReady("waiting for a partition assignment".into())
            } else if !restoring.is_empty() {
                Readiness::NotReady(format!("restoring partitions {restoring:?}"))
            } else {
                Readiness::Ready {
                    partitions: s.partitions.keys().copied().collect(),
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_only_with_an_assignment_and_every_partition_restored() {
        let health = Health::default();
        assert!(!health.readiness().is_ready(), "no assignment yet");
        health.assigned(&[0, 1]);
        assert_eq!(
            health.readiness(),
            Readiness::NotReady("restoring partitions [0, 1]".into())
        );
        health.consuming(0);
        assert!(!health.readiness().is_ready());
        health.consuming(1);
        assert_eq!(
            health.readiness(),
            Readiness::Ready {
                partitions: vec![0, 1]
            }
        );
        health.revoking(&[1]);
        assert!(!health.readiness().is_ready(), "rebalancing");
        health.assigned(&[]);
        assert_eq!(
            health.readiness(),
            Readiness::Ready {
                partitions: vec![0]
            }
        );
        health.stopping();
        assert!(!health.readiness().is_ready());
    }

    #[test]
    fn an_empty_assignment_is_ready() {
        let health = Health::default();
        health.assigned(&[]);
        assert!(health.readiness().is_ready());
    }

    #[test]
    fn families_follow_the_naming_conventions() {
        let metrics = Arc::new(Metrics::new());
        let p = metrics.partition(3);
        p.events_consumed.inc();
        p.pushes_normal.inc();
        p.latency_normal.observe(0.01);
        let text = metrics.render();
        for line in text.lines().filter(|l| l.starts_with("# TYPE")) {
            let mut parts = line.split_whitespace().skip(2);
            let (name, kind) = (parts.next().unwrap(), parts.next().unwrap());
            assert!(name.starts_with("keyflight_"), "{name}");
            match kind {
                "counter" => assert!(name.ends_with("_total"), "{name}"),
                _ => assert!(!name.ends_with("_total"), "{name}"),
            }
        }
        assert!(text.contains("keyflight_events_consumed_total{partition=\"3\"} 1"));
        assert!(text.contains("keyflight_pushes_total{kind=\"normal\",partition=\"3\"} 1"));
        assert!(text.contains("keyflight_build_info{version="));
    }
}
