//! `producer cancel` against real workers and the real broker: queued tasks are dropped
//! when delivered, running ones stop within seconds without a retry or partial output,
//! finished ones are left alone, a split transcode is cancelled whole, and hostile
//! control messages change nothing.

use std::time::{Duration, Instant};

use serde_json::json;
use shared::events::JobState;
use shared::storage_key::StorageKey;
use uuid::Uuid;

use crate::support::fixtures;
use crate::support::{TestEnv, eventually, job_keys, stays, test_job};

const PATIENCE: Duration = Duration::from_secs(180);

/// `producer cancel ARGS…`: its exit code and stdout + stderr.
async fn cancel(env: &TestEnv, args: &[&str]) -> (Option<i32>, String) {
    let mut all = vec!["cancel"];
    all.extend_from_slice(args);
    let out = env.producer(&all).await;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code(), text)
}

/// Stores a source and publishes a test-worker job for it; its id and output prefix.
async fn submit_test_job(env: &TestEnv, extra: serde_json::Value) -> (Uuid, StorageKey) {
    let (id, source, prefix) = job_keys("transcode");
    env.put_source(&source, b"bytes").await;
    env.publish_raw("transcode", &test_job(id, &source, &prefix, extra))
        .await;
    (id, prefix)
}

/// Nothing of the task but its marker is stored: no manifest, no run, no part.
async fn only_the_marker(env: &TestEnv, prefix: &StorageKey) -> bool {
    let keys = env.storage_list(prefix).await;
    keys.len() == 1 && keys[0].ends_with("/cancelled.json")
}

/// A job cancelled while queued is dropped when delivered: `cancelled`, no output, not
/// dead, not retried, and `status` says cancelled.
#[tokio::test]
async fn a_queued_job_is_dropped_when_delivered() {
    let mut env = TestEnv::new().await;
    let (id, prefix) = submit_test_job(&env, json!({"work_ms": 100})).await;
    let mut events = env.follow_events(id).await;
    let (code, text) = cancel(&env, &[&id.to_string()]).await;
    assert_eq!(code, Some(0), "{text}");
    assert!(text.contains("transcode  cancelled"), "{text}");
    env.spawn_worker("vidpipe-testworker", "w1", &[]);
    let event = events
        .wait_for("transcode", JobState::Cancelled, PATIENCE)
        .await;
    assert_eq!(event.attempt, 1);
    let queue = env.topology.work_queue("transcode");
    eventually(PATIENCE, "the queue to be empty", async || {
        env.queue_depth(&queue).await == 0
    })
    .await;
    assert!(only_the_marker(&env, &prefix).await);
    assert_eq!(env.queue_depth(&env.topology.dead()).await, 0);
    let status = env.producer(&["status", &id.to_string()]).await;
    let shown = String::from_utf8_lossy(&status.stdout);
    assert!(shown.contains("transcode  cancelled"), "{shown}");
}

/// A running transcode stops within seconds of the cancel: the codec loop sees the
/// token, the delivery is acked without a retry, nothing partial is stored and the
/// scratch directory is gone.
#[tokio::test]
async fn a_running_transcode_stops_fast_with_nothing_partial_and_no_retry() {
    let mut env = TestEnv::new().await;
    let clip = fixtures::sample_mp4(env.data.path(), "long.mp4", 30, 1280, 720);
    env.spawn_worker("transcoder", "t1", &[]);
    let (id, prefix) = env
        .submit_file("transcode", &clip, json!({"formats": ["mp4"]}))
        .await;
    let mut events = env.follow_events(id).await;
    events
        .wait_for("transcode", JobState::Progress, PATIENCE)
        .await;
    let asked = Instant::now();
    let (code, text) = cancel(&env, &[&id.to_string(), "--task", "transcode"]).await;
    assert_eq!(code, Some(0), "{text}");
    events
        .wait_for("transcode", JobState::Cancelled, Duration::from_secs(30))
        .await;
    let took = asked.elapsed();
    // About two seconds is the promise; the margin is for a loaded test machine.
    assert!(took < Duration::from_secs(6), "took {took:?} to stop");
    eventually(
        Duration::from_secs(10),
        "scratch to be removed",
        async || env.scratch_leftovers().is_empty(),
    )
    .await;
    assert!(only_the_marker(&env, &prefix).await);
    stays(
        Duration::from_secs(2),
        "no retry, no dead letter",
        async || {
            env.queue_depth(&env.topology.dead()).await == 0
                && env.queue_depth(&env.topology.work_queue("transcode")).await == 0
        },
    )
    .await;
    events.poll(Duration::from_millis(200)).await;
    let retried = events
        .seen
        .iter()
        .any(|e| matches!(e.state, JobState::Retrying | JobState::Dead));
    assert!(!retried, "{:?}", events.seen);
    assert!(env.worker(0).is_running());
}

/// Cancelling a completed task says so, exits 1 and changes nothing: the manifest stays,
/// no marker is written.
#[tokio::test]
async fn cancelling_a_completed_task_says_so_and_changes_nothing() {
    let mut env = TestEnv::new().await;
    env.spawn_worker("vidpipe-testworker", "w1", &[]);
    let (id, prefix) = submit_test_job(&env, json!({})).await;
    let manifest = env.wait_manifest(&prefix, PATIENCE).await;
    let keys_before = env.storage_list(&prefix).await;
    let (code, text) = cancel(&env, &[&id.to_string(), "--task", "transcode"]).await;
    assert_eq!(code, Some(1), "{text}");
    assert!(text.contains("already completed"), "{text}");
    assert!(text.contains("nothing to cancel"), "{text}");
    assert_eq!(env.storage_list(&prefix).await, keys_before);
    assert_eq!(env.storage.manifest(&prefix).await.unwrap(), Some(manifest));
}

