//! Integration tests: the shared worker runtime, driven through the test worker
//! (`tests/support/testworker.rs`) as real processes against the real broker.

use std::time::Duration;

use serde_json::json;
use shared::events::{EventPublisher, JobState};
use shared::inflight::InFlight;
use shared::storage::Storage;
use shared::storage_key::StorageKey;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::support::{TestEnv, broker_ctl, eventually, job_keys, stays, test_job};

const WORKER: &str = "vidpipe-testworker";
const PATIENCE: Duration = Duration::from_secs(30);

/// Puts a source and publishes a test job for it; returns its id and output prefix.
async fn submit(env: &TestEnv, extra: serde_json::Value) -> (Uuid, StorageKey) {
    let (id, source, prefix) = job_keys("transcode");
    env.put_source(&source, id.as_bytes()).await;
    env.publish_raw("transcode", &test_job(id, &source, &prefix, extra))
        .await;
    (id, prefix)
}

/// Happy path: a job is handled, its output and manifest committed, the queue emptied.
#[tokio::test]
async fn job_completes_with_outputs_and_manifest() {
    let mut env = TestEnv::new().await;
    env.spawn_worker(WORKER, "w1", &[]);
    let (id, prefix) = submit(&env, json!({})).await;
    let manifest = env.wait_manifest(&prefix, PATIENCE).await;
    assert_eq!(manifest.completion.job_id, id);
    assert_eq!(manifest.completion.task, "transcode");
    assert_eq!(manifest.completion.attempt, 1);
    let out = manifest.outputs[0].key.clone();
    assert!(
        out.as_str().starts_with(prefix.as_str()),
        "outputs live under the task's prefix"
    );
    let bytes = env
        .storage
        .get_bytes(&out)
        .await
        .unwrap()
        .expect("output exists");
    assert_eq!(bytes, id.as_bytes());
    assert_eq!(manifest.outputs[0].size_bytes, 16);
    let queue = env.topology.work_queue("transcode");
    eventually(PATIENCE, "the work queue to drain", async || {
        env.queue_depth(&queue).await == 0
    })
    .await;
}

/// Fair dispatch: two workers with prefetch 1 share a batch of slow jobs.
#[tokio::test]
async fn two_workers_with_prefetch_one_share_slow_jobs() {
    let mut env = TestEnv::new().await;
    env.spawn_worker(WORKER, "fair-a", &[("VIDPIPE__WORKER__CONCURRENCY", "1")]);
    env.spawn_worker(WORKER, "fair-b", &[("VIDPIPE__WORKER__CONCURRENCY", "1")]);
    let mut prefixes = Vec::new();
    for _ in 0..6 {
        prefixes.push(submit(&env, json!({ "work_ms": 600 })).await.1);
    }
    let mut by_worker = std::collections::HashMap::<String, u32>::new();
    for p in &prefixes {
        let m = env.wait_manifest(p, PATIENCE).await;
        *by_worker.entry(m.completion.worker).or_default() += 1;
    }
    assert_eq!(
        by_worker.len(),
        2,
        "both workers should get jobs: {by_worker:?}"
    );
    assert!(
        by_worker.values().all(|n| *n >= 2),
        "jobs should be shared fairly: {by_worker:?}"
    );
}

/// A transient failure goes through a retry tier and succeeds on the next attempt.
#[tokio::test]
async fn transient_failure_is_retried_then_succeeds() {
    let mut env = TestEnv::new().await;
    env.spawn_worker(WORKER, "retry", &[]);
    let (id, source, prefix) = job_keys("transcode");
    env.put_source(&source, b"x").await;
    let mut events = env.follow_events(id).await;
    env.publish_raw(
        "transcode",
        &test_job(id, &source, &prefix, json!({ "fail_attempts": 1 })),
    )
    .await;
    let retrying = events
        .wait_for("transcode", JobState::Retrying, PATIENCE)
        .await;
    assert_eq!(retrying.attempt, 1);
    assert!(retrying.detail.unwrap().contains("failing attempt 1"));
    let manifest = env.wait_manifest(&prefix, PATIENCE).await;
    assert_eq!(
        manifest.completion.attempt, 2,
        "the second attempt should be the one that succeeded"
    );
}

/// Retries exhausted: the job lands in the parking lot with the reason and attempt count.
#[tokio::test]
async fn exhausted_retries_go_dead_with_reason_and_attempts() {
    let mut env = TestEnv::new().await;
    env.spawn_worker(WORKER, "exhaust", &[("VIDPIPE__RETRY__MAX_ATTEMPTS", "3")]);
    let (_, prefix) = submit(&env, json!({ "fail_attempts": 99 })).await;
    let dead = env.wait_dead(1, PATIENCE).await;
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].attempts(), Some(3));
    let reason = dead[0].reason();
    assert!(
        reason.contains("gave up after 3 attempts") && reason.contains("failing attempt 3"),
        "{reason}"
    );
    assert_eq!(
        dead[0].header("x-vidpipe-worker").as_deref(),
        Some("exhaust")
    );
    assert!(dead[0].header("x-vidpipe-failed-at").is_some());
    assert_eq!(
        dead[0].header("x-vidpipe-task").as_deref(),
        Some("transcode")
    );
    assert!(env.storage.manifest(&prefix).await.unwrap().is_none());
}

