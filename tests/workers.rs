//! `producer workers` against real workers: the registry is their heartbeats on
//! `video_events`, nothing else.

use std::time::Duration;

use crate::support::{TestEnv, eventually};

/// Short heartbeats so a test sees the registry change within seconds.
const FAST_HEARTBEATS: [(&str, &str); 2] = [
    ("VIDPIPE__WORKER__HEARTBEAT_SECS", "1"),
    ("VIDPIPE__WORKER__GONE_AFTER_SECS", "3"),
];

/// The workers `producer workers --json` lists: (id, kind, version, concurrency).
async fn listed(env: &TestEnv) -> Vec<(String, String, String, u64)> {
    let out = env.producer(&["workers", "--json"]).await;
    assert!(out.status.success(), "{out:?}");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|line| {
            let w: serde_json::Value = serde_json::from_str(line).expect("a JSON line");
            assert_eq!(w["liveness"], "live", "{line}");
            (
                w["id"].as_str().unwrap_or_default().to_owned(),
                w["kind"].as_str().unwrap_or_default().to_owned(),
                w["version"].as_str().unwrap_or_default().to_owned(),
                w["concurrency"].as_u64().unwrap_or_default(),
            )
        })
        .collect()
}

/// Two live workers are listed with their kind, version and concurrency; one killed with
/// SIGKILL (no goodbye) drops out of the listing once its heartbeats stop.
#[tokio::test]
async fn workers_lists_live_workers_and_drops_a_killed_one() {
    let mut env = TestEnv::new().await;
    for (key, value) in FAST_HEARTBEATS {
        env.add_env(key, value);
    }
    env.spawn_worker("vidpipe-testworker", "w-alpha", &[]);
    env.spawn_worker(
        "vidpipe-testworker",
        "w-beta",
        &[("VIDPIPE__WORKER__CONCURRENCY", "3")],
    );
    let version = env!("CARGO_PKG_VERSION").to_owned();
    let both = vec![
        (
            "w-alpha".to_owned(),
            "transcode".to_owned(),
            version.clone(),
            1,
        ),
        (
            "w-beta".to_owned(),
            "transcode".to_owned(),
            version.clone(),
            3,
        ),
    ];
    eventually(Duration::from_secs(60), "both workers listed", async || {
        listed(&env).await == both
    })
    .await;
    env.worker(0).signal("KILL");
    env.worker(0)
        .wait_exit(Duration::from_secs(10))
        .expect("a SIGKILLed worker exits");
    eventually(
        Duration::from_secs(30),
        "the killed worker gone",
        async || listed(&env).await == both[1..],
    )
    .await;
}
