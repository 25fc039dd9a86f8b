//! Integration tests: the `producer` binary as a process against the real broker, with
//! real worker processes (the real `transcoder` / `thumbnailer`, or the test worker on the
//! transcode queue where a test needs a task to complete regardless of media support).

use std::process::Output;
use std::time::Duration;

use lapin::types::{AMQPValue, FieldArray, FieldTable, LongString};
use shared::broker;
use shared::storage_key::StorageKey;

use crate::support::{TestEnv, bin, eventually, fixtures, test_job};

/// Runs `producer ARGS…` in this test's world and returns what it did.
async fn producer(env: &TestEnv, args: &[&str]) -> Output {
    env.producer(args).await
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The one JSON object a `--json` command printed.
fn json(out: &Output) -> serde_json::Value {
    let text = stdout(out);
    serde_json::from_str(text.trim())
        .unwrap_or_else(|e| panic!("not one JSON object ({e}): {text}\nstderr: {}", stderr(out)))
}

/// Every JSON line a `--json` command printed.
fn json_lines(out: &Output) -> Vec<serde_json::Value> {
    stdout(out)
        .lines()
        .map(|l| serde_json::from_str(l).expect("JSON line"))
        .collect()
}

/// Ready messages in both work queues.
async fn queued_jobs(env: &TestEnv) -> u32 {
    env.queue_depth(&env.topology.work_queue("transcode")).await
        + env.queue_depth(&env.topology.work_queue("thumbnail")).await
}

/// A file that is not a video: every worker must refuse it permanently.
fn not_a_video(env: &TestEnv) -> std::path::PathBuf {
    let file = env.data.path().join("notes.mp4");
    std::fs::write(&file, b"this is a text file, not a video").unwrap();
    file
}

/// Upload with `--wait` through both real workers: both tasks complete, their outputs are
/// in storage, exit code 0.
#[tokio::test]
async fn upload_wait_completes_both_tasks_and_exits_0() {
    let mut env = TestEnv::new().await;
    let clip = fixtures::sample_mp4(env.data.path(), "clip.mp4", 2, 320, 240);
    env.spawn_worker("transcoder", "transcoder", &[]);
    env.spawn_worker("thumbnailer", "thumbnailer", &[]);
    let out = producer(
        &env,
        &[
            "upload",
            clip.to_str().unwrap(),
            "--wait",
            "--timeout",
            "240",
            "--json",
        ],
    )
    .await;
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}\n{}",
        stderr(&out),
        env.logs()
    );
    let report = json(&out);
    let job_id = report["job_id"].as_str().unwrap().to_owned();
    for task in ["transcode", "thumbnail"] {
        assert_eq!(report["tasks"][task]["state"], "completed", "{report}");
        let prefix = StorageKey::output_prefix(job_id.parse().unwrap(), task).unwrap();
        let manifest = env
            .storage
            .manifest(&prefix)
            .await
            .unwrap()
            .expect("manifest");
        assert!(!manifest.outputs.is_empty(), "{task}: {manifest:?}");
        for o in &manifest.outputs {
            let key = o.key.clone();
            assert!(
                env.storage.exists(&key).await.unwrap(),
                "{key} listed but missing"
            );
        }
    }
    // `status` agrees, and lists the outputs.
    let status = producer(&env, &["status", &job_id, "--json"]).await;
    assert_eq!(status.status.code(), Some(0), "{}", stderr(&status));
    let status = json(&status);
    assert_eq!(status["tasks"]["transcode"]["state"], "completed");
    // The default ladder leaves out the rungs above 240p without calling them dropped:
    // nobody asked for them.
    assert!(
        status["tasks"]["transcode"]["dropped_renditions"].is_null(),
        "{status}"
    );
    assert!(
        !status["tasks"]["thumbnail"]["outputs"]
            .as_array()
            .unwrap()
            .is_empty()
    );
}

/// A task that goes dead (the input is not a video) makes `upload --wait` exit 1 and print
/// the reason, the same reason the dead letter carries.
#[tokio::test]
async fn upload_wait_exits_1_and_prints_the_reason_when_a_task_dies() {
    let mut env = TestEnv::new().await;
    let file = not_a_video(&env);
    env.spawn_worker("transcoder", "transcoder", &[]);
    env.spawn_worker("thumbnailer", "thumbnailer", &[]);
    let out = producer(
        &env,
        &[
            "upload",
            file.to_str().unwrap(),
            "--wait",
            "--timeout",
            "120",
        ],
    )
    .await;
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}\n{}", env.logs());
    let job_id = stdout(&out).trim().to_owned();
    let status = json(&producer(&env, &["status", &job_id, "--json"]).await);
    for task in ["transcode", "thumbnail"] {
        let reason = status["tasks"][task]["reason"]
            .as_str()
            .expect("a dead task has a reason");
        assert!(!reason.is_empty());
        assert!(
            err.contains(&format!("{task}: dead")),
            "{task} not reported dead: {err}"
        );
        assert!(err.contains(reason), "reason `{reason}` not printed: {err}");
    }
}