/// A permanent failure is dead at once, after one attempt.
#[tokio::test]
async fn permanent_failure_is_dead_without_retry() {
    let mut env = TestEnv::new().await;
    env.spawn_worker(WORKER, "perm", &[]);
    submit(&env, json!({ "permanent": true })).await;
    let dead = env.wait_dead(1, PATIENCE).await;
    assert_eq!(dead[0].attempts(), Some(1));
    assert!(
        dead[0].reason().contains("permanent failure requested"),
        "{}",
        dead[0].reason()
    );
}

/// Poison (invalid JSON, unknown schema, a key with `..`, a non-JSON content type) is
/// dead at once, never retried.
#[tokio::test]
async fn poison_messages_are_dead_at_once() {
    let mut env = TestEnv::new().await;
    env.spawn_worker(WORKER, "poison", &[]);
    let (id, source, prefix) = job_keys("transcode");
    env.publish_raw("transcode", b"{this is not json").await;
    let mut future =
        serde_json::from_slice::<serde_json::Value>(&test_job(id, &source, &prefix, json!({})))
            .unwrap();
    future["schema"] = json!(99);
    env.publish_raw("transcode", &serde_json::to_vec(&future).unwrap())
        .await;
    let mut escape = future.clone();
    escape["schema"] = json!(1);
    escape["source"] = json!("uploads/../../etc/passwd");
    env.publish_raw("transcode", &serde_json::to_vec(&escape).unwrap())
        .await;

    let mut wrong_type = escape.clone();
    wrong_type["source"] = json!(source);
    let props =
        shared::broker::persistent_json(Default::default()).with_content_type("text/plain".into());
    env.publish_with(
        "transcode",
        &serde_json::to_vec(&wrong_type).unwrap(),
        props,
    )
    .await;

    let dead = env.wait_dead(4, PATIENCE).await;
    assert_eq!(dead.len(), 4);
    let reasons: Vec<String> = dead.iter().map(|d| d.reason()).collect();
    assert!(dead.iter().all(|d| d.attempts() == Some(1)), "{reasons:?}");
    assert!(
        reasons.iter().all(|r| r.starts_with("poison message")),
        "{reasons:?}"
    );
    assert!(
        reasons.iter().any(|r| r.contains("not valid JSON")),
        "{reasons:?}"
    );
    assert!(
        reasons.iter().any(|r| r.contains("schema 99")),
        "{reasons:?}"
    );
    assert!(reasons.iter().any(|r| r.contains("`..`")), "{reasons:?}");
    assert!(
        reasons
            .iter()
            .any(|r| r.contains("content type `text/plain`")),
        "{reasons:?}"
    );
}

/// A worker SIGKILLed mid-job: the broker redelivers and another worker completes it.
#[tokio::test]
async fn sigkilled_worker_job_is_redelivered_and_completed() {
    let mut env = TestEnv::new().await;
    let victim = env.spawn_worker(WORKER, "victim", &[]);
    let (id, source, prefix) = job_keys("transcode");
    env.put_source(&source, b"x").await;
    let mut events = env.follow_events(id).await;
    env.publish_raw(
        "transcode",
        &test_job(id, &source, &prefix, json!({ "work_ms": 3000 })),
    )
    .await;
    let started = events
        .wait_for("transcode", JobState::Started, PATIENCE)
        .await;
    assert_eq!(started.worker, "victim");
    env.worker(victim).signal("KILL");
    env.worker(victim)
        .wait_exit(Duration::from_secs(5))
        .expect("killed");
    env.spawn_worker(WORKER, "rescuer", &[]);
    let manifest = env.wait_manifest(&prefix, PATIENCE).await;
    assert_eq!(manifest.completion.worker, "rescuer");
}

