//! Integration tests: the task registry (`shared::tasks`). A kind outside the builtin
//! registry (the tests' `copy`, registered only by the test worker's message type) gets
//! its own queue, retries and dead letters; the scripts' broker users come from it; and
//! what cannot be derived from it (compose services, images) agrees with it.

use std::path::Path;
use std::time::Duration;

use serde_json::json;
use shared::events::JobState;
use shared::storage_key::StorageKey;
use shared::tasks::{self, Registry};
use shared::topology::Topology;

use crate::support::kind::COPY;
use crate::support::{TestEnv, eventually, fixtures, job_keys, test_job};
use uuid::Uuid;

const WORKER: &str = "vidpipe-testworker";
const PATIENCE: Duration = Duration::from_secs(30);

/// A test-worker job body of the `copy` kind, with `extra` fields.
fn copy_job(id: Uuid, source: &str, prefix: &StorageKey, extra: serde_json::Value) -> Vec<u8> {
    let mut fields = json!({ "task": COPY.name });
    if let (Some(fields), Some(extra)) = (fields.as_object_mut(), extra.as_object()) {
        fields.extend(extra.clone());
    }
    test_job(id, source, prefix, fields)
}

/// A third kind flows end to end through the same runtime: published to `video_tasks`
/// with its routing key, consumed from its own queue, retried through the shared retry
/// tiers back to that queue, committed under `outputs/<job>/copy/`, with events; a
/// permanent failure is parked with the kind's name.
#[tokio::test]
async fn a_kind_outside_the_builtin_registry_flows_end_to_end() {
    let mut env = TestEnv::new().await;
    env.spawn_worker(WORKER, "copier", &[("VIDPIPE_TESTWORKER_TASK", COPY.name)]);

    let (id, source, prefix) = job_keys(COPY.name);
    env.put_source(&source, b"not a video at all").await;
    let mut events = env.follow_events(id).await;
    env.publish_raw(
        COPY.routing_key(),
        &copy_job(id, &source, &prefix, json!({ "fail_attempts": 1 })),
    )
    .await;
    let retrying = events
        .wait_for(COPY.name, JobState::Retrying, PATIENCE)
        .await;
    assert_eq!(retrying.attempt, 1);
    events
        .wait_for(COPY.name, JobState::Completed, PATIENCE)
        .await;
    let manifest = env.wait_manifest(&prefix, PATIENCE).await;
    assert_eq!(manifest.completion.task, COPY.name);
    assert_eq!(
        manifest.completion.attempt, 2,
        "retried back into its own queue"
    );
    assert_eq!(manifest.outputs[0].size_bytes, 18);

    let (dead_id, dead_source, dead_prefix) = job_keys(COPY.name);
    env.put_source(&dead_source, b"x").await;
    env.publish_raw(
        COPY.routing_key(),
        &copy_job(
            dead_id,
            &dead_source,
            &dead_prefix,
            json!({ "permanent": true }),
        ),
    )
    .await;
    let dead = env.wait_dead(1, PATIENCE).await;
    assert_eq!(dead[0].header("x-vidpipe-task").as_deref(), Some(COPY.name));
    assert!(dead[0].reason().contains("permanent failure requested"));

    let queue = env.topology.work_queue(COPY.name);
    assert_eq!(queue, format!("{}video_tasks.copy", env.prefix));
    eventually(PATIENCE, "the copy queue to drain", async || {
        env.queue_depth(&queue).await == 0
    })
    .await;
}

/// The registry's `needs_video` is what decides which sources a kind takes: the same
/// handler opens the same audio-only upload through `shared::media`; as a `copy` job
/// (needs no video) it completes with the audio described, as a `transcode` job (needs
/// video) it is dead at once with the media layer's clear reason.
#[tokio::test]
async fn needs_video_in_the_registry_decides_whether_audio_only_is_taken() {
    let mut env = TestEnv::new().await;
    env.spawn_worker(WORKER, "copier", &[("VIDPIPE_TESTWORKER_TASK", COPY.name)]);
    env.spawn_worker(WORKER, "video-kind", &[]);
    let audio = fixtures::ffmpeg(
        env.data.path(),
        "audio.m4a",
        &["-f", "lavfi", "-i", "sine=duration=1", "-c:a", "aac"],
    );
    const { assert!(!COPY.needs_video && tasks::TRANSCODE.needs_video) };

    let probe = json!({ "probe": true });
    let (_, copied) = env.submit_file(COPY.name, &audio, probe.clone()).await;
    let (refused_id, refused) = env.submit_file(tasks::TRANSCODE.name, &audio, probe).await;

    let manifest = env.wait_manifest(&copied, PATIENCE).await;
    let streams = &manifest.summary["streams"];
    assert_eq!(streams["video"], serde_json::Value::Null, "{streams}");
    assert_eq!(streams["audio"]["codec"], "aac", "{streams}");

    let dead = env.wait_dead(1, PATIENCE).await;
    let body: serde_json::Value = serde_json::from_slice(&dead[0].body).unwrap();
    assert_eq!(body["job_id"], refused_id.to_string());
    assert_eq!(dead[0].attempts(), Some(1), "refused at once, not retried");
    assert_eq!(
        dead[0].reason(),
        "source has no video stream (it has: audio aac)"
    );
    assert!(env.storage.manifest(&refused).await.unwrap().is_none());
}

