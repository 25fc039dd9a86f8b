//! Load: pushes thousands of small real jobs through several real worker processes and
//! reports jobs/s, p50/p99 latency from publish to completion, and whether every job
//! completed. Not a test.
//!
//! ```sh
//! cargo build --release --bins
//! LOAD_JOBS=2000 LOAD_WORKERS=4 cargo bench --bench load
//! ```
//!
//! Each job is a thumbnail job (one 96-pixel thumbnail of a tiny generated clip, no
//! poster, no sprite), so the figures are about the pipeline — broker, dispatch, storage,
//! manifests, events — with a real decode in every job. Workers are the release
//! `thumbnailer` binaries next to this benchmark, each with `worker.concurrency = 2`,
//! on the broker at `AMQP_URL` (default the local one) under a private topology prefix
//! that is deleted afterwards.

// Only its clip maker is used here; the measuring half serves the media benchmarks.
#[allow(dead_code)]
#[path = "support/measure.rs"]
mod measure;

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use futures::StreamExt;
use lapin::options::BasicPublishOptions;
use lapin::types::FieldTable;
use shared::broker;
use shared::events::JobEvent;
use shared::messages::{self, ImageFormat, ThumbnailJob};
use shared::settings::StorageSettings;
use shared::storage::Storage;
use shared::storage_key::StorageKey;
use shared::topology::Topology;
use uuid::Uuid;

fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn url() -> String {
    std::env::var("AMQP_URL").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

/// The release `thumbnailer` next to this benchmark binary (target/release/deps/..).
fn thumbnailer_bin() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let bin = exe.parent().unwrap().parent().unwrap().join("thumbnailer");
    assert!(
        bin.is_file(),
        "{} is missing: run `cargo build --release --bins` first",
        bin.display()
    );
    bin
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

    // Completion events, bound before anything is published.
    let (_events, mut consumer) = shared::events::subscribe(
        &conn,
        &topology.events_exchange(),
        &[
            "job.*.thumbnail.completed".to_owned(),
            "job.*.thumbnail.dead".to_owned(),
        ],
        "load",
    )
    .await
    .unwrap();

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
        if let Some(t) = published.get(&event.job_id) {
            latencies.push(now - *t);
        }
        if d.routing_key.as_str().ends_with(".dead") {
            dead += 1;
        } else {
            completed += 1;
        }
    }
    let elapsed = started.elapsed();
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