/// SIGTERM mid-job: the job is requeued (not lost), the process exits 0.
#[tokio::test]
async fn sigterm_mid_job_requeues_and_exits_zero() {
    let mut env = TestEnv::new().await;
    let w = env.spawn_worker(
        WORKER,
        "term",
        &[("VIDPIPE__WORKER__SHUTDOWN_GRACE_SECS", "0.5")],
    );
    let (id, source, prefix) = job_keys("transcode");
    env.put_source(&source, b"x").await;
    let mut events = env.follow_events(id).await;
    env.publish_raw(
        "transcode",
        &test_job(id, &source, &prefix, json!({ "work_ms": 20000 })),
    )
    .await;
    events
        .wait_for("transcode", JobState::Started, PATIENCE)
        .await;
    env.worker(w).signal("TERM");
    let status = env
        .worker(w)
        .wait_exit(Duration::from_secs(10))
        .expect("worker should exit within the grace period");
    assert!(
        status.success(),
        "exit status {status:?}; log:\n{}",
        env.worker(w).log_text()
    );
    let queue = env.topology.work_queue("transcode");
    eventually(PATIENCE, "the job to be back in its queue", async || {
        env.queue_depth(&queue).await == 1
    })
    .await;
    assert!(env.storage.manifest(&prefix).await.unwrap().is_none());
    let log = env.worker(w).log_text();
    assert!(
        log.contains("returning it to the queue"),
        "the cancelled job should be nacked with requeue, not left to the channel's close:\n{log}"
    );
    assert_no_error_lines(&log);
}

/// SIGTERM with a job that finishes within the grace period: its ack reaches the broker
/// (nothing is redelivered), and the shutdown is clean (no ERROR line in the log).
#[tokio::test]
async fn sigterm_lets_a_short_job_finish_and_acks_it() {
    let mut env = TestEnv::new().await;
    let w = env.spawn_worker(
        WORKER,
        "finisher",
        &[("VIDPIPE__WORKER__SHUTDOWN_GRACE_SECS", "20")],
    );
    let (id, source, prefix) = job_keys("transcode");
    env.put_source(&source, b"x").await;
    let mut events = env.follow_events(id).await;
    env.publish_raw(
        "transcode",
        &test_job(id, &source, &prefix, json!({ "work_ms": 1500 })),
    )
    .await;
    events
        .wait_for("transcode", JobState::Started, PATIENCE)
        .await;
    env.worker(w).signal("TERM");
    let status = env.worker(w).wait_exit(PATIENCE).expect("worker exits");
    let log = env.worker(w).log_text();
    assert!(status.success(), "exit status {status:?}; log:\n{log}");
    assert!(
        env.storage.manifest(&prefix).await.unwrap().is_some(),
        "the job should have finished before exit"
    );
    assert!(
        log.contains("waiting for in-flight jobs to finish") && log.contains("job completed"),
        "the job should have finished during the drain:\n{log}"
    );
    // Its last event went out before the connection closed (`--wait` sees it end).
    events
        .wait_for("transcode", JobState::Completed, PATIENCE)
        .await;
    // Had the ack been lost, the broker would put the message back when the worker's
    // connection closed: watch the queue for a while to be sure it stays empty.
    let queue = env.topology.work_queue("transcode");
    let what = format!("the finished job to stay acked; worker log:\n{log}");
    stays(Duration::from_secs(2), &what, async || {
        env.queue_depth(&queue).await == 0
    })
    .await;
    assert_no_error_lines(&log);
}

/// Jobs that finish while another runs are acked (held for a batch at most a moment),
/// and no ack, batched or not, covers the job still running: killed mid-run, the worker
/// leaves exactly that one job to come back. The long job sits between short ones in
/// delivery order, so the short ones before it can be acked as one batch (`multiple`)
/// and those after it wait behind a running delivery.
#[tokio::test]
async fn a_batched_ack_never_covers_a_job_still_running() {
    let mut env = TestEnv::new().await;
    let w = env.spawn_worker(
        WORKER,
        "batcher",
        &[
            ("VIDPIPE__WORKER__CONCURRENCY", "5"),
            ("VIDPIPE__WORKER__STARTED_EVENT_AFTER_SECS", "0"),
        ],
    );
    let mut events = env.follow_all_events().await;
    let mut short = Vec::new();
    let mut long = None;
    for i in 0..5 {
        let work_ms = if i == 2 { 60_000 } else { 50 };
        let (id, _) = submit(&env, json!({ "work_ms": work_ms })).await;
        match i {
            2 => long = Some(id),
            _ => short.push(id),
        }
    }
    let long = long.expect("the long job");
    events
        .wait_for_nth("transcode", JobState::Completed, short.len(), PATIENCE)
        .await;
    let completed: Vec<Uuid> = events
        .seen
        .iter()
        .filter(|e| e.state == JobState::Completed)
        .map(|e| e.job_id)
        .collect();
    assert!(
        !completed.contains(&long),
        "the long job cannot be done yet"
    );
    // Well past the straggler wait: every short job's ack has been sent by now.
    tokio::time::sleep(Duration::from_millis(500)).await;
    env.worker(w).signal("KILL");
    env.worker(w)
        .wait_exit(Duration::from_secs(5))
        .expect("killed");
    let queue = env.topology.work_queue("transcode");
    eventually(PATIENCE, "the running job to come back", async || {
        env.queue_depth(&queue).await >= 1
    })
    .await;
    let what = "exactly the running job to come back (a short one unacked, or the long one acked, changes the count)";
    stays(Duration::from_secs(1), what, async || {
        env.queue_depth(&queue).await == 1
    })
    .await;
    let back = env.take_all(&queue).await;
    let job: serde_json::Value = serde_json::from_slice(&back[0].body).expect("a job");
    assert_eq!(job["job_id"], long.to_string());
}

