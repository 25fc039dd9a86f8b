//! Benchmark: the worker runtime's dispatch overhead and the shared publisher, each
//! against raw lapin on the same broker in the same run. Prints ratios (≥ 1.0 means
//! vidpipe is as fast as raw). Not a test: run with `cargo bench --bench dispatch`.
//!
//! - dispatch: N empty jobs through `shared::runtime::run` (parse, manifest check,
//!   source lookup, blocking-thread handler, manifest commit, events, ack) vs raw
//!   `basic_consume` + `ack`, at prefetch 1 and 50; and vs two floors: raw plus the
//!   least the job contract needs (a manifest created if absent, one `completed` event),
//!   done inline a job at a time (`floor`), and with each job a task of its own doing
//!   the storage work on a blocking thread and acking from there (`hop`), as any worker
//!   that runs a handler must, as many at once as the prefetch delivers. The clock starts at the first job settled:
//!   starting a worker (connect, declare, consumers) is not dispatch. Per job it also
//!   prints the CPU time of this process and of the broker (from `/proc`) and this
//!   process's context switches. Each prefetch runs in rounds (`DISPATCH_ROUNDS`, 5)
//!   of all four back to back, each round starting with the next one; the results are
//!   the rounds' medians.
//! - publish: `shared::broker::publish_confirmed` vs raw `basic_publish` + confirm.

#[path = "support/cpu.rs"]
mod cpu;

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
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

/// What consumes the jobs of one measured run.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Consumer {
    /// Raw lapin: parse, ack.
    Raw,
    /// Raw plus the least the job contract needs (manifest, `completed` event), inline.
    Floor,
    /// [`Consumer::Floor`] with its storage work and ack on a blocking thread, a task per
    /// job, as many at once as the prefetch lets the broker deliver.
    Hop,
    /// `shared::runtime::run` with an empty handler.
    Vidpipe,
}

impl Consumer {
    const ALL: [Consumer; 4] = [
        Consumer::Raw,
        Consumer::Floor,
        Consumer::Hop,
        Consumer::Vidpipe,
    ];

    fn name(self) -> &'static str {
        match self {
            Consumer::Raw => "raw",
            Consumer::Floor => "floor",
            Consumer::Hop => "hop",
            Consumer::Vidpipe => "vidpipe",
        }
    }

    fn describe(self) -> &'static str {
        match self {
            Consumer::Floor => "floor (raw + manifest + completed event, inline):    ",
            Consumer::Hop => "hop (the floor's storage work, ack, blocking threads):",
            _ => self.name(),
        }
    }
}

/// Does nothing but count its calls, and says when the run's last job has been handled:
/// the bench then waits without waking every millisecond to look (at prefetch 1, about a
/// job a millisecond, those wake-ups were a quarter of the client CPU charged to the
/// runtime: 463 µs a job with them, 350 without).
struct EmptyHandler {
    handled: AtomicUsize,
    last: usize,
    all_handled: Arc<tokio::sync::Notify>,
}

impl Handler for EmptyHandler {
    type Job = TranscodeJob;
    fn handle(&self, _: &TranscodeJob, _: &JobContext) -> Result<TaskOutput, JobError> {
        if self.handled.fetch_add(1, Ordering::Relaxed) + 1 == self.last {
            self.all_handled.notify_one();
        }
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

    /// Publishes `n` jobs (confirmed), then lets the broker settle for a moment, so the
    /// measured run does not share it with the tail of the publishing.
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
        tokio::time::sleep(Duration::from_millis(300)).await;
    }

