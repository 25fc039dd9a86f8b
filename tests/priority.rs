//! Integration tests: job priorities (`shared::priority`) with real test workers on the
//! broker at `AMQP_URL` (RabbitMQ 3.10 here, 4.x in compose): high jobs overtake a
//! normal backlog through their own queue and the worker's start gate, and keep their
//! priority through a retry.

use std::time::Duration;

use serde_json::json;
use shared::events::{JobEvent, JobState};
use shared::priority::Priority;
use uuid::Uuid;

use crate::support::{EventStream, TestEnv, eventually, job_keys, test_job};

const WORKER: &str = "vidpipe-testworker";
const PATIENCE: Duration = Duration::from_secs(60);

/// Stores a source and publishes a test job with `priority`; returns its id.
async fn submit(env: &TestEnv, priority: Priority, extra: serde_json::Value) -> Uuid {
    let (id, source, prefix) = job_keys("transcode");
    env.put_source(&source, id.as_bytes()).await;
    let body = test_job(id, &source, &prefix, extra);
    env.publish_raw(&priority.routing_key("transcode"), &body)
        .await;
    id
}

/// Every job announces its start at once (by default only jobs still running after
/// 0.5 s do): the start order is what these tests read.
const STARTED_AT_ONCE: (&str, &str) = ("VIDPIPE__WORKER__STARTED_EVENT_AFTER_SECS", "0");

/// The `started` events seen so far, in the order the worker started the jobs.
fn starts(events: &EventStream) -> Vec<&JobEvent> {
    events
        .seen
        .iter()
        .filter(|e| e.state == JobState::Started)
        .collect()
}

/// Waits until `n` jobs have completed.
async fn wait_completed(events: &mut EventStream, n: usize) {
    events
        .wait_for_nth("transcode", JobState::Completed, n, PATIENCE)
        .await;
}

/// Under a backlog of 20 normal jobs, three high jobs published while the first normal
/// one runs all start next, before every normal job queued before them; then the normal
/// backlog runs to the end (not starved).
#[tokio::test]
async fn high_jobs_start_before_a_backlog_of_twenty_normal_jobs() {
    let mut env = TestEnv::new().await;
    let mut events = env.follow_all_events().await;
    let mut normal = Vec::new();
    for _ in 0..20 {
        normal.push(submit(&env, Priority::Normal, json!({ "work_ms": 500 })).await);
    }
    env.spawn_worker(
        WORKER,
        "prio",
        &[("VIDPIPE__WORKER__CONCURRENCY", "1"), STARTED_AT_ONCE],
    );
    events
        .wait_for("transcode", JobState::Started, PATIENCE)
        .await;
    let mut high = Vec::new();
    for _ in 0..3 {
        high.push(submit(&env, Priority::High, json!({ "work_ms": 100 })).await);
    }
    wait_completed(&mut events, 23).await;
    let order: Vec<Uuid> = starts(&events).iter().map(|e| e.job_id).collect();
    assert_eq!(order.len(), 23, "each job started once: {order:?}");
    assert!(normal.contains(&order[0]), "a normal job was running first");
    assert!(
        high.iter().all(|h| order[1..4].contains(h)),
        "the high jobs start right after the running one: {order:?} (high: {high:?})"
    );
    assert!(
        order[4..].iter().all(|j| normal.contains(j)),
        "then the normal backlog, all of it"
    );
}

/// A high job that fails transiently comes back from the retry tier into the high queue:
/// its second attempt overtakes the normal backlog instead of queueing behind it.
#[tokio::test]
async fn a_retried_high_job_keeps_its_priority() {
    let mut env = TestEnv::new().await;
    let mut events = env.follow_all_events().await;
    let high = submit(&env, Priority::High, json!({ "fail_attempts": 1 })).await;
    for _ in 0..12 {
        submit(&env, Priority::Normal, json!({ "work_ms": 400 })).await;
    }
    env.spawn_worker(
        WORKER,
        "prio-retry",
        &[("VIDPIPE__WORKER__CONCURRENCY", "1"), STARTED_AT_ONCE],
    );
    wait_completed(&mut events, 13).await;
    let order: Vec<(Uuid, u32)> = starts(&events)
        .iter()
        .map(|e| (e.job_id, e.attempt))
        .collect();
    assert_eq!(order[0], (high, 1), "the high job starts first: {order:?}");
    let second = order
        .iter()
        .position(|s| *s == (high, 2))
        .expect("a second attempt of the high job");
    // The retry waits 0.3 s in its tier while 0.4 s normal jobs run: it is back after
    // one or two of them, far from the end of the backlog.
    assert!(
        second <= 3,
        "the retried high job overtakes the normal backlog: started {second}th in {order:?}"
    );
    let high_queue = env.topology.priority_queue("transcode", Priority::High);
    eventually(PATIENCE, "the high queue to drain", async || {
        env.queue_depth(&high_queue).await == 0
    })
    .await;
}

/// A dead high job replayed with `producer dead replay` goes back to the high queue.
#[tokio::test]
async fn a_replayed_dead_high_job_goes_back_to_the_high_queue() {
    let mut env = TestEnv::new().await;
    let w = env.spawn_worker(WORKER, "prio-dead", &[]);
    let id = submit(&env, Priority::High, json!({ "permanent": true })).await;
    let dead = env.topology.dead();
    eventually(PATIENCE, "the high job to be dead", async || {
        env.queue_depth(&dead).await == 1
    })
    .await;
    env.worker(w).signal("TERM");
    assert!(env.worker(w).wait_exit(PATIENCE).is_some());
    let out = env.producer(&["dead", "replay", &id.to_string()]).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let high = env.topology.priority_queue("transcode", Priority::High);
    eventually(PATIENCE, "the replayed job in the high queue", async || {
        env.queue_depth(&high).await == 1
    })
    .await;
    let normal = env.topology.work_queue("transcode");
    assert_eq!(env.queue_depth(&normal).await, 0);
}