/// `--wait --json` follows each task to its own end: the transcode (test worker) completes,
/// the thumbnail (a text file for the real thumbnailer) dies; exit code 1.
#[tokio::test]
async fn upload_wait_follows_each_task_to_its_own_end() {
    let mut env = TestEnv::new().await;
    let file = not_a_video(&env);
    env.spawn_worker("vidpipe-testworker", "testworker", &[]);
    env.spawn_worker("thumbnailer", "thumbnailer", &[]);
    let out = producer(
        &env,
        &[
            "upload",
            file.to_str().unwrap(),
            "--wait",
            "--timeout",
            "120",
            "--json",
        ],
    )
    .await;
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}\n{}",
        stderr(&out),
        env.logs()
    );
    let report = json(&out);
    assert_eq!(
        report["tasks"]["transcode"]["state"], "completed",
        "{report}"
    );
    assert_eq!(report["tasks"]["thumbnail"]["state"], "dead", "{report}");
    assert!(
        !report["tasks"]["thumbnail"]["reason"]
            .as_str()
            .unwrap()
            .is_empty()
    );
}

/// An unreachable broker is exit code 3 with a message naming the setting, and nothing is
/// stored.
#[tokio::test]
async fn unreachable_broker_is_exit_code_3() {
    let env = TestEnv::new().await;
    let file = not_a_video(&env);
    let out = tokio::process::Command::new(bin("producer"))
        .args(["upload", file.to_str().unwrap()])
        .envs(env.env_vars())
        .env("VIDPIPE__AMQP__URL", "amqp://guest:guest@127.0.0.1:1/%2f")
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    assert!(stderr(&out).contains("amqp.url"), "{}", stderr(&out));
    let uploads = StorageKey::new("uploads/").unwrap();
    assert!(
        env.storage.list(&uploads).await.unwrap().is_empty(),
        "nothing stored"
    );
}

