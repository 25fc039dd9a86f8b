//! Health and metrics over plain HTTP: `/healthz` (alive), `/readyz` (connected and
//! consuming; 503 while the broker is unreachable or during shutdown) and `/metrics`
//! (Prometheus text format). One tiny endpoint per worker at `health.addr`, served by
//! hyper's HTTP/1 server.
//!
//! By default it listens on loopback on a port the OS picks (logged at start), so any
//! number of workers of any kind can run side by side on one machine and nothing is
//! reachable from outside it; container images set a fixed `0.0.0.0:8080`. Whoever can
//! reach it gets a bounded share: a fixed number of connections, one request each, and a
//! deadline for every exchange.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{CONTENT_TYPE, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::settings::HealthSettings;

/// Largest request the endpoint reads (hyper's minimum buffer); a probe is ~100 bytes.
const MAX_REQUEST_BYTES: usize = 8192;

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

    /// The answer to `GET path`: status, content type, body.
    fn answer(&self, path: &str) -> (StatusCode, &'static str, String) {
        match path {
            "/healthz" => (StatusCode::OK, "text/plain", "ok\n".to_owned()),
            "/readyz" if self.is_ready() => (StatusCode::OK, "text/plain", "ready\n".to_owned()),
            "/readyz" => (
                StatusCode::SERVICE_UNAVAILABLE,
                "text/plain",
                "not ready\n".to_owned(),
            ),
            "/metrics" => (StatusCode::OK, "text/plain; version=0.0.4", self.render()),
            _ => (
                StatusCode::NOT_FOUND,
                "text/plain",
                "try /healthz, /readyz or /metrics\n".to_owned(),
            ),
        }
    }

    fn respond(&self, request: &Request<Incoming>) -> Response<Full<Bytes>> {
        let (status, content_type, body) = match *request.method() {
            Method::GET | Method::HEAD => self.answer(request.uri().path()),
            _ => (
                StatusCode::METHOD_NOT_ALLOWED,
                "text/plain",
                "only GET and HEAD\n".to_owned(),
            ),
        };
        let mut response = Response::new(Full::new(Bytes::from(body)));
        *response.status_mut() = status;
        response
            .headers_mut()
            .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
        response
    }

    /// Binds `settings.addr` and serves the endpoint until `stop` fires; returns the
    /// address bound (the port the OS chose when the setting's port is 0). A bind
    /// failure is an error at start, naming the setting.
    ///
    /// Bounded on purpose: at most `max_connections` connections at once (one more is
    /// closed as soon as it is accepted, never queued), one request per connection, and
    /// `timeout_secs` for a client to send its request and the whole exchange, so slow
    /// or idle clients cannot hold the slots for long.
    pub async fn serve(
        self,
        settings: &HealthSettings,
        stop: CancellationToken,
    ) -> anyhow::Result<SocketAddr> {
        let addr = settings.socket_addr()?;
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|e| anyhow::anyhow!("cannot listen on {addr} (setting `health.addr`): {e}"))?;
        let bound = listener.local_addr()?;
        tracing::info!(addr = %bound, "health and metrics endpoint listening");
        let slots = Arc::new(Semaphore::new(settings.max_connections));
        let timeout = Duration::from_secs_f64(settings.timeout_secs);
        tokio::spawn(async move {
            loop {
                let stream = tokio::select! {
                    _ = stop.cancelled() => return,
                    accepted = listener.accept() => match accepted {
                        Ok((stream, _)) => stream,
                        Err(e) => {
                            // Out of file descriptors and the like: don't spin on it.
                            tracing::warn!(error = %e, "health endpoint: accept failed");
                            tokio::time::sleep(Duration::from_millis(100)).await;
                            continue;
                        }
                    },
                };
                let Ok(slot) = slots.clone().try_acquire_owned() else {
                    // Full: closing at once costs nothing and keeps memory bounded.
                    drop(stream);
                    continue;
                };
                let health = self.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |request: Request<Incoming>| {
                        let response = health.respond(&request);
                        async move { Ok::<_, Infallible>(response) }
                    });
                    let connection = http1::Builder::new()
                        .timer(TokioTimer::new())
                        .header_read_timeout(timeout)
                        .keep_alive(false)
                        .max_buf_size(MAX_REQUEST_BYTES)
                        .serve_connection(TokioIo::new(stream), service);
                    // The header timeout stops a slow request; this one a client that
                    // sends its request and then never reads the answer.
                    let _ = tokio::time::timeout(timeout, connection).await;
                    drop(slot);
                });
            }
        });
        Ok(bound)
    }
}
