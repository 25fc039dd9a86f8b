//! Benchmark: the producer's publish path vs raw lapin, same broker, same messages, in one
//! run. Not a test: `cargo bench -p producer --bench publish` (needs RabbitMQ at
//! `AMQP_URL`, default the local one).
//!
//! - producer: `Broker::publish_all` of each job's two messages (pooled connection,
//!   reused confirm channel, `mandatory`, both confirms awaited before the next job),
//!   exactly what `producer upload` does after storing a file.
//! - raw: one lapin confirm channel, `basic_publish` + await the confirm, per message.
//! - raw per job: the same, but a job's two confirms awaited together as the producer
//!   does, so the second ratio isolates the producer's own overhead.
//!
//! Sources are "already in storage" (only publishing is measured). Everything runs on a
//! private topology prefix, deleted at the end. Prints jobs/s for each and the ratio
//! producer / raw (target ≥ 0.9).

use std::time::{Duration, Instant};

use lapin::options::{BasicPublishOptions, QueuePurgeOptions};
use lapin::{Channel, Confirmation};
use producer::publisher::{Broker, Outgoing};
use producer::upload::{JobOptions, JobPlan};
use shared::broker;
use shared::settings::{Secret, Settings};
use uuid::Uuid;

/// Jobs per measured round (two messages each).
const JOBS: usize = 2000;
const ROUNDS: usize = 3;

fn url() -> String {
    std::env::var("AMQP_URL").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

async fn raw_publish(channel: &Channel, jobs: &[Vec<Outgoing>]) {
    for messages in jobs {
        for m in messages {
            let confirm = channel
                .basic_publish(
                    m.exchange.as_str().into(),
                    m.routing_key.as_str().into(),
                    BasicPublishOptions {
                        mandatory: true,
                        ..Default::default()
                    },
                    &m.body,
                    m.properties.clone(),
                )
                .await
                .expect("publish")
                .await
                .expect("confirm");
            assert!(matches!(confirm, Confirmation::Ack(None)), "{confirm:?}");
        }
    }
}

/// Raw lapin with the producer's pipelining: a job's messages published, then their
/// confirms awaited. Isolates the producer's own overhead (pool, channel reuse, checks).
async fn raw_publish_per_job(channel: &Channel, jobs: &[Vec<Outgoing>]) {
    for messages in jobs {
        let mut confirms = Vec::with_capacity(messages.len());
        for m in messages {
            confirms.push(
                channel
                    .basic_publish(
                        m.exchange.as_str().into(),
                        m.routing_key.as_str().into(),
                        BasicPublishOptions {
                            mandatory: true,
                            ..Default::default()
                        },
                        &m.body,
                        m.properties.clone(),
                    )
                    .await
                    .expect("publish"),
            );
        }
        for confirm in confirms {
            let confirm = confirm.await.expect("confirm");
            assert!(matches!(confirm, Confirmation::Ack(None)), "{confirm:?}");
        }
    }
}

async fn producer_publish(broker: &Broker, jobs: &[Vec<Outgoing>]) {
    for messages in jobs {
        broker
            .publish_all(messages)
            .await
            .expect("producer publish");
    }
}

async fn purge(channel: &Channel, broker: &Broker) {
    for task in broker.topology.registry().names() {
        channel
            .queue_purge(
                broker.topology.work_queue(task).into(),
                QueuePurgeOptions::default(),
            )
            .await
            .expect("purge");
    }
}

fn rate(d: Duration) -> f64 {
    JOBS as f64 / d.as_secs_f64()
}

#[tokio::main]
async fn main() {
    let mut settings = Settings::default();
    settings.amqp.url = Secret::new(url());
    settings.topology.prefix = format!("bench-pub-{}.", &Uuid::new_v4().simple().to_string()[..8]);
    let broker = match Broker::connect(&settings).await {
        Ok(b) => b,
        Err(e) => {
            eprintln!("publish bench: {e}");
            std::process::exit(3);
        }
    };
    let jobs: Vec<Vec<Outgoing>> = (0..JOBS)
        .map(|_| {
            JobPlan::new(Uuid::new_v4(), "mp4", &JobOptions::default()).messages(&broker.topology)
        })
        .collect();
    let bytes: usize = jobs.iter().flatten().map(|m| m.body.len()).sum();
    let conn = broker::try_connect(&url(), "vidpipe-bench-raw")
        .await
        .expect("RabbitMQ");
    let raw = broker::confirm_channel(&conn)
        .await
        .expect("confirm channel");
    let admin = conn.create_channel().await.expect("channel");

    // Warm up both paths (connections, channels, queue leaders).
    producer_publish(&broker, &jobs[..100]).await;
    raw_publish(&raw, &jobs[..100]).await;
    purge(&admin, &broker).await;

    let (mut best_producer, mut best_raw, mut best_piped) =
        (Duration::MAX, Duration::MAX, Duration::MAX);
    for round in 1..=ROUNDS {
        let t = Instant::now();
        raw_publish(&raw, &jobs).await;
        let raw_time = t.elapsed();
        purge(&admin, &broker).await;
        let t = Instant::now();
        raw_publish_per_job(&raw, &jobs).await;
        let piped_time = t.elapsed();
        purge(&admin, &broker).await;
        let t = Instant::now();
        producer_publish(&broker, &jobs).await;
        let producer_time = t.elapsed();
        purge(&admin, &broker).await;
        println!(
            "round {round}: producer {:>7.0} jobs/s, raw lapin {:>7.0} jobs/s, raw lapin per job {:>7.0} jobs/s",
            rate(producer_time),
            rate(raw_time),
            rate(piped_time)
        );
        best_producer = best_producer.min(producer_time);
        best_raw = best_raw.min(raw_time);
        best_piped = best_piped.min(piped_time);
    }
    println!(
        "publish, {JOBS} jobs x 2 persistent messages ({} bytes average), confirms awaited, best of {ROUNDS}:",
        bytes / (JOBS * 2)
    );
    println!(
        "  producer publish path: {:>7.0} jobs/s",
        rate(best_producer)
    );
    println!("  raw lapin + confirm:   {:>7.0} jobs/s", rate(best_raw));
    println!(
        "  raw lapin, a job's confirms awaited together: {:>7.0} jobs/s",
        rate(best_piped)
    );
    println!(
        "  ratio producer/raw:    {:.2} (target >= 0.9)",
        rate(best_producer) / rate(best_raw)
    );
    println!(
        "  ratio producer/raw with the same pipelining: {:.2} (the producer's own overhead)",
        rate(best_producer) / rate(best_piped)
    );
    broker
        .topology
        .delete(&admin)
        .await
        .expect("deleting the bench topology");
    let _ = conn.close(200, "done".into()).await;
}
