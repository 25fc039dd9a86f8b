//! Benchmark: the worker runtime's dispatch overhead and the shared publisher, each
//! against raw lapin on the same broker in the same run. Prints ratios (≥ 1.0 means
//! vidpipe is as fast as raw). Not a test: run with `cargo bench --bench dispatch`.
//!
//! - dispatch: N empty jobs through `shared::runtime::run` (parse, manifest check,
//!   source lookup, blocking-thread handler, manifest commit, events, ack) vs raw
//!   `basic_consume` + `ack`, at prefetch 1 and 50.
//! - publish: `shared::broker::publish_confirmed` vs raw `basic_publish` + confirm.

use std::time::{Duration, Instant};

use futures::StreamExt;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection};
use shared::handler::{Handler, JobContext, TaskOutput};
use shared::health::Health;
use shared::messages::{self, TranscodeJob};
use shared::runtime::{WorkerOptions, run};
use shared::settings::{Settings, StorageSettings};
use shared::storage::Storage;
use shared::storage_key::StorageKey;
use shared::topology::Topology;
use shared::{JobError, broker};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

const JOBS: usize = 2000;

struct EmptyHandler;
impl Handler for EmptyHandler {
    type Job = TranscodeJob;
    fn handle(&self, _: &TranscodeJob, _: &JobContext) -> Result<TaskOutput, JobError> {
        Ok(TaskOutput::default())
    }
}

