//! Integration tests: least-privilege broker users (`scripts/rabbitmq-users.sh`).

use std::time::Duration;

use lapin::options::BasicGetOptions;
use lapin::types::FieldTable;
use serde_json::json;
use shared::broker;
use uuid::Uuid;

use crate::support::{TestEnv, job_keys, test_job};

const PATIENCE: Duration = Duration::from_secs(30);

/// The script's users for one test (name suffix `-<id>`), deleted on drop.
struct PrivateUsers {
    suffix: String,
    password: String,
}

impl PrivateUsers {
    fn create(env: &TestEnv) -> Self {
        let id = &Uuid::new_v4().simple().to_string()[..8];
        let users = Self {
            suffix: format!("-{id}"),
            password: format!("pw-{id}"),
        };
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/rabbitmq-users.sh");
        let out = std::process::Command::new("bash")
            .arg(script)
            .args(["--prefix", &env.prefix, "--suffix", &users.suffix])
            .env("VIDPIPE_PRODUCER_BIN", crate::support::bin("producer"))
            .env("VIDPIPE_PRODUCER_PASSWORD", &users.password)
            .env("VIDPIPE_TRANSCODER_PASSWORD", &users.password)
            .env("VIDPIPE_THUMBNAILER_PASSWORD", &users.password)
            .env("VIDPIPE_OPS_PASSWORD", &users.password)
            .output()
            .expect("running scripts/rabbitmq-users.sh");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        users
    }

    fn url(&self, role: &str) -> String {
        format!(
            "amqp://vidpipe-{role}{}:{}@127.0.0.1:5672/%2f",
            self.suffix, self.password
        )
    }
}

impl Drop for PrivateUsers {
    fn drop(&mut self) {
        for role in ["producer", "transcoder", "thumbnailer", "ops"] {
            let _ = std::process::Command::new("rabbitmqctl")
                .args([
                    "-q",
                    "delete_user",
                    &format!("vidpipe-{role}{}", self.suffix),
                ])
                .output();
        }
    }
}

/// A worker's credentials cannot publish jobs to `video_tasks` (unless its kind splits
/// into parts: the transcoder's) nor read the other worker's queue, but can read its own.
#[tokio::test]
async fn worker_credentials_cannot_publish_jobs_or_read_other_queues() {
    let env = TestEnv::new().await;
    let users = PrivateUsers::create(&env);
    let connect = async |role: &str| {
        broker::try_connect(&users.url(role), "least-privilege-test")
            .await
            .expect("the user can log in")
    };
    let publish_job = async |conn: &lapin::Connection, key: &str| {
        let ch = broker::confirm_channel(conn).await.unwrap();
        broker::publish_confirmed(
            &ch,
            &env.topology.tasks_exchange(),
            key,
            b"{}",
            broker::persistent_json(FieldTable::default()),
        )
        .await
    };
    let refused = |what: &str, err: String| {
        assert!(
            err.contains("ACCESS_REFUSED") || err.contains("403"),
            "{what}: {err}"
        );
    };

    let thumbnailer = connect("thumbnailer").await;
    let publish = publish_job(&thumbnailer, "thumbnail").await;
    refused(
        "a thumbnailer publishing a job",
        format!(
            "{:#}",
            publish.expect_err("publishing a job must be refused")
        ),
    );
    let ch = thumbnailer.create_channel().await.unwrap();
    let other = ch
        .basic_get(
            env.topology.work_queue("transcode").into(),
            BasicGetOptions::default(),
        )
        .await;
    refused(
        "a thumbnailer reading the transcode queue",
        format!(
            "{:?}",
            other.expect_err("reading the transcode queue must be refused")
        ),
    );
    let ch = thumbnailer.create_channel().await.unwrap();
    let own = ch
        .basic_get(
            env.topology.work_queue("thumbnail").into(),
            BasicGetOptions::default(),
        )
        .await;
    assert!(own.is_ok(), "its own queue is readable: {own:?}");

    // The transcoder publishes the segments of split jobs (a body of `{}` is poison to
    // the workers, and this test's queue is deleted with its topology).
    let transcoder = connect("transcoder").await;
    let parts = publish_job(&transcoder, "transcode").await;
    assert!(parts.is_ok(), "the transcoder publishes parts: {parts:?}");
    let ch = transcoder.create_channel().await.unwrap();
    let other = ch
        .basic_get(
            env.topology.work_queue("thumbnail").into(),
            BasicGetOptions::default(),
        )
        .await;
    refused(
        "a transcoder reading the thumbnail queue",
        format!(
            "{:?}",
            other.expect_err("reading the thumbnail queue must be refused")
        ),
    );
}

/// A worker running as its least-privilege user (topology declared by someone else)
/// completes, retries and dead-letters jobs.
#[tokio::test]
async fn least_privilege_worker_completes_retries_and_dead_letters() {
    let mut env = TestEnv::new().await;
    let users = PrivateUsers::create(&env);
    let url = users.url("transcoder");
    env.spawn_worker(
        "vidpipe-testworker",
        "least",
        &[
            ("VIDPIPE__AMQP__URL", &url),
            ("VIDPIPE__TOPOLOGY__DECLARE", "false"),
        ],
    );
    let mut prefixes = Vec::new();
    for extra in [json!({ "fail_attempts": 1 }), json!({ "permanent": true })] {
        let (id, source, prefix) = job_keys("transcode");
        env.put_source(&source, b"x").await;
        env.publish_raw("transcode", &test_job(id, &source, &prefix, extra))
            .await;
        prefixes.push(prefix);
    }
    let manifest = env.wait_manifest(&prefixes[0], PATIENCE).await;
    assert_eq!(
        manifest.completion.attempt, 2,
        "retried through a retry tier, then completed"
    );
    let dead = env.wait_dead(1, PATIENCE).await;
    assert!(dead[0].reason().contains("permanent failure requested"));
}
