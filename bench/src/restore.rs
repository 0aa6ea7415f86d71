//! Restoring markers from a changelog in a fresh `keyflight run`.

use std::time::{Duration, Instant};

use keyflight::kafka::{client_config, Role};
use keyflight::metrics::scrape::http_get;
use keyflight::state::{Marker, MarkerCodec};
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};

use crate::{drain_limit, scrape, App, Env, Restore, Result};

/// Restores `markers` markers in a fresh `keyflight run`.
pub(crate) fn restore(env: &Env, markers: u64) -> Result<Restore> {
    let partitions = env.partitions;
    let app = App::create(env, "restore")?;
    let changelog = app.settings.changelog_topic();
    let producer: ThreadedProducer<DefaultProducerContext> =
        client_config(&app.settings, Role::Producer)
            .set("linger.ms", "20")
            .set("batch.num.messages", "10000")
            .create()
            .map_err(|e| e.to_string())?;
    let codec = MarkerCodec::new();
    let value = bytes::Bytes::from_static(br#"{"status":"active","score":42}"#);
    for i in 0..markers {
        let key = format!("user-{i:07}");
        let encoded = codec.encode(&Marker {
            t1: 1_000,
            t2: 1_000,
            version: i,
            value: Some(value.clone()),
            offset: None,
            value_cut: false,
        });
        let mut record = BaseRecord::<str, [u8]>::to(&changelog)
            .key(&key)
            .payload(&encoded)
            .partition((i % partitions as u64) as i32);
        loop {
            match producer.send(record) {
                Ok(()) => break,
                Err((_, back)) => {
                    record = back;
                    std::thread::sleep(Duration::from_millis(1)); // queue full: let it drain
                }
            }
        }
    }
    producer
        .flush(Duration::from_secs(120))
        .map_err(|e| e.to_string())?;

    let started = Instant::now();
    let mut kf = app.keyflight(&app.state.with_extension("restore.log"))?;
    let addr = kf.metrics_addr()?;
    kf.wait(drain_limit(markers), |_| {
        let ready = http_get(&addr, "/readyz").is_ok_and(|(s, _)| s == 200);
        let restored = scrape(&addr)
            .map(|m| m.sum("keyflight_changelog_records_restored_total", &[]))
            .unwrap_or(0.0);
        (ready && restored >= markers as f64).then_some(())
    })?;
    let start_to_ready = started.elapsed().as_secs_f64();
    let m = scrape(&addr)?;
    let seconds = m
        .series("keyflight_restore_duration_seconds", &[])
        .map(|(_, v)| v)
        .fold(0.0, f64::max);
    let rss = kf.peak_rss_mb();
    kf.stop()?;
    Ok(Restore {
        markers,
        seconds,
        records_per_s: markers as f64 / seconds.max(1e-9),
        start_to_ready_seconds: start_to_ready,
        peak_rss_mb: rss,
    })
}
