//! Integration tests: the health and metrics endpoint of a real worker process.

use std::time::Duration;

use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::support::{TestEnv, eventually, job_keys, test_job};

const WORKER: &str = "vidpipe-testworker";
const PATIENCE: Duration = Duration::from_secs(30);

/// A free local port (bound then released).
async fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `GET path` on the worker's endpoint: (status code, body), or None if nothing answers.
async fn get(port: u16, path: &str) -> Option<(u16, String)> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).await.ok()?;
    stream
        .write_all(format!("GET {path} HTTP/1.0\r\n\r\n").as_bytes())
        .await
        .ok()?;
    let mut text = String::new();
    stream.read_to_string(&mut text).await.ok()?;
    let status = text.split_whitespace().nth(1)?.parse().ok()?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Some((status, body))
}

/// Forwards every connection on `listener` to the real broker: the broker "appears".
fn forward_to_broker(listener: TcpListener) {
    tokio::spawn(async move {
        while let Ok((mut inbound, _)) = listener.accept().await {
            tokio::spawn(async move {
                if let Ok(mut outbound) = TcpStream::connect("127.0.0.1:5672").await {
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                }
            });
        }
    });
}

/// Not ready while the broker is unreachable (the worker waits, logging why); ready
/// once it can connect and consume.
#[tokio::test]
async fn readiness_follows_broker_reachability() {
    let mut env = TestEnv::new().await;
    let health_port = free_port().await;
    let broker_port = free_port().await;
    let url = format!("amqp://guest:guest@127.0.0.1:{broker_port}/%2f");
    let health = health_port.to_string();
    env.spawn_worker(
        WORKER,
        "readiness",
        &[
            ("VIDPIPE__AMQP__URL", &url),
            ("VIDPIPE__HEALTH__PORT", &health),
            ("VIDPIPE__HEALTH__BIND", "127.0.0.1"),
        ],
    );
    eventually(PATIENCE, "the health endpoint to answer", async || {
        get(health_port, "/healthz").await.is_some()
    })
    .await;
    assert_eq!(get(health_port, "/healthz").await.unwrap().0, 200);
    assert_eq!(
        get(health_port, "/readyz").await.unwrap().0,
        503,
        "no broker yet: not ready"
    );
    eventually(PATIENCE, "a log line saying why it waits", async || {
        env.logs().contains("broker unreachable")
    })
    .await;

    forward_to_broker(TcpListener::bind(("127.0.0.1", broker_port)).await.unwrap());
    eventually(
        PATIENCE,
        "readiness once the broker is reachable",
        async || get(health_port, "/readyz").await.map(|r| r.0) == Some(200),
    )
    .await;
}

/// Metrics counters move with completed, retried and dead jobs.
#[tokio::test]
async fn metrics_count_completed_retried_and_dead_jobs() {
    let mut env = TestEnv::new().await;
    let port = free_port().await;
    let port_s = port.to_string();
    env.spawn_worker(
        WORKER,
        "metrics",
        &[
            ("VIDPIPE__HEALTH__PORT", &port_s),
            ("VIDPIPE__HEALTH__BIND", "127.0.0.1"),
        ],
    );
    for extra in [
        json!({}),
        json!({ "fail_attempts": 1 }),
        json!({ "permanent": true }),
    ] {
        let (id, source, prefix) = job_keys("transcode");
        env.put_source(&source, b"x").await;
        env.publish_raw("transcode", &test_job(id, &source, &prefix, extra))
            .await;
    }
    let expected = [
        r#"vidpipe_jobs_total{task="transcode",outcome="completed"} 2"#,
        r#"vidpipe_jobs_total{task="transcode",outcome="retried"} 1"#,
        r#"vidpipe_jobs_total{task="transcode",outcome="dead"} 1"#,
        r#"vidpipe_retries_total{task="transcode"} 1"#,
        r#"vidpipe_dead_letters_total{task="transcode"} 1"#,
    ];
    let mut last = String::new();
    eventually(PATIENCE, "the counters to reach their values", async || {
        last = get(port, "/metrics").await.map(|r| r.1).unwrap_or_default();
        expected.iter().all(|line| last.contains(line))
    })
    .await;
    // Four handler runs: ok, the failed first attempt and its retry, the permanent failure.
    assert!(
        last.contains("vidpipe_job_duration_seconds_count{task=\"transcode\"} 4"),
        "{last}"
    );
    assert!(last.contains("vidpipe_jobs_in_flight 0"), "{last}");
}