/// SIGTERM while several jobs run: they finish together during the drain, and every ack,
/// those held for a batch included, reaches the broker before the channel closes.
#[tokio::test]
async fn sigterm_with_several_jobs_running_acks_them_all() {
    let mut env = TestEnv::new().await;
    let w = env.spawn_worker(
        WORKER,
        "drain-acks",
        &[
            ("VIDPIPE__WORKER__CONCURRENCY", "4"),
            ("VIDPIPE__WORKER__SHUTDOWN_GRACE_SECS", "20"),
            ("VIDPIPE__WORKER__STARTED_EVENT_AFTER_SECS", "0"),
        ],
    );
    let mut events = env.follow_all_events().await;
    for _ in 0..4 {
        submit(&env, json!({ "work_ms": 1500 })).await;
    }
    events
        .wait_for_nth("transcode", JobState::Started, 4, PATIENCE)
        .await;
    env.worker(w).signal("TERM");
    let status = env.worker(w).wait_exit(PATIENCE).expect("worker exits");
    let log = env.worker(w).log_text();
    assert!(status.success(), "exit status {status:?}; log:\n{log}");
    events
        .wait_for_nth("transcode", JobState::Completed, 4, PATIENCE)
        .await;
    let queue = env.topology.work_queue("transcode");
    let what = format!("the finished jobs to stay acked; worker log:\n{log}");
    stays(Duration::from_secs(2), &what, async || {
        env.queue_depth(&queue).await == 0
    })
    .await;
    assert_no_error_lines(&log);
}

/// Each job's events arrive in the order they were sent, whichever way they went out: a
/// job alone sends its own (one at a time, below), jobs running together queue theirs for
/// the publisher's task (the burst), and a job that starts busy and ends alone changes
/// ways midway.
#[tokio::test]
async fn a_jobs_events_arrive_in_order_whether_it_runs_alone_or_among_others() {
    let mut env = TestEnv::new().await;
    env.spawn_worker(
        WORKER,
        "in-order",
        &[
            ("VIDPIPE__WORKER__CONCURRENCY", "4"),
            ("VIDPIPE__WORKER__STARTED_EVENT_AFTER_SECS", "0"),
        ],
    );
    let mut events = env.follow_all_events().await;
    let mut ids = Vec::new();
    for _ in 0..3 {
        let (id, prefix) = submit(&env, json!({})).await;
        env.wait_manifest(&prefix, PATIENCE).await;
        ids.push(id);
    }
    for i in 0..12 {
        ids.push(submit(&env, json!({ "work_ms": 40 * (i % 4) })).await.0);
    }
    events
        .wait_for_nth("transcode", JobState::Completed, ids.len(), PATIENCE)
        .await;
    for id in &ids {
        let states: Vec<JobState> = events
            .seen
            .iter()
            .filter(|e| e.job_id == *id)
            .map(|e| e.state)
            .collect();
        assert_eq!(states.first(), Some(&JobState::Started), "{id}: {states:?}");
        assert_eq!(
            states.last(),
            Some(&JobState::Completed),
            "{id}: {states:?}"
        );
        let completed = states.iter().filter(|s| **s == JobState::Completed).count();
        assert_eq!(completed, 1, "{id}: {states:?}");
    }
}

/// The publisher's side of the above, made deterministic: an event emitted while another
/// job runs waits in the publisher's queue, and the job's next event, emitted once it is
/// alone, waits behind it instead of going out directly ahead of it.
#[tokio::test]
async fn an_event_sent_alone_waits_behind_one_queued_while_busy() {
    let env = TestEnv::new().await;
    let id = Uuid::new_v4();
    let mut events = env.follow_events(id).await;
    let (in_flight, session) = (InFlight::default(), CancellationToken::new());
    let this = in_flight.track(id, "transcode", None, &session);
    let other = in_flight.track(Uuid::new_v4(), "transcode", None, &session);
    let channel = env.conn.create_channel().await.expect("a channel");
    let publisher = EventPublisher::new(channel, env.topology.events_exchange(), "order".into())
        .with_progress_to(in_flight.clone());
    // Busy: queued for the publisher's task, which has not run yet (this test's runtime
    // has one thread, and nothing has yielded to the task).
    publisher.emit(id, "transcode", None, JobState::Started, 1, None, None);
    drop(other);
    publisher.emit(id, "transcode", None, JobState::Completed, 1, None, None);
    drop(this);
    publisher.finish(Duration::from_secs(5)).await;
    events
        .wait_for("transcode", JobState::Completed, PATIENCE)
        .await;
    events.poll(Duration::from_millis(300)).await;
    let states: Vec<JobState> = events.seen.iter().map(|e| e.state).collect();
    assert_eq!(states, [JobState::Started, JobState::Completed]);
}

