//! Segment-parallel transcoding, measured end to end: real `transcoder` processes pinned
//! to cores with `taskset`, the real broker, real storage, one long generated source with
//! the default ladder. Wall time is from publishing the job to its manifest. Not a test.
//!
//! ```sh
//! cargo build --release --workspace --bins
//! cargo bench --bench segments                    # 3-minute 1080p source
//! SEG_BENCH_SECS=60 cargo bench --bench segments  # shorter
//! ```
//!
//! Prints, measured in the same run:
//! - (a) one worker on one core, one pass / (b) two workers on one core each, split:
//!   the speed-up of spreading one video over two workers (target ≥ 1.8);
//! - (c) two workers sharing both cores, split / one worker on both cores, one pass: the
//!   cost of splitting on one machine (target ≤ 1.05);
//! - a scaling model for 8, 32 and 128 workers from the measured plan, segment and
//!   stitch times (a model, not a measurement).
//!
//! Workers are the binaries in `VIDPIPE_BIN_DIR` (default: the release ones next to this
//! benchmark), on the broker at `AMQP_URL` under a private topology prefix, deleted after.

#[allow(dead_code)]
#[path = "support/measure.rs"]
mod measure;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use futures::StreamExt;
use shared::events::{JobEvent, JobState};
use shared::settings::StorageSettings;
use shared::storage::Storage;
use shared::storage_key::StorageKey;
use shared::topology::Topology;
use uuid::Uuid;

fn url() -> String {
    std::env::var("AMQP_URL").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

fn bin_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("VIDPIPE_BIN_DIR") {
        return dir.into();
    }
    let exe = std::env::current_exe().unwrap();
    exe.parent().unwrap().parent().unwrap().to_path_buf()
}

/// One worker: the cores it is pinned to and its decoder/encoder threads.
struct Pin {
    cpus: &'static str,
    threads: &'static str,
}

/// What one run measured.
struct Run {
    wall: Duration,
    /// From publishing to the "split into N parts" event.
    plan: Option<Duration>,
    /// Each segment's time from its `started` to its completion.
    segments: Vec<Duration>,
    /// The stitch's handler time (the manifest's `duration_s`).
    stitch: Option<Duration>,
}

/// Runs one scenario: workers pinned as `pins`, one job with `--segments` `mode`.
async fn scenario(name: &str, source: &Path, pins: &[Pin], mode: &str, seg: (f64, f64)) -> Run {
    let prefix = format!("segbench{}.", &Uuid::new_v4().simple().to_string()[..8]);
    let data = tempfile::tempdir().unwrap();
    let root = data.path().join("storage");
    std::fs::create_dir_all(&root).unwrap();
    let storage = Storage::from_settings(&StorageSettings {
        root: root.clone(),
        ..Default::default()
    })
    .unwrap();
    let conn = shared::broker::try_connect(&url(), "segbench")
        .await
        .unwrap();
    // The workers' own topology (default retry tiers and delivery limit): a queue
    // declared with other arguments would refuse them.
    let mut settings = shared::settings::Settings::default();
    settings.topology.prefix = prefix.clone();
    let topology = Topology::from_settings(&settings);
    let setup = conn.create_channel().await.unwrap();
    topology.declare(&setup).await.unwrap();

    let job_id = Uuid::new_v4();
    let key = StorageKey::new(format!("uploads/{job_id}/source.mp4")).unwrap();
    storage.put_file(&key, source, &|_| {}).await.unwrap();
    let (_ch, mut events) = shared::events::subscribe(
        &conn,
        &topology.events_exchange(),
        &[format!("job.{job_id}.#")],
        "",
    )
    .await
    .unwrap();

    let mut workers: Vec<Child> = pins
        .iter()
        .enumerate()
        .map(|(i, pin)| {
            Command::new("taskset")
                .args(["-c", pin.cpus])
                .arg(bin_dir().join("transcoder"))
                .env("VIDPIPE__AMQP__URL", url())
                .env("VIDPIPE__TOPOLOGY__PREFIX", &prefix)
                .env("VIDPIPE__STORAGE__ROOT", &root)
                .env("VIDPIPE__WORKER__SCRATCH_DIR", data.path().join("scratch"))
                .env("VIDPIPE__WORKER__NAME", format!("{name}-{i}"))
                .env("VIDPIPE__WORKER__JOB_TIMEOUT_SECS", "7200")
                // Each segment's time is measured from its `started` event.
                .env("VIDPIPE__WORKER__STARTED_EVENT_AFTER_SECS", "0")
                .env("VIDPIPE__TRANSCODER__THREADS", pin.threads)
                .env(
                    "VIDPIPE__TRANSCODER__SEGMENT_THRESHOLD_SECS",
                    seg.0.to_string(),
                )
                .env("VIDPIPE__TRANSCODER__SEGMENT_SECS", seg.1.to_string())
                .env("VIDPIPE__LOG__LEVEL", "warn")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("starting a transcoder")
        })
        .collect();
    // Let the workers connect before the clock starts.
    tokio::time::sleep(Duration::from_secs(2)).await;

    let output_prefix = StorageKey::output_prefix(job_id, "transcode").unwrap();
    let job = serde_json::json!({
        "schema": 1, "task": "transcode", "job_id": job_id, "source": key.as_str(),
        "output_prefix": output_prefix.as_str(), "segments": mode,
    });
    let publish = conn.create_channel().await.unwrap();
    publish.confirm_select(Default::default()).await.unwrap();
    let started = Instant::now();
    shared::broker::publish_confirmed(
        &publish,
        &topology.tasks_exchange(),
        "transcode",
        &serde_json::to_vec(&job).unwrap(),
        shared::broker::persistent_json(Default::default()),
    )
    .await
    .unwrap();

    let mut run = Run {
        wall: Duration::ZERO,
        plan: None,
        segments: Vec::new(),
        stitch: None,
    };
    let mut part_started = std::collections::HashMap::new();
    loop {
        let Some(Ok(delivery)) = events.next().await else {
            panic!("{name}: the event stream ended");
        };
        let Ok(event) = serde_json::from_slice::<JobEvent>(&delivery.data) else {
            continue;
        };
        let at = started.elapsed();
        match (&event.state, &event.part) {
            (JobState::Progress, None) if event.detail.is_some() => run.plan = Some(at),
            (JobState::Started, Some(p)) if p.stage == "segment" => {
                part_started.insert(p.index, at);
            }
            (JobState::Progress, Some(p))
                if p.stage == "segment" && event.percent == Some(100.0) =>
            {
                if let Some(from) = part_started.get(&p.index) {
                    run.segments.push(at - *from);
                }
            }
            (JobState::Completed, _) => break,
            (JobState::Dead, _) => panic!("{name}: the job is dead: {:?}", event.detail),
            _ => {}
        }
    }
    run.wall = started.elapsed();
    let manifest = storage
        .manifest(&output_prefix)
        .await
        .unwrap()
        .expect("a manifest");
    if run.plan.is_some() {
        run.stitch = Some(Duration::from_secs_f64(manifest.completion.duration_s));
    }
    for w in &mut workers {
        let _ = w.kill();
        let _ = w.wait();
    }
    topology.delete(&setup).await.ok();
    println!(
        "{name:<44} {:>8.1} s{}",
        run.wall.as_secs_f64(),
        if run.segments.is_empty() {
            String::new()
        } else {
            format!("  ({} segments)", run.segments.len())
        }
    );
    run
}

