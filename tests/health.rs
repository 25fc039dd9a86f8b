//! Integration tests: the health and metrics endpoint of a real worker process.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use openmetrics_parser::openmetrics::parse_openmetrics;
use openmetrics_parser::prometheus::parse_prometheus;
use openmetrics_parser::{
    MetricsExposition, OpenMetricsType, OpenMetricsValue, PrometheusType, PrometheusValue,
    RenderableMetricValue,
};
use serde_json::json;
use shared::events::JobState;
use shared::health::OUTCOMES;
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

/// `GET /metrics` with this `Accept` header (none for None): (content type, body).
async fn scrape(port: u16, accept: Option<&str>) -> (String, String) {
    let mut stream = TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connecting to the metrics endpoint");
    let accept = accept
        .map(|a| format!("Accept: {a}\r\n"))
        .unwrap_or_default();
    stream
        .write_all(format!("GET /metrics HTTP/1.0\r\n{accept}\r\n").as_bytes())
        .await
        .unwrap();
    let mut text = String::new();
    stream.read_to_string(&mut text).await.unwrap();
    let (head, body) = text.split_once("\r\n\r\n").expect("an HTTP response");
    let content_type = head
        .lines()
        .find_map(|l| {
            let (name, value) = l.split_once(':')?;
            name.eq_ignore_ascii_case("content-type")
                .then(|| value.trim().to_owned())
        })
        .unwrap_or_default();
    (content_type, body.to_owned())
}

/// Values of a counter family parsed from classic text, by the value of `label`.
fn classic_counter(
    exposition: &MetricsExposition<PrometheusType, PrometheusValue>,
    family: &str,
    label: &str,
) -> Vec<(String, f64)> {
    counter_values(
        exposition,
        family,
        label,
        PrometheusType::Counter,
        |v| match v {
            PrometheusValue::Counter(c) => Some(c.value.as_f64()),
            _ => None,
        },
    )
}

/// Values of a counter family parsed from OpenMetrics, by the value of `label`.
fn openmetrics_counter(
    exposition: &MetricsExposition<OpenMetricsType, OpenMetricsValue>,
    family: &str,
    label: &str,
) -> Vec<(String, f64)> {
    counter_values(
        exposition,
        family,
        label,
        OpenMetricsType::Counter,
        |v| match v {
            OpenMetricsValue::Counter(c) => Some(c.value.as_f64()),
            _ => None,
        },
    )
}

/// Values of a counter family by the value of `label`, in either format: `counter` is
/// the format's counter type, `number` its counter values' number (`None`: not one).
fn counter_values<T, V>(
    exposition: &MetricsExposition<T, V>,
    family: &str,
    label: &str,
    counter: T,
    number: impl Fn(&V) -> Option<f64>,
) -> Vec<(String, f64)>
where
    T: Clone + PartialEq + std::fmt::Debug,
    V: RenderableMetricValue + Clone + std::fmt::Debug,
{
    let family = exposition
        .families
        .get(family)
        .unwrap_or_else(|| panic!("no family {family}"));
    assert_eq!(family.family_type, counter, "{family:?}");
    family
        .iter_samples()
        .map(|s| {
            let labels = s.get_labelset().unwrap();
            let value = number(&s.value).unwrap_or_else(|| panic!("not a counter value: {s:?}"));
            let key = labels.get_label_value(label).unwrap_or_default().to_owned();
            (key, value)
        })
        .collect()
}

/// Every outcome of `transcode` at zero, sorted like [`OUTCOMES`] sorted.
fn every_outcome_at_zero() -> Vec<(String, f64)> {
    let mut all: Vec<(String, f64)> = OUTCOMES.iter().map(|o| (o.to_string(), 0.0)).collect();
    all.sort_by(|a, b| a.0.cmp(&b.0));
    all
}

/// The address worker `index` logged for its health endpoint (it runs with JSON logs).
async fn logged_health_addr(env: &mut TestEnv, index: usize) -> SocketAddr {
    let mut found = None;
    eventually(
        PATIENCE,
        "the worker to log its health address",
        async || {
            found = env.worker(index).log_text().lines().find_map(|line| {
                let entry: serde_json::Value = serde_json::from_str(line).ok()?;
                (entry["fields"]["message"] == "health and metrics endpoint listening")
                    .then(|| entry["fields"]["addr"].as_str()?.parse().ok())?
            });
            found.is_some()
        },
    )
    .await;
    found.expect("found above")
}