/// Events sent the direct way (a job alone) right before the publisher finishes all reach
/// the broker: `finish` waits for them to be written before the channel may close (a
/// close overtakes publishes still queued, and the broker then drops them). Sent in a
/// burst, on a connection of its own, the last ones are still queued when `finish` runs.
#[tokio::test]
async fn events_sent_alone_just_before_finish_all_arrive() {
    let env = TestEnv::new().await;
    let id = Uuid::new_v4();
    let mut events = env.follow_events(id).await;
    let conn = shared::broker::try_connect(&env.amqp_url, "vidpipe-tests-finish")
        .await
        .expect("a connection");
    let channel = conn.create_channel().await.expect("a channel");
    let publisher = EventPublisher::new(channel, env.topology.events_exchange(), "burst".into())
        .with_progress_to(InFlight::default());
    const SENT: usize = 300;
    for i in 0..SENT {
        let percent = Some(i as f64 / SENT as f64 * 100.0);
        publisher.emit(id, "transcode", None, JobState::Progress, 1, percent, None);
    }
    publisher.emit(id, "transcode", None, JobState::Completed, 1, None, None);
    publisher.finish(Duration::from_secs(5)).await;
    events
        .wait_for("transcode", JobState::Completed, PATIENCE)
        .await;
    let progress = events
        .seen
        .iter()
        .filter(|e| e.state == JobState::Progress)
        .count();
    assert_eq!(
        progress, SENT,
        "every progress event before the completed one"
    );
    assert!(
        conn.status().connected(),
        "the broker closed the connection"
    );
}

/// While a worker drains after SIGTERM it takes no new job: one published meanwhile stays
/// in the queue for another worker, even though the draining one has a free slot.
#[tokio::test]
async fn draining_worker_takes_no_new_jobs() {
    let mut env = TestEnv::new().await;
    let w = env.spawn_worker(
        WORKER,
        "drainer",
        &[
            ("VIDPIPE__WORKER__SHUTDOWN_GRACE_SECS", "20"),
            ("VIDPIPE__WORKER__CONCURRENCY", "2"),
        ],
    );
    let (first, source, prefix) = job_keys("transcode");
    env.put_source(&source, b"x").await;
    let mut events = env.follow_events(first).await;
    env.publish_raw(
        "transcode",
        &test_job(first, &source, &prefix, json!({ "work_ms": 3000 })),
    )
    .await;
    events
        .wait_for("transcode", JobState::Started, PATIENCE)
        .await;
    env.worker(w).signal("TERM");
    eventually(PATIENCE, "the worker to start draining", async || {
        env.worker(w)
            .log_text()
            .contains("waiting for in-flight jobs")
    })
    .await;
    let (late, late_prefix) = submit(&env, json!({})).await;
    let status = env.worker(w).wait_exit(PATIENCE).expect("worker exits");
    let log = env.worker(w).log_text();
    assert!(status.success(), "exit status {status:?}; log:\n{log}");
    assert!(env.storage.manifest(&prefix).await.unwrap().is_some());
    assert!(
        env.storage.manifest(&late_prefix).await.unwrap().is_none()
            && !log.contains(&late.to_string()),
        "the draining worker took the late job:\n{log}"
    );
    let queue = env.topology.work_queue("transcode");
    eventually(PATIENCE, "the late job to wait in its queue", async || {
        env.queue_depth(&queue).await == 1
    })
    .await;
}

/// A worker log from a clean run holds no ERROR line (lapin's included).
fn assert_no_error_lines(log: &str) {
    let errors: Vec<&str> = log.lines().filter(|l| l.contains("ERROR")).collect();
    assert!(
        errors.is_empty(),
        "ERROR lines in the log:\n{}",
        errors.join("\n")
    );
}

/// The broker closes the worker's connection mid-job: the worker reconnects and the job
/// is completed.
#[tokio::test]
async fn worker_recovers_after_broker_closes_its_connection() {
    let mut env = TestEnv::new().await;
    let name = format!("cut-{}", &Uuid::new_v4().simple().to_string()[..8]);
    env.spawn_worker(WORKER, &name, &[]);
    let (id, source, prefix) = job_keys("transcode");
    env.put_source(&source, b"x").await;
    let mut events = env.follow_events(id).await;
    env.publish_raw(
        "transcode",
        &test_job(id, &source, &prefix, json!({ "work_ms": 2000 })),
    )
    .await;
    events
        .wait_for("transcode", JobState::Started, PATIENCE)
        .await;
    close_connections_named(&name);
    let manifest = env.wait_manifest(&prefix, Duration::from_secs(60)).await;
    assert_eq!(manifest.completion.worker, name);
    assert!(env.logs().contains("reconnecting"), "{}", env.logs());
}