/// An unknown job id is a clear error (exit 1), a malformed one a usage error (exit 2).
#[tokio::test]
async fn an_unknown_job_cannot_be_cancelled() {
    let env = TestEnv::new().await;
    let (code, text) = cancel(&env, &[&Uuid::new_v4().to_string()]).await;
    assert_eq!(code, Some(1), "{text}");
    assert!(text.contains("no job"), "{text}");
    let (code, text) = cancel(&env, &["not-a-job"]).await;
    assert_eq!(code, Some(2), "{text}");
    let (code, text) = cancel(&env, &[&Uuid::new_v4().to_string(), "--task", "bogus"]).await;
    assert_eq!(code, Some(2), "{text}");
}

/// A transcode split into segments is cancelled whole: running and queued segments stop
/// or are dropped, no stitch commits, the committed parts are removed.
#[tokio::test]
async fn a_segmented_job_is_cancelled_whole() {
    let mut env = TestEnv::new().await;
    let dir = env.data.path().to_path_buf();
    let clip = fixtures::segmentable_clip(&dir);
    let split = [
        ("VIDPIPE__TRANSCODER__SEGMENT_THRESHOLD_SECS", "3"),
        ("VIDPIPE__TRANSCODER__SEGMENT_SECS", "2"),
        ("VIDPIPE__TRANSCODER__HLS_SEGMENT_S", "1"),
        ("VIDPIPE__TRANSCODER__KEYFRAME_INTERVAL_S", "1"),
    ];
    env.spawn_worker("transcoder", "t1", &split);
    let rendition = json!([{"name": "240p", "height": 240, "video_kbps": 600, "audio_kbps": 64}]);
    let (id, prefix) = env
        .submit_file(
            "transcode",
            &clip,
            json!({"renditions": rendition, "formats": ["mp4", "hls"]}),
        )
        .await;
    let mut events = env.follow_events(id).await;
    eventually(PATIENCE, "a segment to report progress", async || {
        events.poll(Duration::from_millis(200)).await;
        events.seen.iter().any(|e| e.part.is_some())
    })
    .await;
    let (code, text) = cancel(&env, &[&id.to_string()]).await;
    assert_eq!(code, Some(0), "{text}");
    events
        .wait_for("transcode", JobState::Cancelled, PATIENCE)
        .await;
    let queue = env.topology.work_queue("transcode");
    eventually(PATIENCE, "every part dropped", async || {
        env.queue_depth(&queue).await == 0
    })
    .await;
    eventually(Duration::from_secs(30), "parts removed", async || {
        only_the_marker(&env, &prefix).await
    })
    .await;
    stays(Duration::from_secs(3), "no stitch commits", async || {
        !env.storage_committed(&prefix).await
    })
    .await;
    assert_eq!(env.queue_depth(&env.topology.dead()).await, 0);
    assert!(
        !events.seen.iter().any(|e| e.state == JobState::Completed),
        "{:?}",
        events.seen
    );
}

/// Hostile control messages (not JSON, 2 MiB, an unknown or nil job id) neither stop
/// nor crash a worker; a real cancel still gets through afterwards.
#[tokio::test]
async fn hostile_control_messages_change_nothing() {
    let mut env = TestEnv::new().await;
    env.spawn_worker("vidpipe-testworker", "w1", &[]);
    let (id, prefix) = submit_test_job(&env, json!({"work_ms": 60_000})).await;
    let mut events = env.follow_events(id).await;
    events
        .wait_for("transcode", JobState::Progress, PATIENCE)
        .await;
    let events_exchange = env.topology.events_exchange();
    let huge = vec![b'x'; 2 << 20];
    let unknown = format!(r#"{{"schema":1,"job_id":"{}"}}"#, Uuid::new_v4());
    let bodies: [&[u8]; 5] = [
        b"not json",
        &huge,
        unknown.as_bytes(),
        br#"{"schema":1,"job_id":"00000000-0000-0000-0000-000000000000"}"#,
        br#"{"schema":1,"job_id":[1,2,3]}"#,
    ];
    for body in bodies {
        shared::broker::publish_confirmed(
            &env.channel,
            &events_exchange,
            &shared::cancel::control_routing_key(id),
            body,
            lapin::BasicProperties::default(),
        )
        .await
        .expect("publishing a hostile control message");
    }
    stays(
        Duration::from_secs(2),
        "the job to keep running",
        async || !env.storage_committed(&prefix).await,
    )
    .await;
    events.poll(Duration::from_millis(100)).await;
    assert!(
        !events.seen.iter().any(|e| e.state == JobState::Cancelled),
        "{:?}",
        events.seen
    );
    assert!(env.worker(0).is_running(), "{}", env.logs());
    let (code, text) = cancel(&env, &[&id.to_string()]).await;
    assert_eq!(code, Some(0), "{text}");
    events
        .wait_for("transcode", JobState::Cancelled, Duration::from_secs(10))
        .await;
    assert!(env.worker(0).is_running());
}