/// The test kind stays out of production: the builtin registry (what the producer, the
/// broker users and `--declare-topology` of the real workers use) does not have it.
#[test]
fn the_test_kind_is_not_in_the_production_registry() {
    assert!(Registry::builtin().get(COPY.name).is_none());
    let production = Topology::new("", vec![Duration::from_secs(5)], 20);
    assert!(!production.registry().names().any(|n| n == COPY.name));
}

fn read(path: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(path);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Compose services, secrets volumes and the images are written by hand (YAML and
/// Dockerfiles cannot ask the registry): every line a registered role needs in them must
/// be there. This is the list README "Adding a task kind" step 5 points to; a miss
/// names the file and the line to add.
#[test]
fn compose_and_images_have_every_registered_role() {
    let files = [
        "docker-compose.yml",
        "docker/compose.s3.yml",
        "Dockerfile",
        "docker/Dockerfile.prebuilt",
    ];
    let text: Vec<String> = files.iter().map(|f| read(f)).collect();
    let mut missing = Vec::new();
    let mut need = |file: usize, line: String| {
        if !text[file].contains(&line) {
            missing.push(format!("{}: `{}`", files[file], line.trim()));
        }
    };
    let roles = tasks::broker_roles(&Registry::builtin(), &Topology::new("", vec![], 20));
    for role in &roles {
        let (r, upper) = (&role.role, role.role.to_uppercase());
        need(0, format!("\n  secrets-{r}:\n"));
        need(0, format!("- secrets-{r}:/secrets/{r}\n"));
        need(
            0,
            format!("VIDPIPE_{upper}_PASSWORD: ${{VIDPIPE_{upper}_PASSWORD:-}}"),
        );
        for image in [2, 3] {
            need(image, format!("/secrets/{r} "));
        }
    }
    for kind in tasks::BUILTIN {
        let (r, upper) = (kind.role, kind.role.to_uppercase());
        need(
            0,
            format!("\n  {r}:\n    <<: *vidpipe\n    command: [\"{r}\"]\n"),
        );
        need(
            0,
            format!("VIDPIPE__AMQP__URL: ${{VIDPIPE_{upper}_AMQP_URL:-}}"),
        );
        need(0, format!("- secrets-{r}:/run/vidpipe-secrets:ro"));
        need(0, format!("- scratch-{r}:/scratch\n"));
        need(0, format!("\n  scratch-{r}:\n"));
        need(1, format!("\n  {r}:\n    environment: *s3\n"));
        need(2, format!(" -p {r} "));
        need(2, format!("target/release/{r}"));
        need(3, format!("bin/{r}"));
    }
    assert!(
        missing.is_empty(),
        "the registry's roles need these lines:\n{}",
        missing.join("\n")
    );
}

/// `docker/secrets.sh` makes the broker's definitions from the registry (through the
/// producer binary, as in the image): one user per role with a real hash, the
/// registry's permissions.
#[test]
fn secrets_script_writes_the_registry_users_into_the_broker_definitions() {
    let root = tempfile::tempdir().expect("temp dir");
    let roles = tasks::broker_roles(&Registry::builtin(), &Topology::new("", vec![], 20));
    for dir in roles
        .iter()
        .map(|r| r.role.as_str())
        .chain(["minio", "rabbitmq"])
    {
        std::fs::create_dir(root.path().join(dir)).unwrap();
    }
    let out = std::process::Command::new("bash")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/docker/secrets.sh"))
        .arg("init")
        .env("VIDPIPE_SECRETS_ROOT", root.path())
        .env("VIDPIPE_PRODUCER_BIN", crate::support::bin("producer"))
        .output()
        .expect("running docker/secrets.sh");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let defs: serde_json::Value = serde_json::from_slice(
        &std::fs::read(root.path().join("rabbitmq/definitions.json")).unwrap(),
    )
    .unwrap();
    let users: Vec<&str> = defs["users"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| u["name"].as_str().unwrap())
        .collect();
    let expected: Vec<&str> = roles.iter().map(|r| r.user.as_str()).collect();
    assert_eq!(users, expected);
    for user in defs["users"].as_array().unwrap() {
        let hash = user["password_hash"].as_str().unwrap();
        assert!(!hash.contains('@') && hash.len() == 48, "{hash}");
    }
    for (perm, role) in defs["permissions"].as_array().unwrap().iter().zip(&roles) {
        assert_eq!(
            (&perm["configure"], &perm["write"], &perm["read"]),
            (
                &json!(role.configure),
                &json!(role.write),
                &json!(role.read)
            )
        );
    }
}

/// `producer tasks --json` is the registry for scripts: every builtin kind with its queues
/// and routing keys (normal and high), and role, and nothing else; it needs no broker and no settings.
#[test]
fn producer_tasks_prints_the_builtin_registry() {
    let out = std::process::Command::new(crate::support::bin("producer"))
        .args(["tasks", "--json", "--prefix", "p."])
        .env("VIDPIPE__AMQP__URL", "amqp://nowhere.invalid:1/%2f")
        .output()
        .expect("running producer tasks");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let kinds: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let expected: Vec<serde_json::Value> = tasks::BUILTIN
        .iter()
        .map(|k| {
            json!({
                "name": k.name, "routing_key": k.name, "queue": format!("p.video_tasks.{}", k.name),
                "high_routing_key": format!("{}.high", k.name),
                "high_queue": format!("p.video_tasks.{}.high", k.name),
                "message": k.message, "needs_video": k.needs_video, "role": k.role,
                "user": format!("vidpipe-{}", k.role),
            })
        })
        .collect();
    assert_eq!(kinds, json!(expected));
}
