//! Load: pushes thousands of small real jobs through several real worker processes and
//! reports jobs/s, p50/p99 latency from publish to completion, whether every job
//! completed, and what each job cost the broker: messages (the job's publish, delivery and
//! ack, and every event the workers sent, counted by following them all, as a dashboard
//! would) and the broker's CPU time (of the process listening on the broker's port, read
//! from /proc; the broker is shared, so the same idle-time rate measured just before is
//! taken off). Not a test.
//!
//! ```sh
//! cargo build --release --workspace --bins
//! LOAD_JOBS=2000 LOAD_WORKERS=4 cargo bench --bench load
//! ```
//!
//! Each job is a thumbnail job (one 96-pixel thumbnail of a tiny generated clip, no
//! poster, no sprite), so the figures are about the pipeline — broker, dispatch, storage,
//! manifests, events — with a real decode in every job. Workers are the release
//! `thumbnailer` binaries next to this benchmark, each with `worker.concurrency = 2`,
//! on the broker at `AMQP_URL` (default the local one) under a private topology prefix
//! that is deleted afterwards. `LOAD_WORKER_BIN` runs another thumbnailer binary (an
//! older build, for a before/after), `BROKER_PID` names the broker's process when it is
//! not found by its port.

// Only its clip maker is used here; the measuring half serves the media benchmarks.
#[allow(dead_code)]
#[path = "support/measure.rs"]
mod measure;
// Its context-switch count serves the dispatch benchmark.
#[allow(dead_code)]
#[path = "support/cpu.rs"]
mod cpu;

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use futures::StreamExt;
use lapin::options::BasicPublishOptions;
use lapin::types::FieldTable;
use shared::broker;
use shared::events::{JobEvent, JobState};
use shared::messages::{self, ImageFormat, ThumbnailJob};
use shared::settings::StorageSettings;
use shared::storage::Storage;
use shared::storage_key::StorageKey;
use shared::topology::Topology;
use uuid::Uuid;

use cpu::{broker_pid, cpu_secs};

fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn url() -> String {
    std::env::var("AMQP_URL").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

/// The release `thumbnailer` next to this benchmark binary (target/release/deps/..), or
/// `LOAD_WORKER_BIN`.
fn thumbnailer_bin() -> PathBuf {
    if let Some(bin) = std::env::var_os("LOAD_WORKER_BIN") {
        return bin.into();
    }
    let exe = std::env::current_exe().unwrap();
    let bin = exe.parent().unwrap().parent().unwrap().join("thumbnailer");
    assert!(
        bin.is_file(),
        "{} is missing: run `cargo build --release --workspace --bins` first",
        bin.display()
    );
    bin
}

/// The broker's CPU seconds per wall second over `for_`, with nothing of ours running:
/// what other users of a shared broker cost it meanwhile.
async fn idle_cpu_rate(pid: u32, for_: Duration) -> Option<f64> {
    let before = cpu_secs(pid)?;
    tokio::time::sleep(for_).await;
    Some((cpu_secs(pid)? - before) / for_.as_secs_f64())
}

#[tokio::main]
async fn main() {
    let jobs = env_or("LOAD_JOBS", 2000);
    let workers = env_or("LOAD_WORKERS", 4);
    let prefix = format!("load-{}.", &Uuid::new_v4().simple().to_string()[..8]);
    let topology = Topology::new(
        &prefix,
        vec![Duration::from_secs(5), Duration::from_secs(30)],
        20,
    );
    let conn = broker::try_connect(&url(), "vidpipe-load")
        .await
        .expect("RabbitMQ");
    let ch = broker::confirm_channel(&conn).await.unwrap();
    topology.declare(&ch).await.unwrap();

    let data = tempfile::tempdir_in("/dev/shm")
        .or_else(|_| tempfile::tempdir())
        .unwrap();
    let root = data.path().join("store");
    let storage = Storage::from_settings(&StorageSettings {
        root: root.clone(),
        ..Default::default()
    })
    .unwrap();
    let clip = data.path().join("clip.mp4");
    measure::clip(&clip, 1, "160x90");
    let source = StorageKey::new("uploads/load/source.mp4").unwrap();
    storage.put_file(&source, &clip, &|_| {}).await.unwrap();

    // Every event, bound before anything is published: completions end the wait, and the
    // count of all of them is the events' share of the broker's work.
    let (_events, mut consumer) = shared::events::subscribe(
        &conn,
        &topology.events_exchange(),
        &["job.#".to_owned()],
        "load",
    )
    .await
    .unwrap();

    // The broker's load from everyone else, measured before our workers start.
    let broker = broker_pid();
    let idle_rate = match broker {
        Some(pid) => idle_cpu_rate(pid, Duration::from_secs(3)).await,
        None => None,
    };

    let bin = thumbnailer_bin();
    let scratch = data.path().join("scratch");
    let mut children: Vec<Child> = (0..workers)
        .map(|i| {
            Command::new(&bin)
                .env("VIDPIPE__AMQP__URL", url())
                .env("VIDPIPE__TOPOLOGY__PREFIX", &prefix)
                .env("VIDPIPE__RETRY__DELAYS_SECS", "5,30")
                .env("VIDPIPE__STORAGE__ROOT", &root)
                .env("VIDPIPE__WORKER__SCRATCH_DIR", &scratch)
                .env("VIDPIPE__WORKER__CONCURRENCY", "2")
                .env("VIDPIPE__WORKER__NAME", format!("load-{i}"))
                .env("VIDPIPE__HEALTH__ENABLED", "false")
                .env("VIDPIPE__LOG__LEVEL", "warn")
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(data.path().join(format!("worker-{i}.log"))).unwrap())
                .spawn()
                .expect("starting a thumbnailer")
        })
        .collect();

    println!("load: {jobs} thumbnail jobs through {workers} thumbnailer processes (concurrency 2)");
    let cpu_before = broker.and_then(cpu_secs);
    let mut published: HashMap<Uuid, Instant> = HashMap::with_capacity(jobs);
    let started = Instant::now();
    let mut confirms = Vec::with_capacity(jobs);
    for _ in 0..jobs {
        let id = Uuid::new_v4();
        let job = ThumbnailJob {
            job_id: id,
            source: source.clone(),
            output_prefix: StorageKey::output_prefix(id, "thumbnail").unwrap(),
            poster: false,
            count: 1,
            timestamps: vec![],
            width: 96,
            format: ImageFormat::Jpeg,
            quality: 80,
            sprite: None,
        };
        published.insert(id, Instant::now());
        confirms.push(
            ch.basic_publish(
                topology.tasks_exchange().into(),
                "thumbnail".into(),
                BasicPublishOptions::default(),
                &messages::to_body(&job),
                broker::persistent_json(FieldTable::default()),
            )
            .await
            .unwrap(),
        );
    }
    for c in confirms {
        c.await.unwrap();
    }

    let mut latencies = Vec::with_capacity(jobs);
    let (mut completed, mut dead) = (0, 0);
    let mut events: HashMap<String, usize> = HashMap::new();
    let deadline = Instant::now() + Duration::from_secs(60 + jobs as u64 / 5);
    while completed + dead < jobs && Instant::now() < deadline {
        let Ok(Some(Ok(d))) = tokio::time::timeout(Duration::from_secs(5), consumer.next()).await
        else {
            continue;
        };
        let now = Instant::now();
        let Ok(event) = serde_json::from_slice::<JobEvent>(&d.data) else {
            continue;
        };
        *events.entry(event.state.as_str().to_owned()).or_default() += 1;
        if !event.state.is_terminal() {
            continue;
        }
        if let Some(t) = published.get(&event.job_id) {
            latencies.push(now - *t);
        }
        if event.state == JobState::Dead {
            dead += 1;
        } else {
            completed += 1;
        }
    }
    let elapsed = started.elapsed();
    let cpu_after = broker.and_then(cpu_secs);
    // Events are best effort; the manifests are the record of truth.
    let mut manifests = 0;
    for id in published.keys() {
        let prefix = StorageKey::output_prefix(*id, "thumbnail").unwrap();
        if storage.is_committed(&prefix).await.unwrap() {
            manifests += 1;
        }
    }
    latencies.sort();
    let pct = |p: f64| {
        latencies
            .get(((latencies.len() as f64 - 1.0) * p).round() as usize)
            .map_or(0.0, |d| d.as_secs_f64() * 1000.0)
    };
    println!(
        "load: {completed} completed, {dead} dead of {jobs} in {:.1} s -> {:.0} jobs/s; \
         latency publish->completed p50 {:.0} ms, p99 {:.0} ms; manifests {manifests}/{jobs}; {}",
        elapsed.as_secs_f64(),
        completed as f64 / elapsed.as_secs_f64(),
        pct(0.5),
        pct(0.99),
        if manifests == jobs {
            "every job completed"
        } else {
            "NOT every job completed"
        }
    );
    print_broker_cost(jobs, &events, elapsed, (cpu_before, cpu_after), idle_rate);
    if manifests < jobs {
        for i in 0..workers {
            let log = std::fs::read_to_string(data.path().join(format!("worker-{i}.log")));
            println!("worker {i} log:\n{}", log.unwrap_or_default());
        }
    }
    for c in &mut children {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(c.id().to_string())
            .status();
    }
    for c in &mut children {
        let _ = c.wait();
    }
    let _ = topology.delete(&ch).await;
}

/// What the jobs cost the broker: messages per job, and CPU per job when the broker's
/// process could be read.
fn print_broker_cost(
    jobs: usize,
    events: &HashMap<String, usize>,
    elapsed: Duration,
    (cpu_before, cpu_after): (Option<f64>, Option<f64>),
    idle_rate: Option<f64>,
) {
    let per_job = |n: usize| n as f64 / jobs as f64;
    let sent: usize = events.values().sum();
    let mut by_state: Vec<_> = events.iter().collect();
    by_state.sort();
    let by_state: Vec<String> = by_state
        .iter()
        .map(|(state, n)| format!("{state} {:.2}", per_job(**n)))
        .collect();
    // A retried job is published, delivered and acked again.
    let retries = events.get("retrying").copied().unwrap_or(0);
    let job_messages = per_job(3 * (jobs + retries));
    println!(
        "load: broker messages per job {:.2}: {job_messages:.2} publish+deliver+ack, {:.2} events \
         ({}), and one delivery per event to each follower (this bench follows all)",
        job_messages + per_job(sent),
        per_job(sent),
        by_state.join(", ")
    );
    if let (Some(before), Some(after)) = (cpu_before, cpu_after) {
        let used = after - before;
        let others = idle_rate.unwrap_or(0.0) * elapsed.as_secs_f64();
        println!(
            "load: broker CPU {:.2} ms per job ({:.2} ms before taking off {:.2} s of other \
             users' load, measured idle just before at {:.0}% of a core)",
            (used - others).max(0.0) * 1000.0 / jobs as f64,
            used * 1000.0 / jobs as f64,
            others,
            idle_rate.unwrap_or(0.0) * 100.0
        );
    } else {
        println!("load: broker CPU not measured (its process not found; set BROKER_PID)");
    }
}