fn url() -> String {
    std::env::var("AMQP_URL").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

struct Bench {
    conn: Connection,
    topology: Topology,
    prefix: String,
    storage: Storage,
    data: tempfile::TempDir,
}

impl Bench {
    async fn new() -> Self {
        let prefix = format!("bench-{}.", &Uuid::new_v4().simple().to_string()[..8]);
        let topology = Topology::new(&prefix, vec![Duration::from_secs(5)], 20);
        let conn = broker::try_connect(&url(), "vidpipe-bench")
            .await
            .expect("RabbitMQ");
        let ch = conn.create_channel().await.unwrap();
        topology.declare(&ch).await.unwrap();
        // Storage and scratch on tmpfs when there is one: this measures dispatch, not the
        // disk (ext4 with online discard makes every rmdir a synchronous device trim).
        let data = tempfile::tempdir_in("/dev/shm")
            .or_else(|_| tempfile::tempdir())
            .unwrap();
        let storage = Storage::from_settings(&StorageSettings {
            root: data.path().join("store"),
            ..Default::default()
        })
        .unwrap();
        storage
            .put_bytes(&StorageKey::new("uploads/src.bin").unwrap(), b"x".to_vec())
            .await
            .unwrap();
        Self {
            conn,
            topology,
            prefix,
            storage,
            data,
        }
    }

    async fn fill(&self, n: usize) {
        let ch = broker::confirm_channel(&self.conn).await.unwrap();
        let mut pending = Vec::with_capacity(n);
        for _ in 0..n {
            let id = Uuid::new_v4();
            let job = TranscodeJob {
                job_id: id,
                source: StorageKey::new("uploads/src.bin").unwrap(),
                output_prefix: StorageKey::output_prefix(id, "transcode").unwrap(),
                renditions: vec![],
                formats: vec![messages::OutputFormat::Mp4],
                codecs: vec![messages::VideoCodec::H264],
                segments: Default::default(),
                part: None,
            };
            let confirm = ch
                .basic_publish(
                    self.topology.tasks_exchange().into(),
                    "transcode".into(),
                    BasicPublishOptions::default(),
                    &messages::to_body(&job),
                    broker::persistent_json(FieldTable::default()),
                )
                .await
                .unwrap();
            pending.push(confirm);
        }
        for c in pending {
            c.await.unwrap();
        }
    }

    async fn raw_consume(&self, n: usize, prefetch: u16) -> Duration {
        self.fill(n).await;
        let ch = self.conn.create_channel().await.unwrap();
        ch.basic_qos(prefetch, BasicQosOptions::default())
            .await
            .unwrap();
        let mut consumer = ch
            .basic_consume(
                self.topology.work_queue("transcode").into(),
                "".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .unwrap();
        let start = Instant::now();
        for _ in 0..n {
            let d = consumer.next().await.unwrap().unwrap();
            // Parse like a worker would, so the comparison is about dispatch, not JSON.
            let _job: TranscodeJob = messages::parse(&d.data).unwrap();
            d.acker.ack(BasicAckOptions::default()).await.unwrap();
        }
        let took = start.elapsed();
        ch.close(200, "done".into()).await.unwrap();
        took
    }

    async fn runtime_consume(&self, n: usize, prefetch: u16) -> Duration {
        self.fill(n).await;
        let mut settings = Settings::default();
        settings.topology.prefix = self.prefix.clone();
        settings.retry.delays_secs = vec![5.0];
        settings.storage.root = self.data.path().join("store");
        settings.worker.scratch_dir = self.data.path().join("scratch");
        settings.amqp.url = shared::settings::Secret::new(url());
        let health = Health::new();
        let options = WorkerOptions {
            settings,
            concurrency: prefetch,
            storage: self.storage.clone(),
            health: health.clone(),
        };
        let shutdown = CancellationToken::new();
        let start = Instant::now();
        let worker = tokio::spawn(run(EmptyHandler, options, shutdown.clone()));
        // The series' guard is a read lock on the family: take it afresh each time, as
        // holding it would block the worker creating its series at start.
        let labels = Health::labels("transcode", "completed");
        let done = || health.jobs.get_or_create(&labels).get() as usize;
        while done() < n {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let took = start.elapsed();
        shutdown.cancel();
        worker.await.unwrap().unwrap();
        took
    }

    async fn publish(&self, n: usize, shared_path: bool) -> Duration {
        let ch = broker::confirm_channel(&self.conn).await.unwrap();
        let body = vec![b'x'; 300];
        let start = Instant::now();
        for _ in 0..n {
            if shared_path {
                broker::publish_confirmed(
                    &ch,
                    &self.topology.dead(),
                    "transcode",
                    &body,
                    broker::persistent_json(FieldTable::default()),
                )
                .await
                .unwrap();
            } else {
                ch.basic_publish(
                    self.topology.dead().into(),
                    "transcode".into(),
                    BasicPublishOptions::default(),
                    &body,
                    BasicProperties::default().with_delivery_mode(2),
                )
                .await
                .unwrap()
                .await
                .unwrap();
            }
        }
        start.elapsed()
    }

    async fn cleanup(self) {
        let ch = self.conn.create_channel().await.unwrap();
        self.topology.delete(&ch).await.unwrap();
    }
}

fn rate(n: usize, d: Duration) -> f64 {
    n as f64 / d.as_secs_f64()
}

#[tokio::main]
async fn main() {
    let bench = Bench::new().await;
    println!("vidpipe dispatch benchmark ({JOBS} jobs per run, same broker, same run)");
    for prefetch in [1u16, 50] {
        // Warm up both paths once, then measure.
        bench.raw_consume(200, prefetch).await;
        bench.runtime_consume(200, prefetch).await;
        let raw = bench.raw_consume(JOBS, prefetch).await;
        let ours = bench.runtime_consume(JOBS, prefetch).await;
        println!(
            "dispatch prefetch={prefetch:>2}: raw lapin {:>8.0} jobs/s, vidpipe runtime {:>8.0} jobs/s, ratio {:.2}",
            rate(JOBS, raw),
            rate(JOBS, ours),
            raw.as_secs_f64() / ours.as_secs_f64()
        );
    }
    bench.publish(200, false).await;
    let raw = bench.publish(JOBS, false).await;
    let ours = bench.publish(JOBS, true).await;
    println!(
        "publish with confirms: raw lapin {:>8.0} msg/s, vidpipe publisher {:>8.0} msg/s, ratio {:.2}",
        rate(JOBS, raw),
        rate(JOBS, ours),
        raw.as_secs_f64() / ours.as_secs_f64()
    );
    bench.cleanup().await;
}