#[tokio::main]
async fn main() {
    let secs: u32 = std::env::var("SEG_BENCH_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(180);
    let dir = tempfile::tempdir().unwrap();
    let source = dir.path().join("source.mp4");
    measure::clip(&source, secs, "1920x1080");
    // Split anything over a third of the source, in segments of about a sixth.
    let seg = (f64::from(secs) / 3.0, (f64::from(secs) / 6.0).max(4.0));
    println!(
        "source: {secs} s 1080p, default ladder; segments of {:.0} s",
        seg.1
    );

    let one = |cpus| Pin { cpus, threads: "1" };
    let a = scenario(
        "(a) 1 worker, 1 core, one pass",
        &source,
        &[one("0")],
        "off",
        seg,
    )
    .await;
    let b = scenario(
        "(b) 2 workers, 1 core each, split",
        &source,
        &[one("0"), one("1")],
        "auto",
        seg,
    )
    .await;
    let both = || Pin {
        cpus: "0-1",
        threads: "0",
    };
    let c_split = scenario(
        "(c) 2 workers sharing 2 cores, split",
        &source,
        &[both(), both()],
        "auto",
        seg,
    )
    .await;
    let c_one = scenario(
        "(c) 1 worker, 2 cores, one pass",
        &source,
        &[both()],
        "off",
        seg,
    )
    .await;

    let ratio = |x: &Run, y: &Run| x.wall.as_secs_f64() / y.wall.as_secs_f64();
    println!("(a)/(b) = {:.2}  (target >= 1.8)", ratio(&a, &b));
    println!(
        "(c) split / one pass = {:.2}  (target <= 1.05)",
        ratio(&c_split, &c_one)
    );

    // The model: planning, then the segments in waves of W, then the stitch (audio runs
    // beside the segments and is shorter than a wave here).
    let n = b.segments.len().max(1);
    let mean = b.segments.iter().map(Duration::as_secs_f64).sum::<f64>() / n as f64;
    let plan = b.plan.map_or(0.0, |d| d.as_secs_f64());
    let stitch = b.stitch.map_or(0.0, |d| d.as_secs_f64());
    println!(
        "model (not measured): plan {plan:.1} s + waves of {mean:.1} s per segment + stitch {stitch:.1} s"
    );
    for source_min in [secs as f64 / 60.0, 120.0] {
        let segments = (source_min * 60.0 / seg.1).ceil();
        for workers in [8.0, 32.0, 128.0] {
            let waves = (segments / workers).ceil();
            // Stitching is a copy: it grows with the source, not with the workers.
            let stitch_s = stitch * source_min * 60.0 / f64::from(secs);
            println!(
                "  model: {source_min:>5.1} min source, {workers:>3} workers: {:>7.1} s",
                plan + waves * mean + stitch_s
            );
        }
    }
}
