//! Health and metrics over plain HTTP: `/healthz` (alive), `/readyz` (connected and
//! consuming; 503 while the broker is unreachable or during shutdown) and `/metrics`
//! (Prometheus text format). One tiny endpoint per worker, port `health.port`.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

type Labels = Vec<(String, String)>;

/// Readiness flag and every metric a worker exports. Cheap to clone.
#[derive(Clone)]
pub struct Health {
    ready: Arc<AtomicBool>,
    registry: Arc<Registry>,
    /// Finished deliveries by task and outcome (`completed`, `retried`, `dead`, `requeued`, `skipped`).
    pub jobs: Family<Labels, Counter>,
    /// Wall time of handler runs, by task.
    pub job_seconds: Family<Labels, Histogram>,
    pub in_flight: Gauge,
    pub retries: Family<Labels, Counter>,
    pub dead_letters: Family<Labels, Counter>,
    pub bytes_read: Counter,
    pub bytes_written: Counter,
}

impl Default for Health {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for Health {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Health")
            .field("ready", &self.is_ready())
            .finish_non_exhaustive()
    }
}

impl Health {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("vidpipe");
        let jobs = Family::<Labels, Counter>::default();
        let job_seconds = Family::<Labels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.05, 2.0, 16))
        });
        let in_flight = Gauge::default();
        let retries = Family::<Labels, Counter>::default();
        let dead_letters = Family::<Labels, Counter>::default();
        let bytes_read = Counter::default();
        let bytes_written = Counter::default();
        registry.register(
            "jobs",
            "Finished deliveries by task and outcome",
            jobs.clone(),
        );
        registry.register(
            "job_duration_seconds",
            "Handler wall time by task",
            job_seconds.clone(),
        );
        registry.register("jobs_in_flight", "Jobs running now", in_flight.clone());
        registry.register("retries", "Jobs sent to a retry tier", retries.clone());
        registry.register(
            "dead_letters",
            "Jobs sent to the parking lot",
            dead_letters.clone(),
        );
        registry.register(
            "source_bytes_read",
            "Bytes of source media read",
            bytes_read.clone(),
        );
        registry.register(
            "output_bytes_written",
            "Bytes of output committed to storage",
            bytes_written.clone(),
        );
        Self {
            ready: Arc::new(AtomicBool::new(false)),
            registry: Arc::new(registry),
            jobs,
            job_seconds,
            in_flight,
            retries,
            dead_letters,
            bytes_read,
            bytes_written,
        }
    }

    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::SeqCst);
    }
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::SeqCst)
    }

    /// Labels `{task, outcome}`.
    pub fn labels(task: &str, outcome: &str) -> Labels {
        vec![
            ("task".into(), task.into()),
            ("outcome".into(), outcome.into()),
        ]
    }
    /// Labels `{task}`.
    pub fn task(task: &str) -> Labels {
        vec![("task".into(), task.into())]
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }

    /// Serves the endpoint until `stop` fires. Binding failure is an error at start.
    pub async fn serve(self, bind: &str, port: u16, stop: CancellationToken) -> anyhow::Result<()> {
        let listener = TcpListener::bind((bind, port)).await.map_err(|e| {
            anyhow::anyhow!("cannot listen on {bind}:{port} (setting `health.port`): {e}")
        })?;
        tracing::info!(addr = %listener.local_addr()?, "health and metrics endpoint listening");
        tokio::spawn(async move {
            loop {
                let (mut stream, _) = tokio::select! {
                    _ = stop.cancelled() => return,
                    accepted = listener.accept() => match accepted { Ok(a) => a, Err(_) => continue },
                };
                let health = self.clone();
                tokio::spawn(async move {
                    let mut buf = [0u8; 1024];
                    let n = match tokio::time::timeout(
                        std::time::Duration::from_secs(5),
                        stream.read(&mut buf),
                    )
                    .await
                    {
                        Ok(Ok(n)) => n,
                        _ => return,
                    };
                    let request = String::from_utf8_lossy(&buf[..n]);
                    let path = request.split_whitespace().nth(1).unwrap_or("/");
                    let (status, content_type, body) = match path {
                        "/healthz" => ("200 OK", "text/plain", "ok\n".to_owned()),
                        "/readyz" if health.is_ready() => {
                            ("200 OK", "text/plain", "ready\n".to_owned())
                        }
                        "/readyz" => (
                            "503 Service Unavailable",
                            "text/plain",
                            "not ready\n".to_owned(),
                        ),
                        "/metrics" => ("200 OK", "text/plain; version=0.0.4", health.render()),
                        _ => (
                            "404 Not Found",
                            "text/plain",
                            "try /healthz, /readyz or /metrics\n".to_owned(),
                        ),
                    };
                    let response = format!(
                        "HTTP/1.1 {status}\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = stream.write_all(response.as_bytes()).await;
                    let _ = stream.shutdown().await;
                });
            }
        });
        Ok(())
    }
}