/// Whether the peer closes `stream` (EOF or reset) within `within`, without answering.
async fn closed_unanswered(stream: &mut TcpStream, within: Duration) -> bool {
    let mut buf = [0u8; 64];
    matches!(
        tokio::time::timeout(within, stream.read(&mut buf)).await,
        Ok(Ok(0) | Err(_))
    )
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
    let health = format!("127.0.0.1:{health_port}");
    env.spawn_worker(
        WORKER,
        "readiness",
        &[
            ("VIDPIPE__AMQP__URL", &url),
            ("VIDPIPE__HEALTH__ADDR", &health),
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

/// After SIGTERM, while a job still runs within the grace period, the worker is alive
/// (/healthz 200) but not ready (/readyz 503); the endpoint goes away when it exits.
#[tokio::test]
async fn draining_worker_is_alive_but_not_ready() {
    let mut env = TestEnv::new().await;
    let port = free_port().await;
    let addr = format!("127.0.0.1:{port}");
    let w = env.spawn_worker(
        WORKER,
        "draining",
        &[
            ("VIDPIPE__HEALTH__ADDR", &addr),
            ("VIDPIPE__WORKER__SHUTDOWN_GRACE_SECS", "30"),
        ],
    );
    eventually(PATIENCE, "the worker to be ready", async || {
        get(port, "/readyz").await.map(|r| r.0) == Some(200)
    })
    .await;
    let (id, source, prefix) = job_keys("transcode");
    env.put_source(&source, b"x").await;
    let mut events = env.follow_events(id).await;
    env.publish_raw(
        "transcode",
        &test_job(id, &source, &prefix, json!({ "work_ms": 5000 })),
    )
    .await;
    events
        .wait_for("transcode", JobState::Started, PATIENCE)
        .await;
    env.worker(w).signal("TERM");
    eventually(PATIENCE, "readiness to drop at SIGTERM", async || {
        get(port, "/readyz").await.map(|r| r.0) == Some(503)
    })
    .await;
    assert_eq!(get(port, "/healthz").await.map(|r| r.0), Some(200));
    let log = env.worker(w).log_text();
    assert!(
        env.worker(w).is_running() && !log.contains("job completed"),
        "the answers above should come while the job drains:\n{log}"
    );
    let status = env.worker(w).wait_exit(PATIENCE).expect("worker exits");
    assert!(status.success(), "{}", env.logs());
    assert!(env.storage.manifest(&prefix).await.unwrap().is_some());
    assert_eq!(
        get(port, "/healthz").await,
        None,
        "nothing answers after exit"
    );
}

/// What Prometheus 2.x sends when it scrapes: OpenMetrics first, classic text after.
const PROMETHEUS_ACCEPT: &str = "application/openmetrics-text;version=1.0.0,\
    application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";

/// `/metrics` answers in the format the scraper asks for, labelled with its content
/// type, and both parse with a real parser: OpenMetrics for Prometheus, classic text for
/// curl and older scrapers. Before any job, every series is there at zero.
#[tokio::test]
async fn metrics_parse_in_both_formats_with_every_series_at_zero() {
    let mut env = TestEnv::new().await;
    let port = free_port().await;
    let addr = format!("127.0.0.1:{port}");
    env.spawn_worker(WORKER, "formats", &[("VIDPIPE__HEALTH__ADDR", &addr)]);
    eventually(PATIENCE, "the metrics endpoint to answer", async || {
        get(port, "/metrics").await.is_some()
    })
    .await;

    let (content_type, body) = scrape(port, Some(PROMETHEUS_ACCEPT)).await;
    assert_eq!(
        content_type,
        "application/openmetrics-text; version=1.0.0; charset=utf-8"
    );
    let parsed = parse_openmetrics(&body).unwrap_or_else(|e| panic!("{e:?}:\n{body}"));
    let mut outcomes = openmetrics_counter(&parsed, "vidpipe_jobs", "outcome");
    outcomes.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(outcomes, every_outcome_at_zero(), "{body}");
    for family in ["vidpipe_retries", "vidpipe_dead_letters"] {
        let samples = openmetrics_counter(&parsed, family, "task");
        assert_eq!(samples, [("transcode".to_owned(), 0.0)], "{family}");
    }
    for family in ["vidpipe_source_read_bytes", "vidpipe_output_written_bytes"] {
        assert_eq!(parsed.families[family].unit, "bytes", "{family}");
        assert_eq!(
            openmetrics_counter(&parsed, family, "task"),
            [(String::new(), 0.0)]
        );
    }
    let duration = &parsed.families["vidpipe_job_duration_seconds"];
    assert_eq!(duration.family_type, OpenMetricsType::Histogram);
    assert_eq!(
        duration.iter_samples().count(),
        1,
        "one series, for transcode"
    );
    // The mismatch this endpoint once had: this body read as classic text does not
    // give a counter named like its samples.
    let misread = parse_prometheus(&body);
    assert!(
        misread
            .as_ref()
            .map_or(true, |m| !m.families.contains_key("vidpipe_jobs_total")),
        "{misread:?}"
    );

    for accept in [None, Some("*/*"), Some("text/plain;version=0.0.4")] {
        let (content_type, body) = scrape(port, accept).await;
        assert_eq!(
            content_type, "text/plain; version=0.0.4; charset=utf-8",
            "Accept: {accept:?}"
        );
        let parsed = parse_prometheus(&body).unwrap_or_else(|e| panic!("{e:?}:\n{body}"));
        let mut outcomes = classic_counter(&parsed, "vidpipe_jobs_total", "outcome");
        outcomes.sort_by(|a, b| a.0.cmp(&b.0));
        assert_eq!(outcomes, every_outcome_at_zero(), "{body}");
        for family in [
            "vidpipe_retries_total",
            "vidpipe_dead_letters_total",
            "vidpipe_source_read_bytes_total",
            "vidpipe_output_written_bytes_total",
        ] {
            let samples = classic_counter(&parsed, family, "task");
            assert!(
                samples.iter().all(|(_, v)| *v == 0.0),
                "{family}: {samples:?}"
            );
        }
        assert!(
            !parsed.families.contains_key("vidpipe_jobs"),
            "no empty family beside the counter:\n{body}"
        );
        assert_eq!(
            parsed.families["vidpipe_job_duration_seconds"].family_type,
            PrometheusType::Histogram
        );
    }
}

/// Metrics counters move with completed, retried and dead jobs.
#[tokio::test]
async fn metrics_count_completed_retried_and_dead_jobs() {
    let mut env = TestEnv::new().await;
    let port = free_port().await;
    let addr = format!("127.0.0.1:{port}");
    env.spawn_worker(WORKER, "metrics", &[("VIDPIPE__HEALTH__ADDR", &addr)]);
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
    // Bytes of the sources read (every attempt fetches) and of the outputs committed.
    let parsed = parse_prometheus(&last).unwrap_or_else(|e| panic!("{e:?}:\n{last}"));
    for family in [
        "vidpipe_source_read_bytes_total",
        "vidpipe_output_written_bytes_total",
    ] {
        let samples = classic_counter(&parsed, family, "task");
        assert!(
            samples.iter().all(|(_, v)| *v > 0.0),
            "{family}: {samples:?}"
        );
    }
}

/// With default health settings, two transcoders and a thumbnailer start side by side on
/// one machine (no port clash) and each serves its own endpoint.
#[tokio::test]
async fn workers_with_default_health_settings_start_side_by_side() {
    let mut env = TestEnv::new().await;
    let json_logs = [("VIDPIPE__LOG__FORMAT", "json")];
    let workers = [
        env.spawn_worker("transcoder", "transcoder-1", &json_logs),
        env.spawn_worker("transcoder", "transcoder-2", &json_logs),
        env.spawn_worker("thumbnailer", "thumbnailer-1", &json_logs),
    ];
    let mut ports = Vec::new();
    for index in workers {
        let addr = logged_health_addr(&mut env, index).await;
        eventually(PATIENCE, "the endpoint to be ready", async || {
            get(addr.port(), "/readyz").await.map(|r| r.0) == Some(200)
        })
        .await;
        ports.push(addr.port());
    }
    for index in workers {
        assert!(env.worker(index).is_running(), "{}", env.logs());
    }
    ports.sort_unstable();
    ports.dedup();
    assert_eq!(
        ports.len(),
        3,
        "each worker has a port of its own: {ports:?}"
    );
}

/// By default the endpoint listens on loopback only, on a port the OS picked.
#[tokio::test]
async fn default_health_endpoint_is_on_loopback() {
    let mut env = TestEnv::new().await;
    let index = env.spawn_worker(WORKER, "loopback", &[("VIDPIPE__LOG__FORMAT", "json")]);
    let addr = logged_health_addr(&mut env, index).await;
    assert_eq!(addr.ip().to_string(), "127.0.0.1", "{addr}");
    assert_ne!(addr.port(), 0);
    // The kernel's own table agrees: the socket on that port is bound to 127.0.0.1
    // (`0100007F` in /proc/net/tcp), not to every interface.
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap();
    let listening: Vec<&str> = table
        .lines()
        .filter_map(|l| {
            let local = l.split_whitespace().nth(1)?;
            let state = l.split_whitespace().nth(3)?;
            (state == "0A" && local.ends_with(&format!(":{:04X}", addr.port()))).then_some(local)
        })
        .collect();
    assert_eq!(
        listening,
        [format!("0100007F:{:04X}", addr.port())],
        "{table}"
    );
    assert_eq!(get(addr.port(), "/healthz").await.unwrap().0, 200);
}

/// Connections beyond `health.max_connections` are closed at once (not queued), and the
/// endpoint answers again as soon as a slot is free.
#[tokio::test]
async fn connections_beyond_the_cap_are_closed_at_once() {
    let mut env = TestEnv::new().await;
    let port = free_port().await;
    let addr = format!("127.0.0.1:{port}");
    env.spawn_worker(
        WORKER,
        "capped",
        &[
            ("VIDPIPE__HEALTH__ADDR", &addr),
            ("VIDPIPE__HEALTH__MAX_CONNECTIONS", "4"),
            // Long enough that the held connections keep their slots for the whole test.
            ("VIDPIPE__HEALTH__TIMEOUT_SECS", "60"),
        ],
    );
    eventually(PATIENCE, "the health endpoint to answer", async || {
        get(port, "/healthz").await.is_some()
    })
    .await;
    // Four idle clients take every slot (accepted in order, before anything after them).
    let mut held = Vec::new();
    for _ in 0..4 {
        held.push(TcpStream::connect(("127.0.0.1", port)).await.unwrap());
    }
    for _ in 0..3 {
        let mut extra = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        let started = Instant::now();
        assert!(
            closed_unanswered(&mut extra, Duration::from_secs(5)).await,
            "a connection beyond the cap was kept open"
        );
        assert!(started.elapsed() < Duration::from_secs(2), "not at once");
    }
    // One slot frees: a request is answered while the other three are still held.
    held.pop();
    eventually(PATIENCE, "an answer once a slot is free", async || {
        get(port, "/healthz").await.map(|r| r.0) == Some(200)
    })
    .await;
    assert_eq!(held.len(), 3);
}

/// A client that starts a request and never finishes it is dropped after
/// `health.timeout_secs`, and its slot serves the next client.
#[tokio::test]
async fn slow_client_is_dropped_after_the_timeout() {
    let mut env = TestEnv::new().await;
    let port = free_port().await;
    let addr = format!("127.0.0.1:{port}");
    env.spawn_worker(
        WORKER,
        "slowloris",
        &[
            ("VIDPIPE__HEALTH__ADDR", &addr),
            // One slot: while the slow client holds it, nobody else is served.
            ("VIDPIPE__HEALTH__MAX_CONNECTIONS", "1"),
            ("VIDPIPE__HEALTH__TIMEOUT_SECS", "1"),
        ],
    );
    eventually(PATIENCE, "the health endpoint to answer", async || {
        get(port, "/healthz").await.is_some()
    })
    .await;
    let mut slow = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let started = Instant::now();
    // Headers trickle in and never end (no blank line).
    slow.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let mut dropped = false;
    while started.elapsed() < Duration::from_secs(10) && !dropped {
        if slow.write_all(b"X-Slow: 1\r\n").await.is_err() {
            dropped = true;
            break;
        }
        dropped = closed_unanswered(&mut slow, Duration::from_millis(200)).await;
    }
    assert!(dropped, "the slow client was still connected after 10 s");
    let held_for = started.elapsed();
    assert!(
        held_for >= Duration::from_millis(900) && held_for < Duration::from_secs(5),
        "dropped after {held_for:?}, the timeout is 1 s"
    );
    assert_eq!(get(port, "/healthz").await.map(|r| r.0), Some(200));
}
