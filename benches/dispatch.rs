//! Benchmark: the worker runtime's dispatch overhead and the shared publisher, each
//! against raw lapin on the same broker in the same run. Prints ratios (≥ 1.0 means
//! vidpipe is as fast as raw). Not a test: run with `cargo bench --bench dispatch`.
//!
//! - dispatch: N empty jobs through `shared::runtime::run` (parse, manifest check,
//!   source lookup, blocking-thread handler, manifest commit, events, ack) vs raw
//!   `basic_consume` + `ack`, at prefetch 1 and 50; and vs the floor, raw plus the least
//!   the job contract needs (a manifest created if absent, one `completed` event), done
//!   inline. The clock starts at the first job settled: starting a worker (connect,
//!   declare, consumers) is not dispatch. Per job it also prints the CPU time of this
//!   process and of the broker (from `/proc`) and this process's context switches.
//! - publish: `shared::broker::publish_confirmed` vs raw `basic_publish` + confirm.

#[path = "support/cpu.rs"]
mod cpu;

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

const JOBS: usize = 4000;

/// One measured consume run: its wall time and the CPU time this process (client) and
/// the broker spent meanwhile, all over the same span.
#[derive(Clone, Copy)]
struct Measured {
    took: Duration,
    client_cpu: f64,
    broker_cpu: f64,
    /// Context switches of this process's threads.
    switches: f64,
}

/// CPU seconds of this process and of the broker so far, and this process's context
/// switches.
fn cpu_now(broker: Option<u32>) -> (f64, f64, u64) {
    (
        cpu::cpu_secs(std::process::id()).unwrap_or(f64::NAN),
        broker.and_then(cpu::cpu_secs).unwrap_or(f64::NAN),
        cpu::own_context_switches(),
    )
}