/// A job over its time limit is cancelled and retried once; over it again on the second
/// attempt, it is dead (with five attempts allowed), so a hostile file costs two limits.
#[tokio::test]
async fn job_over_time_limit_twice_is_dead_after_two_attempts() {
    let mut env = TestEnv::new().await;
    env.spawn_worker(
        WORKER,
        "slowpoke",
        &[
            ("VIDPIPE__WORKER__JOB_TIMEOUT_SECS", "0.5"),
            ("VIDPIPE__RETRY__MAX_ATTEMPTS", "5"),
        ],
    );
    submit(&env, json!({ "work_ms": 30000 })).await;
    let dead = env.wait_dead(1, PATIENCE).await;
    assert_eq!(dead[0].attempts(), Some(2));
    let reason = dead[0].reason();
    assert!(
        reason.contains("time limit") && reason.contains("again on attempt 2"),
        "{reason}"
    );
}

/// Two environments at once never see each other's queues or jobs.
#[tokio::test]
async fn parallel_test_environments_are_isolated() {
    let mut a = TestEnv::new().await;
    let b = TestEnv::new().await;
    assert_ne!(
        a.topology.work_queue("transcode"),
        b.topology.work_queue("transcode")
    );
    let (_, b_prefix) = submit(&b, json!({})).await;
    a.spawn_worker(WORKER, "only-a", &[]);
    let (_, a_prefix) = submit(&a, json!({})).await;
    a.wait_manifest(&a_prefix, PATIENCE).await;
    assert_eq!(
        b.queue_depth(&b.topology.work_queue("transcode")).await,
        1,
        "a's worker must not touch b's job"
    );
    assert!(b.storage.manifest(&b_prefix).await.unwrap().is_none());
}

/// Closes every broker connection whose client-provided name is `name` (`rabbitmqctl` of
/// the broker under test, [`broker_ctl`]).
fn close_connections_named(name: &str) {
    let out = broker_ctl(&["-q", "list_connections", "pid", "client_properties"]);
    let text = String::from_utf8_lossy(&out.stdout);
    let pids: Vec<&str> = text
        .lines()
        .filter(|l| l.contains(&format!("\"{name}\"")))
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    assert!(!pids.is_empty(), "no connection named {name} in:\n{text}");
    for pid in pids {
        let out = broker_ctl(&["-q", "close_connection", pid, "closed by vidpipe test"]);
        assert!(out.status.success(), "{out:?}");
    }
}

/// A source that is a symlink out of the storage root is refused as permanent.
#[tokio::test]
async fn symlink_out_of_storage_root_is_dead() {
    let mut env = TestEnv::new().await;
    env.spawn_worker(WORKER, "symlink", &[]);
    let (id, source, prefix) = job_keys("transcode");
    let link = env.storage_root().join(&source);
    std::fs::create_dir_all(link.parent().unwrap()).unwrap();
    std::os::unix::fs::symlink("/etc/hostname", &link).unwrap();
    env.publish_raw("transcode", &test_job(id, &source, &prefix, json!({})))
        .await;
    let dead = env.wait_dead(1, PATIENCE).await;
    assert_eq!(dead[0].attempts(), Some(1));
    assert!(
        dead[0].reason().contains("outside the storage root"),
        "{}",
        dead[0].reason()
    );
}

/// A source missing from storage is a permanent failure naming the key.
#[tokio::test]
async fn missing_source_is_dead_with_its_key() {
    let mut env = TestEnv::new().await;
    env.spawn_worker(WORKER, "missing", &[]);
    let (id, source, prefix) = job_keys("transcode");
    env.publish_raw("transcode", &test_job(id, &source, &prefix, json!({})))
        .await;
    let dead = env.wait_dead(1, PATIENCE).await;
    assert!(
        dead[0]
            .reason()
            .contains(&format!("source `{source}` does not exist")),
        "{}",
        dead[0].reason()
    );
}

/// Crash-loop guard: a job whose worker dies on every delivery is dead-lettered by the
/// broker once the quorum queue's delivery limit is reached, never redelivered forever.
#[tokio::test]
async fn job_that_keeps_killing_workers_is_dead_lettered_by_the_delivery_limit() {
    let mut env = TestEnv::with_delivery_limit(1).await;
    let (id, source, prefix) = job_keys("transcode");
    env.put_source(&source, b"x").await;
    let mut events = env.follow_events(id).await;
    env.publish_raw(
        "transcode",
        &test_job(id, &source, &prefix, json!({ "work_ms": 30000 })),
    )
    .await;
    for round in 0..2 {
        let w = env.spawn_worker(WORKER, &format!("crash-{round}"), &[]);
        events
            .wait_for_nth("transcode", JobState::Started, round + 1, PATIENCE)
            .await;
        env.worker(w).signal("KILL");
        env.worker(w)
            .wait_exit(Duration::from_secs(5))
            .expect("killed");
    }
    let dead = env.wait_dead(1, PATIENCE).await;
    assert_eq!(dead.len(), 1);
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(&dead[0].body).unwrap()["job_id"],
        id.to_string()
    );
    assert!(
        dead[0].headers.inner().contains_key("x-death"),
        "the broker's own dead-letter record"
    );
}

