//! Several brokers in one setting (`amqp.urls`): processes connect to the first live
//! address, skipping dead ones, and a bad entry is refused at start, named, without its
//! password. The node-loss behaviour on a real cluster is `cluster.rs`.

use std::process::Output;
use std::time::Duration;

use serde_json::json;

use crate::support::{TestEnv, amqp_url, bin, eventually, job_keys, test_job};

/// Nothing listens there: connections are refused at once.
const DEAD: &str = "amqp://guest:guest@127.0.0.1:1/%2f";

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A worker whose list starts with a dead address consumes from the live one, and its log
/// says which address it skipped and which it connected to.
#[tokio::test]
async fn a_worker_skips_a_dead_address_and_consumes_from_the_live_one() {
    let mut env = TestEnv::new().await;
    env.use_broker_list(&format!("{DEAD}, {}", amqp_url()));
    let w = env.spawn_worker("vidpipe-testworker", "listed", &[]);
    let (id, source, prefix) = job_keys("transcode");
    env.put_source(&source, id.as_bytes()).await;
    env.publish_raw("transcode", &test_job(id, &source, &prefix, json!({})))
        .await;
    let manifest = env.wait_manifest(&prefix, Duration::from_secs(30)).await;
    assert_eq!(manifest.completion.job_id, id);
    let log = env.worker(w).log_text();
    assert!(
        log.contains("broker node unavailable") && log.contains("127.0.0.1:1/"),
        "the dead address is named in the log:\n{log}"
    );
    assert!(
        log.contains("connected to the broker") && !log.contains("guest:guest"),
        "{log}"
    );
}

/// The producer publishes with confirms through a list whose first address is dead.
#[tokio::test]
async fn the_producer_publishes_through_a_list_starting_with_a_dead_address() {
    let mut env = TestEnv::new().await;
    env.use_broker_list(&format!("{DEAD},{}", amqp_url()));
    let file = env.data.path().join("notes.mp4");
    std::fs::write(&file, b"not a video, but the producer does not look").unwrap();
    let out = env.producer(&["upload", file.to_str().unwrap()]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    let queue = env.topology.work_queue("transcode");
    eventually(
        Duration::from_secs(10),
        "the job in the work queue",
        async || env.queue_depth(&queue).await == 1,
    )
    .await;
    // `--declare-topology` goes through the list too.
    let out = std::process::Command::new(bin("vidpipe-testworker"))
        .arg("--declare-topology")
        .envs(env.env_vars())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
}

/// Runs `binary args` with `vars` set over the test's world; returns what it printed.
async fn run(env: &TestEnv, binary: &str, args: &[&str], vars: &[(&str, &str)]) -> Output {
    tokio::process::Command::new(bin(binary))
        .args(args)
        .envs(
            env.env_vars()
                .into_iter()
                .filter(|(k, _)| !k.starts_with("VIDPIPE__AMQP__URL")),
        )
        .envs(vars.iter().copied())
        .kill_on_drop(true)
        .output()
        .await
        .unwrap()
}

/// A bad entry stops workers and the producer at start with a message naming the entry
/// and its position, the password hidden; so does setting both `amqp.url` and `amqp.urls`.
#[tokio::test]
async fn a_bad_address_in_the_list_is_refused_naming_it_without_its_password() {
    let env = TestEnv::new().await;
    let good = amqp_url();
    let bad_lists = [
        (format!("{good},http://app:hunter2@node-b:5672/"), "entry 2"),
        (format!("{good},,{good}"), "entry 2"),
        (
            format!("amqp://app:hunter2@node-a:99999/,{good}"),
            "entry 1",
        ),
    ];
    for (list, entry) in &bad_lists {
        for (binary, args) in [
            ("vidpipe-testworker", &[][..]),
            (
                "producer",
                &["status", "00000000-0000-0000-0000-000000000000"][..],
            ),
        ] {
            let out = run(&env, binary, args, &[("VIDPIPE__AMQP__URLS", list)]).await;
            let err = stderr(&out);
            assert!(!out.status.success(), "{binary} accepted {entry}: {err}");
            assert!(
                err.contains("amqp.urls") && err.contains(entry),
                "{binary}: the message names the setting and {entry}:\n{err}"
            );
            assert!(
                !err.contains("hunter2"),
                "{binary} printed a password:\n{err}"
            );
        }
    }
    let err = stderr(
        &run(
            &env,
            "vidpipe-testworker",
            &[],
            &[("VIDPIPE__AMQP__URLS", "http://app:hunter2@node-b/")],
        )
        .await,
    );
    assert!(
        err.contains("app:***@node-b"),
        "the entry is shown redacted:\n{err}"
    );
    let out = run(
        &env,
        "vidpipe-testworker",
        &[],
        &[
            ("VIDPIPE__AMQP__URL", &good),
            ("VIDPIPE__AMQP__URLS", &good),
        ],
    )
    .await;
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("`amqp.url` and `amqp.urls` are both set"),
        "{}",
        stderr(&out)
    );
}
