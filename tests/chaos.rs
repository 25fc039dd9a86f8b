//! Conservation under chaos: real jobs through real transcoder and thumbnailer processes
//! on a private broker node, while workers are SIGKILLed and replaced, their broker
//! connections are closed, and the broker itself restarts once. Afterwards every
//! submitted job must be in exactly one terminal state — completed with valid outputs,
//! dead with a reason, or cancelled (some are cancelled with `producer cancel` while
//! things break) with no manifest — and the dead ones must be exactly
//! the ones built to fail.
//!
//! CI-sized here; `CHAOS_JOBS=200 CHAOS_SECS=600 cargo test --test integration chaos::
//! -- --nocapture` is the longer soak.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use serde_json::json;
use shared::storage_key::StorageKey;
use uuid::Uuid;

use crate::support::fixtures::{self, ffprobe};
use crate::support::node::PrivateNode;
use crate::support::{TestEnv, assert_dead_exactly, env_number};

/// The private node's AMQP port (its distribution port is this + 20000).
const NODE_PORT: u16 = 5681;

/// Connections of the workers (everything but the test's own), closed by the broker.
fn close_worker_connections(node: &PrivateNode) -> usize {
    let out = node.ctl(&["list_connections", "-q", "pid", "client_properties"]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let mut closed = 0;
    for line in text.lines().filter(|l| !l.contains("vidpipe-tests")) {
        if let Some(pid) = line
            .split_whitespace()
            .next()
            .filter(|p| p.starts_with('<'))
        {
            let _ = node.ctl(&["close_connection", pid, "chaos test"]);
            closed += 1;
        }
    }
    closed
}

/// Jobs expected to complete, by output prefix: `(job id, task, prefix)`.
type Expected = BTreeMap<String, (Uuid, &'static str, StorageKey)>;

/// Submits one good transcode and one good thumbnail job of `clip`; returns the
/// transcode's job id and prefix.
async fn submit_pair(
    env: &TestEnv,
    clip: &std::path::Path,
    expect_ok: &mut Expected,
) -> (Uuid, StorageKey) {
    let jobs = [
        (
            "transcode",
            json!({"formats": ["mp4", "hls"], "renditions":
                [{"name": "270p", "height": 270, "video_kbps": 600, "audio_kbps": 64}]}),
        ),
        (
            "thumbnail",
            json!({"count": 3, "sprite": {"interval_s": 1, "columns": 4, "width": 64}}),
        ),
    ];
    let mut first = None;
    for (task, extra) in jobs {
        let (id, prefix) = env.submit_file(task, clip, extra).await;
        first.get_or_insert((id, prefix.clone()));
        expect_ok.insert(prefix.as_str().to_owned(), (id, task, prefix));
    }
    first.expect("two jobs were submitted")
}

/// Cancels a job's transcode with `producer cancel`; true if the producer says it did
/// (a cancel during the broker restart may fail: the job then must complete).
async fn cancel_transcode(env: &TestEnv, id: Uuid) -> bool {
    let out = env
        .producer(&["cancel", &id.to_string(), "--task", "transcode"])
        .await;
    out.status.success()
}

/// The cancelled jobs (of `may_cancel`): a cancel marker and no manifest. One that is
/// also committed counts as completed only: a committed manifest wins.
async fn settled_cancels(
    env: &TestEnv,
    may_cancel: &BTreeSet<String>,
    completed: &BTreeMap<String, shared::manifest::Manifest>,
) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for name in may_cancel.iter().filter(|n| !completed.contains_key(*n)) {
        let marker = StorageKey::new(format!("{name}{}", shared::cancel::MARKER)).unwrap();
        if env.storage.exists(&marker).await.unwrap() {
            out.insert(name.clone());
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_job_ends_in_exactly_one_terminal_state_under_chaos() {
    let jobs_per_task = env_number("CHAOS_JOBS", 10) as usize;
    let chaos_for = Duration::from_secs(env_number("CHAOS_SECS", 25));
    let node = tokio::task::spawn_blocking(|| PrivateNode::start(NODE_PORT, ""))
        .await
        .unwrap();
    let mut env = TestEnv::on_broker(&node.amqp_url()).await;
    let clip = fixtures::sample_mp4(env.data.path(), "clip.mp4", 8, 480, 270);
    let junk = env.data.path().join("junk.mp4");
    std::fs::write(&junk, "not a video\n".repeat(100)).unwrap();

    // Submit: good transcodes and thumbnails, plus a few built to fail.
    let mut expect_ok: Expected = BTreeMap::new();
    let mut expect_dead: BTreeSet<Uuid> = BTreeSet::new();
    for _ in 0..jobs_per_task {
        submit_pair(&env, &clip, &mut expect_ok).await;
    }
    for task in ["transcode", "thumbnail"] {
        let (id, _) = env.submit_file(task, &junk, json!({})).await;
        expect_dead.insert(id);
    }

    // Workers: two of each, replaced as they are killed.
    let mut live: Vec<(usize, &str)> = Vec::new();
    let mut spawned = 0;
    let mut spawn = |env: &mut TestEnv, binary: &'static str| {
        spawned += 1;
        (
            env.spawn_worker(binary, &format!("{binary}-{spawned}"), &[]),
            binary,
        )
    };
    for binary in ["transcoder", "transcoder", "thumbnailer", "thumbnailer"] {
        let w = spawn(&mut env, binary);
        live.push(w);
    }

    // Chaos.
    let (mut kills, mut cuts, mut restarts) = (0, 0, 0);
    let started = Instant::now();
    let mut round = 0u64;
    // Jobs the producer cancelled: each ends cancelled, or completed if it won the race.
    let mut may_cancel: BTreeSet<String> = BTreeSet::new();
    while started.elapsed() < chaos_for {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        round += 1;
        if round == 6 && restarts == 0 {
            let node_ref = &node;
            tokio::task::block_in_place(|| node_ref.restart_app(Duration::from_secs(2)));
            restarts += 1;
            env.reconnect().await;
        } else if round.is_multiple_of(3) {
            cuts += tokio::task::block_in_place(|| close_worker_connections(&node));
        } else {
            let pick = (round as usize * 7) % live.len();
            let (index, binary) = live.remove(pick);
            env.worker(index).signal("KILL");
            env.worker(index).wait_exit(Duration::from_secs(10));
            kills += 1;
            let w = spawn(&mut env, binary);
            live.push(w);
        }
        // Keep work flowing while things break; cancel some of it.
        let (id, prefix) = submit_pair(&env, &clip, &mut expect_ok).await;
        if round % 4 == 1 && cancel_transcode(&env, id).await {
            may_cancel.insert(prefix.as_str().to_owned());
        }
    }
    let submitted = expect_ok.len() + expect_dead.len();

    // Settle: every job reaches a terminal state.
    let deadline = Instant::now() + Duration::from_secs(240);
    let mut completed: BTreeMap<String, shared::manifest::Manifest> = BTreeMap::new();
    let mut dead: Vec<crate::support::DeadLetter> = Vec::new();
    let mut cancelled: BTreeSet<String>;
    loop {
        for (name, (_, _, prefix)) in &expect_ok {
            if !completed.contains_key(name)
                && let Some(m) = env.storage.manifest(prefix).await.unwrap()
            {
                completed.insert(name.clone(), m);
            }
        }
        cancelled = settled_cancels(&env, &may_cancel, &completed).await;
        dead.extend(env.take_all(&env.topology.dead()).await);
        if completed.len() + cancelled.len() + dead.len() >= submitted {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "after chaos only {} completed, {} cancelled and {} dead of {submitted}\n{}",
            completed.len(),
            cancelled.len(),
            dead.len(),
            env.logs()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    // A little longer: nothing else may turn up (no job in two terminal states).
    tokio::time::sleep(Duration::from_secs(2)).await;
    dead.extend(env.take_all(&env.topology.dead()).await);

    println!(
        "chaos: {submitted} jobs submitted, {} completed, {} cancelled, {} dead; {kills} \
         workers SIGKILLed, {cuts} connections closed, {restarts} broker restart(s)",
        completed.len(),
        cancelled.len(),
        dead.len()
    );
    assert_dead_exactly(&dead, &expect_dead);
    assert!(
        cancelled.is_subset(&may_cancel),
        "only cancelled jobs end cancelled"
    );
    assert_eq!(
        completed.len() + cancelled.len(),
        expect_ok.len(),
        "a job was lost"
    );
    for name in &cancelled {
        let keys = env.storage_list(&expect_ok[name].2).await;
        // A worker SIGKILLed mid-commit may leave an unreferenced run behind (as for any
        // job); what must not exist is a manifest, which would make outputs visible.
        assert!(
            !keys.iter().any(|k| k.ends_with("/manifest.json")),
            "a cancelled job has a manifest: {keys:?}"
        );
    }

    // Every completed job's outputs exist whole: sizes match the manifest, videos and
    // images decode.
    for (prefix, manifest) in &completed {
        let (id, task, _) = &expect_ok[prefix];
        assert_eq!(manifest.completion.job_id, *id);
        for o in &manifest.outputs {
            let path = env.storage_root().join(o.key.as_str());
            let size = std::fs::metadata(&path)
                .unwrap_or_else(|e| panic!("{task} output {path:?}: {e}"))
                .len();
            assert_eq!(size, o.size_bytes, "{path:?} half-written");
            let name = o.name.as_str();
            if name.ends_with(".mp4") {
                assert_eq!(
                    ffprobe(&path)["streams"][0]["codec_name"],
                    "h264",
                    "{path:?}"
                );
            } else if name.ends_with(".jpg") {
                image::open(&path).unwrap_or_else(|e| panic!("{path:?}: {e}"));
            }
        }
    }
    drop(env);
    drop(node);
}