/// The broker cancels the worker's consumer (its queue is deleted): the worker reopens
/// its channel, re-declares the topology and consumes again.
#[tokio::test]
async fn worker_resumes_after_its_queue_is_deleted() {
    let mut env = TestEnv::new().await;
    let first = job_keys("transcode");
    env.put_source(&first.1, b"x").await;
    env.spawn_worker(WORKER, "resume", &[]);
    env.publish_raw(
        "transcode",
        &test_job(first.0, &first.1, &first.2, json!({})),
    )
    .await;
    env.wait_manifest(&first.2, PATIENCE).await;

    let queue = env.topology.work_queue("transcode");
    let channel = env.conn.create_channel().await.unwrap();
    channel
        .queue_delete(queue.clone().into(), Default::default())
        .await
        .unwrap();
    // A consumer on the new queue means the worker has declared it and bound it again
    // (it consumes only after declaring the whole topology); before that, a publish could
    // find the queue but not yet its binding, and be unroutable.
    eventually(
        PATIENCE,
        "the worker to re-declare its queue and consume",
        async || {
            let ch = env.conn.create_channel().await.unwrap();
            let passive = lapin::options::QueueDeclareOptions {
                passive: true,
                ..Default::default()
            };
            ch.queue_declare(queue.clone().into(), passive, Default::default())
                .await
                .is_ok_and(|q| q.consumer_count() > 0)
        },
    )
    .await;
    let (_, prefix) = submit(&env, json!({})).await;
    env.wait_manifest(&prefix, PATIENCE).await;
}

/// Scratch left by a crashed worker is removed at the next start; a live-looking
/// (recent) scratch directory is left alone.
#[tokio::test]
async fn stale_scratch_from_a_crash_is_removed_at_start() {
    let mut env = TestEnv::new().await;
    let stale = env.scratch_dir().join("job-crashed");
    let fresh = env.scratch_dir().join("job-running");
    std::fs::create_dir_all(stale.join("out")).unwrap();
    std::fs::create_dir_all(&fresh).unwrap();
    let status = std::process::Command::new("touch")
        .args(["-d", "3 hours ago"])
        .arg(&stale)
        .status()
        .unwrap();
    assert!(status.success());
    env.spawn_worker(
        WORKER,
        "sweeper",
        &[("VIDPIPE__WORKER__JOB_TIMEOUT_SECS", "60")],
    );
    eventually(PATIENCE, "the stale scratch to go", async || {
        !stale.exists()
    })
    .await;
    assert!(
        fresh.exists(),
        "a recent scratch directory may belong to a live job"
    );
}

/// An oversize message (300 KiB, over the 64 KiB limit) is parked at once with its body
/// cut to the limit and a header giving its original size.
#[tokio::test]
async fn oversize_message_is_parked_cut_to_the_message_limit() {
    let mut env = TestEnv::new().await;
    env.spawn_worker(WORKER, "oversize", &[]);
    let (id, source, prefix) = job_keys("transcode");
    let mut body = test_job(id, &source, &prefix, json!({}));
    body.resize(300 * 1024, b' ');
    env.publish_raw("transcode", &body).await;
    let dead = env.wait_dead(1, PATIENCE).await;
    assert_eq!(dead[0].body.len(), shared::messages::MAX_MESSAGE_BYTES);
    assert_eq!(
        dead[0].body[..],
        body[..shared::messages::MAX_MESSAGE_BYTES]
    );
    assert_eq!(
        shared::runtime::header_u32(
            Some(&dead[0].headers),
            shared::runtime::TRUNCATED_FROM_HEADER
        ),
        Some(300 * 1024)
    );
    assert!(
        dead[0].reason().contains("307200 bytes"),
        "{}",
        dead[0].reason()
    );
}