    /// Raw lapin consume + ack, and with [`Consumer::Floor`] or [`Consumer::Hop`] also
    /// what the job contract needs at the least, done the cheapest way: the task's manifest
    /// written create-if-absent (staged, hard-linked into place) and one `completed` event
    /// published. `Floor` does it inline, a job at a time; `Hop` runs each job in a task
    /// of its own with the storage work on a blocking thread, as any worker must run a
    /// handler (a codec loop) off the async threads.
    async fn raw_consume(&self, n: usize, prefetch: u16, kind: Consumer) -> Measured {
        let events = self.conn.create_channel().await.unwrap();
        let store = self.data.path().join("store");
        self.fill(n).await;
        let ch = Arc::new(self.conn.create_channel().await.unwrap());
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
        let mut running = tokio::task::JoinSet::new();
        for i in 0..n {
            let d = consumer.next().await.unwrap().unwrap();
            // Parse like a worker would, so the comparison is about dispatch, not JSON.
            let job: TranscodeJob = messages::parse(&d.data).unwrap();
            let (job_id, dir) = (job.job_id, store.join(job.output_prefix.as_str()));
            let manifest = move || {
                std::fs::create_dir_all(&dir).unwrap();
                let staged = dir.join("manifest.json#staged");
                std::fs::write(&staged, format!("{{\"job_id\":\"{job_id}\"}}")).unwrap();
                // Created if absent: a redelivered job finds its manifest, as in a worker.
                match std::fs::hard_link(&staged, dir.join("manifest.json")) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                    Err(e) => panic!("{e}"),
                }
                std::fs::remove_file(&staged).unwrap();
            };
            let (events, exchange) = (events.clone(), self.topology.events_exchange());
            let event = async move {
                if kind != Consumer::Raw {
                    let key = format!("job.{job_id}.transcode.completed");
                    events
                        .basic_publish(
                            exchange.into(),
                            key.into(),
                            BasicPublishOptions::default(),
                            br#"{"state":"completed"}"#,
                            BasicProperties::default(),
                        )
                        .await
                        .unwrap();
                }
            };
            match kind {
                Consumer::Raw | Consumer::Vidpipe => {
                    d.acker.ack(BasicAckOptions::default()).await.unwrap();
                    event.await;
                }
                Consumer::Floor => {
                    manifest();
                    d.acker.ack(BasicAckOptions::default()).await.unwrap();
                    event.await;
                }
                // Each job its own task, as many at once as the broker delivers (the
                // prefetch), as a worker with that many slots runs them; the first alone,
                // so the clock starts at a settled job. The blocking thread acks as soon
                // as the manifest is in place, on the channel (lapin queues the frame on
                // its first poll): the fastest of the ways the runtime may ack, measured
                // both here (the runtime acks from there when the job is its only one).
                Consumer::Hop => {
                    let (ch, tag) = (ch.clone(), d.delivery_tag);
                    running.spawn(async move {
                        tokio::task::spawn_blocking(move || {
                            manifest();
                            let ack = ch.basic_ack(tag, BasicAckOptions::default());
                            let mut cx = Context::from_waker(std::task::Waker::noop());
                            assert!(!matches!(
                                std::pin::pin!(ack).poll(&mut cx),
                                Poll::Ready(Err(_))
                            ));
                        })
                        .await
                        .unwrap();
                        event.await;
                    });
                    if i == 0 {
                        running.join_next().await.unwrap().unwrap();
                    }
                    while let Some(done) = running.try_join_next() {
                        done.unwrap();
                    }
                }
            }
            if i == 0 {
                (start, cpu) = (Instant::now(), cpu_now(self.broker));
            }
        }
        while let Some(done) = running.join_next().await {
            done.unwrap();
        }
        let took = Measured::since(start, cpu, self.broker);
        ch.close(200, "done".into()).await.unwrap();
        events.close(200, "done".into()).await.unwrap();
        took
    }

    /// One measured run of `kind`.
    async fn consume(&self, n: usize, prefetch: u16, kind: Consumer) -> Measured {
        match kind {
            Consumer::Vidpipe => self.runtime_consume(n, prefetch).await,
            _ => self.raw_consume(n, prefetch, kind).await,
        }
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
        let all_handled = Arc::new(tokio::sync::Notify::new());
        let handler = EmptyHandler {
            handled: AtomicUsize::new(0),
            last: n,
            all_handled: all_handled.clone(),
        };
        let worker = tokio::spawn(run(handler, options, shutdown.clone()));
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
        // Asleep until the last job is handled, then a few polls for its ack: looking
        // every millisecond all along would charge the runtime a wake-up per job.
        all_handled.notified().await;
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
    // under `perf record`); with `DISPATCH_PROFILE_KIND=hop` (or raw, floor) that one.
    if let Ok(only) = std::env::var("DISPATCH_PROFILE_ONLY") {
        let prefetch: u16 = only.parse().expect("a prefetch count");
        let kind = std::env::var("DISPATCH_PROFILE_KIND").unwrap_or_default();
        let kind = Consumer::ALL
            .into_iter()
            .find(|k| k.name() == kind)
            .unwrap_or(Consumer::Vidpipe);
        bench.consume(4 * JOBS, prefetch, kind).await;
        bench.cleanup().await;
        return;
    }
    // This machine's broker and client share two cores with whatever else runs, and one
    // run of each varies by a third: each prefetch is measured in rounds of every consumer
    // back to back, and the medians of the rounds are the result.
    let rounds: usize = std::env::var("DISPATCH_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(5);
    // `DISPATCH_PREFETCH=1` (or 50): only that prefetch.
    let prefetches: Vec<u16> = match std::env::var("DISPATCH_PREFETCH") {
        Ok(p) => vec![p.parse().expect("a prefetch count")],
        Err(_) => vec![1, 50],
    };
    for prefetch in prefetches {
        // Warm up both paths once, then measure.
        bench.raw_consume(200, prefetch, Consumer::Raw).await;
        bench.runtime_consume(200, prefetch).await;
        let mut measured: Vec<[Measured; 4]> = Vec::with_capacity(rounds);
        for r in 0..rounds {
            let mut round = [None; 4];
            // Each round starts with the next consumer: whoever runs right after another
            // meets the broker still busy with that run's acks (a quorum queue's log), so a
            // fixed order would favour some consumer every round.
            let mut order = Consumer::ALL;
            order.rotate_left(r % Consumer::ALL.len());
            for kind in order {
                round[kind as usize] = Some(bench.consume(JOBS, prefetch, kind).await);
            }
            let round = round.map(|m| m.expect("every consumer ran"));
            println!(
                "  prefetch={prefetch:>2} round, jobs/s: {}",
                Consumer::ALL
                    .iter()
                    .map(|k| format!(
                        "{} {:.0}",
                        k.name(),
                        rate(JOBS - 1, round[*k as usize].took)
                    ))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            measured.push(round);
        }
        let median = |f: &dyn Fn(&[Measured; 4]) -> f64| {
            let mut v: Vec<f64> = measured.iter().map(f).collect();
            v.sort_by(f64::total_cmp);
            v[v.len() / 2]
        };
        let secs = |m: &Measured| m.took.as_secs_f64();
        let (raw, ours) = (Consumer::Raw as usize, Consumer::Vidpipe as usize);
        println!(
            "dispatch prefetch={prefetch:>2}: raw lapin {:>8.0} jobs/s, vidpipe runtime {:>8.0} jobs/s, ratio {:.2} (medians of {rounds} rounds)",
            median(&|r| rate(JOBS - 1, r[raw].took)),
            median(&|r| rate(JOBS - 1, r[ours].took)),
            median(&|r| secs(&r[raw]) / secs(&r[ours])),
        );
        for kind in [Consumer::Floor, Consumer::Hop] {
            let k = kind as usize;
            println!(
                "  {} {:>8.0} jobs/s, {} / raw {:.2}, vidpipe / {} {:.2}",
                kind.describe(),
                median(&|r| rate(JOBS - 1, r[k].took)),
                kind.name(),
                median(&|r| secs(&r[raw]) / secs(&r[k])),
                kind.name(),
                median(&|r| secs(&r[k]) / secs(&r[ours])),
            );
        }
        for kind in Consumer::ALL {
            let k = kind as usize;
            let per_job = |i: usize| {
                median(&|r| {
                    let (client, broker, switches) = r[k].per_job(JOBS - 1);
                    [client, broker, switches][i]
                })
            };
            println!(
                "  per job, {:>7}: client CPU {:>4.0} µs, broker CPU {:>4.0} µs, client context switches {:.1}",
                kind.name(),
                per_job(0),
                per_job(1),
                per_job(2),
            );
        }
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