impl Measured {
    fn since(start: Instant, cpu: (f64, f64, u64), broker: Option<u32>) -> Self {
        let (client, brk, switches) = cpu_now(broker);
        Self {
            took: start.elapsed(),
            client_cpu: client - cpu.0,
            broker_cpu: brk - cpu.1,
            switches: switches.saturating_sub(cpu.2) as f64,
        }
    }
    /// Microseconds of client and broker CPU per job, and client context switches.
    fn per_job(&self, jobs: usize) -> (f64, f64, f64) {
        let n = jobs as f64;
        (
            self.client_cpu * 1e6 / n,
            self.broker_cpu * 1e6 / n,
            self.switches / n,
        )
    }
}

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
    /// The broker's process, for its CPU time (when it runs on this machine).
    broker: Option<u32>,
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
            broker: cpu::broker_pid(),
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
                ladder: Default::default(),
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

    /// Raw lapin consume + ack; with `floor`, also what the job contract needs at the
    /// least, done the cheapest way, inline: the task's manifest written create-if-absent
    /// (staged, hard-linked into place) and one `completed` event published. Our runtime
    /// cannot beat that floor; its distance to it is its own overhead.
    async fn raw_consume(&self, n: usize, prefetch: u16, floor: bool) -> Measured {
        let events = self.conn.create_channel().await.unwrap();
        let store = self.data.path().join("store");
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
        let (mut start, mut cpu) = (Instant::now(), cpu_now(self.broker));
        for i in 0..n {
            let d = consumer.next().await.unwrap().unwrap();
            // Parse like a worker would, so the comparison is about dispatch, not JSON.
            let job: TranscodeJob = messages::parse(&d.data).unwrap();
            if floor {
                let dir = store.join(job.output_prefix.as_str());
                std::fs::create_dir_all(&dir).unwrap();
                let staged = dir.join("manifest.json#staged");
                std::fs::write(&staged, format!("{{\"job_id\":\"{}\"}}", job.job_id)).unwrap();
                std::fs::hard_link(&staged, dir.join("manifest.json")).unwrap();
                std::fs::remove_file(&staged).unwrap();
            }
            d.acker.ack(BasicAckOptions::default()).await.unwrap();
            if floor {
                let key = format!("job.{}.transcode.completed", job.job_id);
                events
                    .basic_publish(
                        self.topology.events_exchange().into(),
                        key.into(),
                        BasicPublishOptions::default(),
                        br#"{"state":"completed"}"#,
                        BasicProperties::default(),
                    )
                    .await
                    .unwrap();
            }
            if i == 0 {
                (start, cpu) = (Instant::now(), cpu_now(self.broker));
            }
        }
        let took = Measured::since(start, cpu, self.broker);
        ch.close(200, "done".into()).await.unwrap();
        events.close(200, "done".into()).await.unwrap();
        took
    }

    async fn runtime_consume(&self, n: usize, prefetch: u16) -> Measured {
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
        let worker = tokio::spawn(run(EmptyHandler, options, shutdown.clone()));
        // The series' guard is a read lock on the family: take it afresh each time, as
        // holding it would block the worker creating its series at start.
        let labels = Health::labels("transcode", "completed");
        let done = || health.jobs.get_or_create(&labels).get() as usize;
        // The clock starts at the first job settled, as the raw consumer's does: the
        // worker's start (connect, declare, consumers, heartbeat) is not dispatch.
        while done() < 1 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let (start, cpu, first) = (Instant::now(), cpu_now(self.broker), done());
        while done() < n {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let mut took = Measured::since(start, cpu, self.broker);
        // Scaled to the raw run's n - 1 jobs (the first settled may have been several).
        let scale = (n - 1) as f64 / (n - first) as f64;
        took.took = took.took.mul_f64(scale);
        took.client_cpu *= scale;
        took.broker_cpu *= scale;
        took.switches *= scale;
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
    // `DISPATCH_PROFILE_ONLY=50`: only the runtime, longer, at that prefetch (to run
    // under `perf record`).
    if let Ok(only) = std::env::var("DISPATCH_PROFILE_ONLY") {
        let prefetch: u16 = only.parse().expect("a prefetch count");
        bench.runtime_consume(4 * JOBS, prefetch).await;
        bench.cleanup().await;
        return;
    }
    for prefetch in [1u16, 50] {
        // Warm up both paths once, then measure.
        bench.raw_consume(200, prefetch, false).await;
        bench.runtime_consume(200, prefetch).await;
        let raw = bench.raw_consume(JOBS, prefetch, false).await;
        let floor = bench.raw_consume(JOBS, prefetch, true).await;
        let ours = bench.runtime_consume(JOBS, prefetch).await;
        println!(
            "dispatch prefetch={prefetch:>2}: raw lapin {:>8.0} jobs/s, vidpipe runtime {:>8.0} jobs/s, ratio {:.2}",
            rate(JOBS - 1, raw.took),
            rate(JOBS - 1, ours.took),
            raw.took.as_secs_f64() / ours.took.as_secs_f64()
        );
        println!(
            "  floor (raw + manifest + completed event, inline): {:>8.0} jobs/s, vidpipe / floor {:.2}",
            rate(JOBS - 1, floor.took),
            floor.took.as_secs_f64() / ours.took.as_secs_f64()
        );
        let (floor_client, floor_broker, floor_sw) = floor.per_job(JOBS - 1);
        println!(
            "  floor per job: client CPU {floor_client:.0} µs, broker CPU {floor_broker:.0} µs, client context switches {floor_sw:.1}"
        );
        let ((raw_client, raw_broker, raw_sw), (our_client, our_broker, our_sw)) =
            (raw.per_job(JOBS - 1), ours.per_job(JOBS - 1));
        println!(
            "  per job: client CPU {raw_client:.0} µs raw, {our_client:.0} µs vidpipe; broker CPU {raw_broker:.0} µs raw, {our_broker:.0} µs vidpipe; client context switches {raw_sw:.1} raw, {our_sw:.1} vidpipe"
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