/// A job aimed at another job's outputs, whose manifest is already there (a hostile
/// message), is dead at once naming both jobs (the message check refuses a prefix that is
/// not the job's own; the runtime's manifest-owner check stands behind it), never
/// "skipped" as done; the other job's outputs stay as they were.
#[tokio::test]
async fn manifest_of_another_job_is_refused_not_skipped() {
    let mut env = TestEnv::new().await;
    env.spawn_worker(WORKER, "owner", &[]);
    let (victim, victim_prefix) = submit(&env, json!({})).await;
    let before = env.wait_manifest(&victim_prefix, PATIENCE).await;

    let (intruder, source, _) = job_keys("transcode");
    env.put_source(&source, b"x").await;
    let mut events = env.follow_events(intruder).await;
    env.publish_raw(
        "transcode",
        &test_job(intruder, &source, &victim_prefix, json!({})),
    )
    .await;
    let dead = env.wait_dead(1, PATIENCE).await;
    let reason = dead[0].reason();
    assert!(
        reason.contains(&victim.to_string()) && reason.contains(&intruder.to_string()),
        "{reason}"
    );
    assert_eq!(dead[0].attempts(), Some(1));
    events.wait_for("transcode", JobState::Dead, PATIENCE).await;
    assert!(
        !events.seen.iter().any(|e| e.state == JobState::Completed),
        "{:?}",
        events.seen
    );
    assert_eq!(env.wait_manifest(&victim_prefix, PATIENCE).await, before);
}

/// A redelivered job whose task is already committed is skipped: acked without a second
/// `completed` and without running the handler again (this delivery asks the test worker to fail
/// permanently, so a rerun would be dead), and the committed manifest is left as it was.
#[tokio::test]
async fn redelivered_job_with_a_committed_manifest_is_skipped_not_rerun() {
    let mut env = TestEnv::new().await;
    env.spawn_worker(WORKER, "skipper", &[]);
    let (id, source, prefix) = job_keys("transcode");
    env.put_source(&source, b"x").await;
    env.publish_raw("transcode", &test_job(id, &source, &prefix, json!({})))
        .await;
    let before = env.wait_manifest(&prefix, PATIENCE).await;
    let listed = env.storage.list(&prefix).await.unwrap();

    let mut events = env.follow_events(id).await;
    let again = test_job(id, &source, &prefix, json!({ "permanent": true }));
    env.publish_raw("transcode", &again).await;
    eventually(PATIENCE, "the redelivery skipped", async || {
        env.logs()
            .contains("already committed by an earlier delivery")
    })
    .await;
    // Acked without a second `completed`: the task completed once, the first time.
    events.poll(Duration::from_secs(1)).await;
    assert!(
        !events.seen.iter().any(|e| e.state == JobState::Completed),
        "{:?}",
        events.seen
    );
    assert_eq!(env.queue_depth(&env.topology.dead()).await, 0);
    assert_eq!(env.wait_manifest(&prefix, PATIENCE).await, before);
    assert_eq!(env.storage.list(&prefix).await.unwrap(), listed);
}

/// A `manifest.json` under the job's prefix that is not a manifest (it names no job) is
/// a permanent failure: dead after one attempt, never skipped as done nor retried.
#[tokio::test]
async fn unreadable_manifest_is_dead_at_once() {
    let mut env = TestEnv::new().await;
    env.spawn_worker(WORKER, "reader", &[]);
    let (id, source, prefix) = job_keys("transcode");
    env.put_source(&source, b"x").await;
    let manifest = Storage::manifest_key(&prefix);
    env.storage
        .put_bytes(&manifest, br#"{"task": "transcode"}"#.to_vec())
        .await
        .unwrap();
    env.publish_raw("transcode", &test_job(id, &source, &prefix, json!({})))
        .await;
    let dead = env.wait_dead(1, PATIENCE).await;
    let reason = dead[0].reason();
    assert!(
        reason.contains("not a readable manifest") && reason.contains(manifest.as_str()),
        "{reason}"
    );
    assert_eq!(dead[0].attempts(), Some(1));
}

/// A symlink planted in the storage root (`outputs/<job>/transcode` -> a directory
/// outside it) makes the job dead with the reason; nothing is written outside the root.
#[tokio::test]
async fn symlink_in_the_output_path_out_of_the_root_is_dead_and_nothing_escapes() {
    let mut env = TestEnv::new().await;
    env.spawn_worker(WORKER, "escape", &[]);
    let (id, source, prefix) = job_keys("transcode");
    env.put_source(&source, b"x").await;
    let elsewhere = env.data.path().join("elsewhere");
    std::fs::create_dir_all(&elsewhere).unwrap();
    let link = env
        .storage_root()
        .join(prefix.as_str().trim_end_matches('/'));
    std::fs::create_dir_all(link.parent().unwrap()).unwrap();
    std::os::unix::fs::symlink(&elsewhere, &link).unwrap();

    env.publish_raw("transcode", &test_job(id, &source, &prefix, json!({})))
        .await;
    let dead = env.wait_dead(1, PATIENCE).await;
    let reason = dead[0].reason();
    assert!(
        reason.contains("outside the storage root") && reason.contains("symlink"),
        "{reason}"
    );
    assert_eq!(dead[0].attempts(), Some(1), "permanent, not retried");
    assert_eq!(
        std::fs::read_dir(&elsewhere).unwrap().count(),
        0,
        "something was written outside the storage root"
    );
}