/// `status` says pending before any worker ran, then completed (with outputs) for a task
/// a worker finished and dead (with the reason) for one that was refused; an unknown job
/// is exit code 1 and a malformed id exit code 2.
#[tokio::test]
async fn status_reports_pending_completed_and_dead_tasks() {
    let mut env = TestEnv::new().await;
    let file = not_a_video(&env);
    let out = producer(&env, &["upload", file.to_str().unwrap()]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    let job_id = stdout(&out).trim().to_owned();

    let pending = producer(&env, &["status", &job_id, "--json"]).await;
    assert_eq!(pending.status.code(), Some(0), "{}", stderr(&pending));
    let pending = json(&pending);
    assert_eq!(pending["tasks"]["transcode"]["state"], "pending");
    assert_eq!(pending["tasks"]["thumbnail"]["state"], "pending");

    // The test worker completes any transcode job (it only copies the source); the real
    // thumbnailer refuses a text file.
    env.spawn_worker("vidpipe-testworker", "testworker", &[]);
    env.spawn_worker("thumbnailer", "thumbnailer", &[]);
    let prefix = StorageKey::output_prefix(job_id.parse().unwrap(), "transcode").unwrap();
    env.wait_manifest(&prefix, Duration::from_secs(60)).await;
    let dead_queue = env.topology.dead();
    eventually(
        Duration::from_secs(60),
        "the thumbnail job to be parked",
        async || env.queue_depth(&dead_queue).await == 1,
    )
    .await;

    let out = producer(&env, &["status", &job_id, "--json"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let status = json(&out);
    assert_eq!(
        status["tasks"]["transcode"]["state"], "completed",
        "{status}"
    );
    assert_eq!(
        status["tasks"]["transcode"]["outputs"][0]["name"],
        "out.txt"
    );
    assert_eq!(status["tasks"]["thumbnail"]["state"], "dead", "{status}");
    assert!(
        !status["tasks"]["thumbnail"]["reason"]
            .as_str()
            .unwrap()
            .is_empty()
    );
    // Looking did not take the dead letter out.
    depth_settles(&env, &dead_queue, 1, "looking takes nothing out").await;

    let text = producer(&env, &["status", &job_id]).await;
    assert!(
        stdout(&text).contains("completed") && stdout(&text).contains("dead after"),
        "{}",
        stdout(&text)
    );

    let unknown = producer(&env, &["status", "00000000-0000-0000-0000-000000000001"]).await;
    assert_eq!(unknown.status.code(), Some(1), "{}", stderr(&unknown));
    assert!(stderr(&unknown).contains("no job"), "{}", stderr(&unknown));
    let malformed = producer(&env, &["status", "not-a-uuid"]).await;
    assert_eq!(malformed.status.code(), Some(2));
}

/// A job parked because its source was missing is listed with its reason, replayed by
/// `dead replay` once the source exists, and completes with its attempt count reset.
#[tokio::test]
async fn dead_replay_brings_a_parked_job_back_and_it_completes() {
    let mut env = TestEnv::new().await;
    let (id, source, prefix) = crate::support::job_keys("transcode");
    env.publish_raw(
        "transcode",
        &test_job(id, &source, &prefix, serde_json::json!({})),
    )
    .await;
    env.spawn_worker("vidpipe-testworker", "testworker", &[]);
    let dead_queue = env.topology.dead();
    eventually(
        Duration::from_secs(30),
        "the job to be parked",
        async || env.queue_depth(&dead_queue).await == 1,
    )
    .await;

    let list = producer(&env, &["dead", "list", "--json"]).await;
    assert_eq!(list.status.code(), Some(0), "{}", stderr(&list));
    let parked = json_lines(&list);
    assert_eq!(parked.len(), 1, "{parked:?}");
    assert_eq!(parked[0]["job_id"], id.to_string());
    assert_eq!(parked[0]["task"], "transcode");
    assert_eq!(parked[0]["parked_by"], "worker");
    assert!(!parked[0]["reason"].as_str().unwrap().is_empty());
    depth_settles(&env, &dead_queue, 1, "listing takes nothing out").await;
    let show = producer(&env, &["dead", "show", &id.to_string()]).await;
    assert!(
        stdout(&show).contains(parked[0]["reason"].as_str().unwrap()),
        "{}",
        stdout(&show)
    );

    // Fix the cause, then replay.
    env.put_source(&source, b"the source, at last").await;
    let replay = producer(&env, &["dead", "replay", &id.to_string()]).await;
    assert_eq!(replay.status.code(), Some(0), "{}", stderr(&replay));
    let manifest = env.wait_manifest(&prefix, Duration::from_secs(30)).await;
    assert_eq!(
        manifest.outputs[0].facts["attempt"], 1,
        "attempt count reset: {manifest:?}"
    );
    assert_eq!(env.queue_depth(&dead_queue).await, 0);

    let again = producer(&env, &["dead", "replay", &id.to_string()]).await;
    assert_eq!(again.status.code(), Some(1), "nothing left to replay");
}

/// An oversize job parked with its body cut to the message limit shows as truncated in
/// `dead list` (text and JSON), and `dead replay` leaves it parked instead of sending
/// what is left of it.
#[tokio::test]
async fn dead_list_shows_a_truncated_body_and_replay_leaves_it_parked() {
    let mut env = TestEnv::new().await;
    let (id, source, prefix) = crate::support::job_keys("transcode");
    let mut body = test_job(id, &source, &prefix, serde_json::json!({}));
    body.resize(300 * 1024, b' ');
    env.publish_raw("transcode", &body).await;
    env.spawn_worker("vidpipe-testworker", "testworker", &[]);
    let dead_queue = env.topology.dead();
    eventually(
        Duration::from_secs(30),
        "the job to be parked",
        async || env.queue_depth(&dead_queue).await == 1,
    )
    .await;

    let list = producer(&env, &["dead", "list"]).await;
    assert_eq!(list.status.code(), Some(0), "{}", stderr(&list));
    assert!(
        stdout(&list).contains("[body truncated: 65536 of 307200 bytes kept]"),
        "{}",
        stdout(&list)
    );
    let parked = json_lines(&producer(&env, &["dead", "list", "--json"]).await);
    assert_eq!(parked[0]["truncated_from"], 307200, "{parked:?}");
    assert_eq!(parked[0]["bytes"], 65536, "{parked:?}");

    let replay = producer(&env, &["dead", "replay", &id.to_string()]).await;
    assert_ne!(replay.status.code(), Some(0));
    assert!(
        stderr(&replay).contains("cannot be replayed"),
        "{}",
        stderr(&replay)
    );
    // The look returned it with a nack: a quorum queue counts it ready again a moment later.
    eventually(
        Duration::from_secs(10),
        "it to be still parked",
        async || env.queue_depth(&dead_queue).await == 1,
    )
    .await;
}

/// `dead list` explains a broker dead letter from `x-death`; `dead purge` refuses without
/// `--yes` (exit code 2, nothing deleted) and empties the parking lot with it.
#[tokio::test]
async fn dead_purge_refuses_without_yes_and_list_reads_broker_dead_letters() {
    let env = TestEnv::new().await;
    let (id, source, prefix) = crate::support::job_keys("thumbnail");
    let mut death = FieldTable::default();
    death.insert("reason".into(), long("delivery_limit"));
    death.insert("queue".into(), long(&env.topology.work_queue("thumbnail")));
    death.insert("count".into(), AMQPValue::LongLongInt(1));
    let mut keys = FieldArray::default();
    keys.push(long("thumbnail"));
    death.insert("routing-keys".into(), AMQPValue::FieldArray(keys));
    let mut deaths = FieldArray::default();
    deaths.push(AMQPValue::FieldTable(death));
    let mut headers = FieldTable::default();
    headers.insert("x-death".into(), AMQPValue::FieldArray(deaths));
    let body = test_job(id, &source, &prefix, serde_json::json!({}));
    broker::publish_confirmed(
        &env.channel,
        &env.topology.dead(),
        "thumbnail",
        &body,
        broker::persistent_json(headers),
    )
    .await
    .unwrap();

    let list = json_lines(&producer(&env, &["dead", "list", "--json"]).await);
    assert_eq!(list.len(), 1);
    assert_eq!(list[0]["parked_by"], "broker");
    assert_eq!(list[0]["task"], "thumbnail");
    assert!(
        list[0]["reason"]
            .as_str()
            .unwrap()
            .contains("delivery_limit"),
        "{list:?}"
    );

    let refused = producer(&env, &["dead", "purge"]).await;
    assert_eq!(refused.status.code(), Some(2));
    assert!(stderr(&refused).contains("--yes"), "{}", stderr(&refused));
    depth_settles(&env, &env.topology.dead(), 1, "nothing deleted").await;

    let purged = producer(&env, &["dead", "purge", "--yes"]).await;
    assert_eq!(purged.status.code(), Some(0), "{}", stderr(&purged));
    assert!(stdout(&purged).contains("purged 1"), "{}", stdout(&purged));
    assert_eq!(env.queue_depth(&env.topology.dead()).await, 0);
}

/// Parks a message directly in the dead-letter queue, as a worker would have: reason,
/// attempts, worker, time and task headers.
async fn park(env: &TestEnv, task: &str, body: &[u8], reason: &str, failed_at: &str) {
    use shared::runtime::{
        ATTEMPTS_HEADER, FAILED_AT_HEADER, REASON_HEADER, TASK_HEADER, WORKER_HEADER,
    };
    let mut headers = FieldTable::default();
    headers.insert(REASON_HEADER.into(), long(reason));
    headers.insert(ATTEMPTS_HEADER.into(), AMQPValue::LongInt(1));
    headers.insert(WORKER_HEADER.into(), long("worker-x"));
    headers.insert(FAILED_AT_HEADER.into(), long(failed_at));
    headers.insert(TASK_HEADER.into(), long(task));
    broker::publish_confirmed(
        &env.channel,
        &env.topology.dead(),
        task,
        body,
        broker::persistent_json(headers),
    )
    .await
    .unwrap();
}

/// `dead list` is a table a tired operator can read: columns aligned under their
/// headers, oldest first, times to the second, long reasons cut with `…` (whole with
/// `--wide`), the uploaded file named; every message has its own id, stable from one look
/// to the next, by which one message (even a poison one naming no job) is shown readably,
/// purged or replayed on its own.
#[tokio::test]
async fn dead_list_is_an_aligned_table_and_one_message_is_handled_by_its_id() {
    let mut env = TestEnv::new().await;
    // A real upload parked by a real worker (it looks in another storage root).
    let file = env.data.path().join("holiday clip.mp4");
    std::fs::write(&file, b"some bytes").unwrap();
    let elsewhere = env.data.path().join("elsewhere");
    env.spawn_worker(
        "vidpipe-testworker",
        "testworker",
        &[("VIDPIPE__STORAGE__ROOT", elsewhere.to_str().unwrap())],
    );
    let out = producer(&env, &["upload", file.to_str().unwrap()]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    let job_id = stdout(&out).trim().to_owned();
    let dead_queue = env.topology.dead();
    eventually(
        Duration::from_secs(30),
        "the transcode job to be parked",
        async || env.queue_depth(&dead_queue).await == 1,
    )
    .await;
    // Two older ones: poison, and a thumbnail job with a long reason; their times have
    // fractions of different widths.
    park(
        &env,
        "thumbnail",
        b"this is not JSON",
        "poison: message is not valid JSON for a thumbnail job",
        "2026-01-01T00:00:00.5Z",
    )
    .await;
    let (id, source, prefix) = crate::support::job_keys("thumbnail");
    let long_reason = format!("source missing: {} THE-END", "x".repeat(120));
    park(
        &env,
        "thumbnail",
        &test_job(
            id,
            &source,
            &prefix,
            serde_json::json!({"task": "thumbnail", "count": 3}),
        ),
        &long_reason,
        "2026-01-01T00:00:01.123456789Z",
    )
    .await;

    let list = producer(&env, &["dead", "list"]).await;
    assert_eq!(list.status.code(), Some(0), "{}", stderr(&list));
    let text = stdout(&list);
    let lines: Vec<&str> = text.lines().collect();
    let header = lines[0];
    let rows = &lines[1..4];
    for column in ["FAILED AT", "JOB", "TASK", "WORKER", "FILE", "REASON"] {
        let at = header
            .find(column)
            .unwrap_or_else(|| panic!("{column}: {text}"));
        for row in rows {
            let chars: Vec<char> = row.chars().collect();
            assert!(
                chars[at - 1] == ' ' && chars[at] != ' ',
                "{column} not aligned:\n{text}"
            );
        }
    }
    assert!(
        rows[0].contains("2026-01-01 00:00:00  (not a job)"),
        "{text}"
    );
    assert!(
        rows[1].contains(&format!("2026-01-01 00:00:01  {id}")),
        "{text}"
    );
    assert!(
        rows[2].contains(&job_id) && rows[2].contains("holiday clip.mp4"),
        "{text}"
    );
    assert!(!text.contains(".5") && !text.contains(".123"), "{text}");
    assert!(
        rows[1].ends_with('…') && !text.contains("THE-END"),
        "{text}"
    );
    assert!(text.contains("--wide"), "{text}");
    let wide = stdout(&producer(&env, &["dead", "list", "--wide"]).await);
    assert!(wide.contains(&long_reason), "{wide}");

    // Ids: the first column, the same in every look.
    let parked = json_lines(&producer(&env, &["dead", "list", "--json"]).await);
    let ids: Vec<String> = parked
        .iter()
        .map(|p| p["id"].as_str().unwrap().to_owned())
        .collect();
    for (row, id) in rows.iter().zip(&ids) {
        assert!(row.starts_with(id.as_str()), "{row} / {id}");
    }
    let again = json_lines(&producer(&env, &["dead", "list", "--json"]).await);
    assert_eq!(again, parked, "ids and order are stable");
    assert_eq!(parked[2]["file"], "holiday clip.mp4");

    // A readable `dead show`: one field per line, the reason whole, the settings.
    let show = stdout(&producer(&env, &["dead", "show", &ids[1]]).await);
    assert!(show.starts_with(&format!("message {}", ids[1])), "{show}");
    assert!(show.contains(&long_reason), "{show}");
    assert!(show.contains("3 thumbnails"), "{show}");
    let show = stdout(&producer(&env, &["dead", "show", &ids[2]]).await);
    assert!(
        show.contains("holiday clip.mp4") && show.contains("default ladder"),
        "{show}"
    );
    let show = stdout(&producer(&env, &["dead", "show", &ids[0]]).await);
    assert!(
        show.contains("not a job") && show.contains("this is not JSON"),
        "{show}"
    );
    let unknown = producer(&env, &["dead", "show", "000000000000"]).await;
    assert_eq!(unknown.status.code(), Some(1), "{}", stderr(&unknown));
    let malformed = producer(&env, &["dead", "show", "nonsense"]).await;
    assert_eq!(malformed.status.code(), Some(2), "{}", stderr(&malformed));

    // The poison message alone is purged (with --yes), the long one alone replayed.
    let refused = producer(&env, &["dead", "purge", &ids[0]]).await;
    assert_eq!(refused.status.code(), Some(2), "{}", stderr(&refused));
    depth_settles(&env, &dead_queue, 3, "nothing purged without --yes").await;
    let purged = producer(&env, &["dead", "purge", &ids[0], "--yes"]).await;
    assert_eq!(purged.status.code(), Some(0), "{}", stderr(&purged));
    let replayed = producer(&env, &["dead", "replay", &ids[1]]).await;
    assert_eq!(replayed.status.code(), Some(0), "{}", stderr(&replayed));
    let left = json_lines(&producer(&env, &["dead", "list", "--json"]).await);
    assert_eq!(left.len(), 1, "{left:?}");
    assert_eq!(left[0]["id"], ids[2].as_str());
    // No thumbnailer runs: the upload's own thumbnail job and the replayed one wait.
    assert_eq!(
        env.queue_depth(&env.topology.work_queue("thumbnail")).await,
        2
    );
}

/// Bad input (missing file, a directory, an empty file, an unknown rendition, a bad
/// format or codec, a codec the formats cannot carry) is a clear error naming the culprit, exit code 2, and nothing is stored or
/// published, even for the good files given alongside.
#[tokio::test]
async fn bad_input_is_refused_before_anything_is_published() {
    let env = TestEnv::new().await;
    let empty = env.data.path().join("empty.mp4");
    std::fs::write(&empty, b"").unwrap();
    let good = env.data.path().join("good.mp4");
    std::fs::write(&good, b"bytes").unwrap();
    let (good, empty) = (good.to_str().unwrap(), empty.to_str().unwrap());
    let dir = env.data.path().to_str().unwrap().to_owned();
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec!["upload", good, "/nonexistent/clip.mp4"],
            "/nonexistent/clip.mp4: no such file",
        ),
        (vec!["upload", good, &dir], "is a directory"),
        (vec!["upload", good, empty], "empty.mp4: the file is empty"),
        (
            vec!["upload", good, "--renditions", "720p,4k"],
            "unknown rendition `4k`; known: 1080p, 720p",
        ),
        (
            vec!["upload", good, "--formats", "avi"],
            "unknown format `avi`",
        ),
        (
            vec!["upload", good, "--renditions", "x:9000:100:64"],
            "height 9000",
        ),
        (
            vec!["upload", good, "--codecs", "h264,vp9"],
            "--codecs: unknown codec `vp9`; known: h264, hevc, av1",
        ),
        (
            vec!["upload", good, "--codecs", "av1,av1", "--formats", "cmaf"],
            "--codecs: `av1` is named twice",
        ),
        (
            vec!["upload", good, "--codecs", "h264,hevc", "--formats", "hls"],
            "hevc can only be written as mp4 or cmaf",
        ),
        (vec!["upload", good, "--bogus-flag"], "--bogus-flag"),
    ];
    for (args, says) in cases {
        let out = producer(&env, &args).await;
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", stderr(&out));
        assert!(stderr(&out).contains(says), "{args:?}: {}", stderr(&out));
        assert!(stdout(&out).is_empty(), "{args:?} printed a job id");
    }
    assert_eq!(queued_jobs(&env).await, 0, "nothing published");
    let uploads = StorageKey::new("uploads/").unwrap();
    assert!(
        env.storage.list(&uploads).await.unwrap().is_empty(),
        "nothing stored"
    );
}

/// A slip in the options is a usage error that says what is accepted: an empty entry in
/// `--renditions` (not silently the default ladder) and a negative `--thumbnails` (not
/// clap's hint to write `-- -1`), a misspelled `--ladder`. Nothing is published.
#[tokio::test]
async fn empty_renditions_and_negative_thumbnails_are_usage_errors() {
    let env = TestEnv::new().await;
    let good = env.data.path().join("good.mp4");
    std::fs::write(&good, b"bytes").unwrap();
    let good = good.to_str().unwrap();
    let cases: [(&[&str], &str); 5] = [
        (&["--renditions", ",,"], "empty entry"),
        (
            &["--ladder", "autoo"],
            "unknown ladder `autoo`; known: fixed, auto",
        ),
        (&["--renditions", "720p,,360p"], "empty entry"),
        (&["--thumbnails", "-1"], "must be 0 or more"),
        (&["--thumbnails", "many"], "not a whole number"),
    ];
    for (flags, says) in cases {
        let mut args = vec!["upload", good];
        args.extend_from_slice(flags);
        let out = producer(&env, &args).await;
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", stderr(&out));
        assert!(stderr(&out).contains(says), "{args:?}: {}", stderr(&out));
        assert!(
            !stderr(&out).contains("-- -1"),
            "{args:?}: {}",
            stderr(&out)
        );
        assert!(stdout(&out).is_empty(), "{args:?} printed a job id");
    }
    assert_eq!(queued_jobs(&env).await, 0, "nothing published");
}

/// Plain `--wait` output (stderr not a terminal) gives the transcode's percent, and a
/// rendition asked for but not made (720p of a 240p source) is named by `--wait` and by
/// `status`, not only in the manifest.
#[tokio::test]
async fn upload_wait_prints_percent_and_names_a_dropped_rendition() {
    let mut env = TestEnv::new().await;
    // The transcoder reports progress once a second: a long clip, encoded slowly on one
    // thread, keeps it busy for several seconds even on a fast machine.
    let clip = fixtures::sample_mp4(env.data.path(), "clip.mp4", 40, 320, 240);
    env.spawn_worker(
        "transcoder",
        "transcoder",
        &[
            ("VIDPIPE__TRANSCODER__PRESET", "veryslow"),
            ("VIDPIPE__TRANSCODER__THREADS", "1"),
        ],
    );
    env.spawn_worker("thumbnailer", "thumbnailer", &[]);
    let out = producer(
        &env,
        &[
            "upload",
            clip.to_str().unwrap(),
            "--renditions",
            "720p,240p",
            "--wait",
            "--timeout",
            "240",
        ],
    )
    .await;
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(0), "{err}\n{}", env.logs());
    let job_id = stdout(&out).trim().to_owned();
    let percent_lines: Vec<&str> = err
        .lines()
        .filter(|l| l.contains("transcode: progress ") && l.contains("% (attempt 1"))
        .collect();
    assert!(!percent_lines.is_empty(), "no percent in: {err}");
    assert!(
        err.contains("transcode: completed") && err.contains("not made: 720p"),
        "{err}"
    );

    let status = producer(&env, &["status", &job_id]).await;
    assert!(
        stdout(&status).contains("not made: 720p"),
        "{}",
        stdout(&status)
    );
    let status = json(&producer(&env, &["status", &job_id, "--json"]).await);
    assert_eq!(
        status["tasks"]["transcode"]["dropped_renditions"],
        serde_json::json!(["720p"]),
        "{status}"
    );
}

/// Ctrl-C (SIGINT) or SIGTERM during `upload --wait` stops the following, not the jobs:
/// the producer finishes its lines, says the jobs keep running and how to follow them,
/// and exits 5; both jobs are still queued.
#[tokio::test]
async fn a_signal_during_upload_wait_stops_cleanly_and_the_jobs_keep_running() {
    use tokio::io::AsyncBufReadExt;
    let env = TestEnv::new().await;
    let file = not_a_video(&env);
    for (n, signal) in ["INT", "TERM"].into_iter().enumerate() {
        // No worker runs, so the jobs stay queued and `--wait` waits.
        let mut child = tokio::process::Command::new(bin("producer"))
            .args(["upload", file.to_str().unwrap(), "--wait"])
            .envs(env.env_vars())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let mut lines = tokio::io::BufReader::new(child.stderr.take().unwrap()).lines();
        let mut err = String::new();
        while !err.contains("jobs published") {
            let line = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
                .await
                .expect("the upload to be published")
                .unwrap()
                .unwrap_or_else(|| panic!("producer ended early: {err}"));
            err.push_str(&line);
            err.push('\n');
        }
        // The producer listens for signals before it says the jobs are published.
        let pid = child.id().unwrap().to_string();
        let killed = std::process::Command::new("kill")
            .args([format!("-{signal}"), pid])
            .status()
            .unwrap();
        assert!(killed.success());
        let out = tokio::time::timeout(Duration::from_secs(10), child.wait_with_output())
            .await
            .expect("the producer to stop")
            .unwrap();
        while let Ok(Some(line)) = lines.next_line().await {
            err.push_str(&line);
            err.push('\n');
        }
        let job_id = stdout(&out).trim().to_owned();
        assert_eq!(out.status.code(), Some(5), "SIG{signal}: {err}");
        assert!(err.contains("keep running"), "SIG{signal}: {err}");
        assert!(
            err.contains(&format!("producer status {job_id}")),
            "SIG{signal}: {err}"
        );
        assert!(
            err.contains(&format!("job {job_id} transcode: not finished")),
            "the progress lines are finished: {err}"
        );
        assert_eq!(
            queued_jobs(&env).await,
            2 * (n as u32 + 1),
            "the jobs are still queued"
        );
    }
}

/// A worker configured with another `storage.root` than the producer parks the job with a
/// reason naming the root it searched (and the setting), which `status` shows.
#[tokio::test]
async fn a_worker_with_another_storage_root_names_the_root_it_searched() {
    let mut env = TestEnv::new().await;
    let file = not_a_video(&env);
    let elsewhere = env.data.path().join("elsewhere");
    std::fs::create_dir_all(&elsewhere).unwrap();
    let elsewhere = elsewhere.canonicalize().unwrap();
    env.spawn_worker(
        "vidpipe-testworker",
        "testworker",
        &[("VIDPIPE__STORAGE__ROOT", elsewhere.to_str().unwrap())],
    );
    let out = producer(&env, &["upload", file.to_str().unwrap()]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    let job_id = stdout(&out).trim().to_owned();
    let dead_queue = env.topology.dead();
    eventually(
        Duration::from_secs(30),
        "the transcode job to be parked",
        async || env.queue_depth(&dead_queue).await == 1,
    )
    .await;
    let status = json(&producer(&env, &["status", &job_id, "--json"]).await);
    let reason = status["tasks"]["transcode"]["reason"].as_str().unwrap();
    assert!(reason.contains("does not exist"), "{reason}");
    assert!(
        reason.contains(&format!("storage root {}", elsewhere.display()))
            && reason.contains("storage.root"),
        "the root searched is not named: {reason}"
    );
}

/// Several files upload concurrently, one job each, two messages per job, each with the
/// options given (formats and codecs among them).
#[tokio::test]
async fn several_files_make_one_job_each() {
    let env = TestEnv::new().await;
    let files: Vec<String> = (0..3)
        .map(|i| {
            let f = env.data.path().join(format!("v{i}.mov"));
            std::fs::write(&f, vec![i as u8 + 1; 100_000]).unwrap();
            f.to_str().unwrap().to_owned()
        })
        .collect();
    let mut args = vec![
        "upload",
        "--json",
        "--renditions",
        "720p,sd:360:700:96",
        "--no-sprite",
        "--formats",
        "cmaf,mp4",
        "--codecs",
        "h264,AV1",
    ];
    args.extend(files.iter().map(String::as_str));
    let out = producer(&env, &args).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let jobs = json_lines(&out);
    assert_eq!(jobs.len(), 3);
    for job in &jobs {
        let source = StorageKey::new(job["source"].as_str().unwrap()).unwrap();
        assert!(source.as_str().ends_with("/source.mov"));
        assert_eq!(
            env.storage.get_bytes(&source).await.unwrap().unwrap().len(),
            100_000
        );
    }
    assert_eq!(queued_jobs(&env).await, 6);
    let taken = env.take_all(&env.topology.work_queue("transcode")).await;
    let job: serde_json::Value = serde_json::from_slice(&taken[0].body).unwrap();
    assert_eq!(job["renditions"][1]["name"], "sd");
    assert_eq!(job["formats"], serde_json::json!(["cmaf", "mp4"]));
    assert_eq!(job["codecs"], serde_json::json!(["h264", "av1"]));
    let taken = env.take_all(&env.topology.work_queue("thumbnail")).await;
    let job: serde_json::Value = serde_json::from_slice(&taken[0].body).unwrap();
    assert!(job["sprite"].is_null(), "--no-sprite: {job}");
}

/// `--help` of every command says what it does and gives an example.
#[tokio::test]
async fn help_of_every_command_has_an_example() {
    let env = TestEnv::new().await;
    for args in [
        vec!["--help"],
        vec!["upload", "--help"],
        vec!["status", "--help"],
        vec!["dead", "--help"],
        vec!["dead", "list", "--help"],
        vec!["dead", "show", "--help"],
        vec!["dead", "replay", "--help"],
        vec!["dead", "purge", "--help"],
    ] {
        let out = producer(&env, &args).await;
        assert_eq!(out.status.code(), Some(0), "{args:?}");
        assert!(
            stdout(&out).contains("Example"),
            "{args:?}: {}",
            stdout(&out)
        );
    }
}

fn long(s: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s.as_bytes().to_vec()))
}

/// Waits for `queue` to hold `n` ready messages. A producer command that looked at the
/// parking lot returns what it read with a nack; a quorum queue counts those ready again
/// a moment after the command exits, not at once.
async fn depth_settles(env: &TestEnv, queue: &str, n: u32, what: &str) {
    eventually(Duration::from_secs(10), what, async || {
        env.queue_depth(queue).await == n
    })
    .await;
}
