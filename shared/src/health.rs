//! Health and metrics over plain HTTP: `/healthz` (alive, until the process exits),
//! `/readyz` (connected and consuming; 503 while the broker is unreachable and from
//! SIGTERM on, while jobs drain) and `/metrics`. One tiny endpoint per worker at
//! `health.addr`, served by hyper's HTTP/1 server.
//!
//! `/metrics` speaks both exposition formats, chosen by the scraper's `Accept`:
//! OpenMetrics 1.0 (what prometheus-client encodes, and what Prometheus asks for first)
//! when it is named there, else the classic Prometheus text format 0.0.4 (curl, older
//! scrapers). Each answer carries the content type of its body: a scraper that parses
//! an OpenMetrics body as classic text splits every counter into an empty family and an
//! untyped `_total` series. Every series a worker will ever have is there from the
//! start at zero ([`Health::track_task`]), so `rate()` sees the first job too.
//!
//! By default it listens on loopback on a port the OS picks (logged at start), so any
//! number of workers of any kind can run side by side on one machine and nothing is
//! reachable from outside it; container images set a fixed `0.0.0.0:8080`. Whoever can
//! reach it gets a bounded share: a fixed number of connections, one request each, and a
//! deadline for every exchange.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{ACCEPT, CONTENT_TYPE, HeaderValue, VARY};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::settings::HealthSettings;

/// Largest request the endpoint reads (hyper's minimum buffer); a probe is ~100 bytes.
const MAX_REQUEST_BYTES: usize = 8192;

type Labels = Vec<(String, String)>;

/// Every `outcome` label of `vidpipe_jobs_total`: how a delivery was settled.
pub const OUTCOMES: [&str; 5] = ["completed", "retried", "dead", "requeued", "cancelled"];

/// The two exposition formats `/metrics` serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetricsFormat {
    /// OpenMetrics 1.0 text: counter families named without `_total`, `# UNIT`, `# EOF`.
    OpenMetrics,
    /// The classic Prometheus text format 0.0.4: counter families named with `_total`.
    Classic,
}

impl MetricsFormat {
    /// The content type that says which format the body is in.
    pub fn content_type(self) -> &'static str {
        match self {
            MetricsFormat::OpenMetrics => {
                "application/openmetrics-text; version=1.0.0; charset=utf-8"
            }
            MetricsFormat::Classic => "text/plain; version=0.0.4; charset=utf-8",
        }
    }

    /// The format for a request's `Accept` header: OpenMetrics when the client names
    /// `application/openmetrics-text` with a quality at least that of plain text (as
    /// Prometheus does), else classic text (no header, `*/*`, `text/plain`).
    pub fn negotiate(accept: Option<&str>) -> Self {
        let Some(accept) = accept else {
            return MetricsFormat::Classic;
        };
        let mut openmetrics: Option<f32> = None;
        // The most specific range that covers text/plain decides its quality.
        let mut text: Option<(u8, f32)> = None;
        for range in accept.split(',') {
            let mut parts = range.split(';').map(str::trim);
            let media = parts.next().unwrap_or_default().to_ascii_lowercase();
            let quality = parts
                .filter_map(|p| p.split_once('='))
                .find(|(k, _)| k.trim().eq_ignore_ascii_case("q"))
                .map_or(1.0, |(_, v)| v.trim().parse::<f32>().unwrap_or(0.0));
            let specificity = match media.as_str() {
                "application/openmetrics-text" => {
                    openmetrics = Some(openmetrics.map_or(quality, |q| q.max(quality)));
                    continue;
                }
                "text/plain" => 3,
                "text/*" => 2,
                "*/*" => 1,
                _ => continue,
            };
            text = match text {
                Some((s, q)) if s > specificity => Some((s, q)),
                Some((s, q)) if s == specificity => Some((s, q.max(quality))),
                _ => Some((specificity, quality)),
            };
        }
        let text = text.map_or(0.0, |(_, q)| q);
        match openmetrics {
            Some(q) if q > 0.0 && q >= text => MetricsFormat::OpenMetrics,
            _ => MetricsFormat::Classic,
        }
    }
}

/// One task's labelled series, looked up once ([`Health::track_task`]): each is a handle
/// on the series in the registry, so counting a job allocates no labels and takes no
/// lock.
#[derive(Clone, Debug)]
pub struct TaskSeries {
    /// `vidpipe_jobs_total` by outcome (see [`OUTCOMES`]).
    pub completed: Counter,
    pub retried: Counter,
    pub dead: Counter,
    pub requeued: Counter,
    pub cancelled: Counter,
    pub job_seconds: Histogram,
    pub retries: Counter,
    pub dead_letters: Counter,
}

/// Readiness flag and every metric a worker exports. Cheap to clone.
#[derive(Clone)]
pub struct Health {
    ready: Arc<AtomicBool>,
    registry: Arc<Registry>,
    /// Finished deliveries by task and outcome (one of [`OUTCOMES`]; a redelivered job
    /// skipped because its outputs exist counts as `completed`).
    pub jobs: Family<Labels, Counter>,
    /// Wall time of handler runs, by task.
    pub job_seconds: Family<Labels, Histogram>,
    pub in_flight: Gauge,
    pub retries: Family<Labels, Counter>,
    pub dead_letters: Family<Labels, Counter>,
    /// Bytes of source media fetched (`vidpipe_source_read_bytes_total`).
    pub bytes_read: Counter,
    /// Bytes of outputs committed (`vidpipe_output_written_bytes_total`).
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
        // The unit is in the name but without a `# UNIT` line: OpenMetrics allows one on
        // a histogram, yet some of its parsers (the openmetrics-parser crate, which the
        // tests use) refuse it, and Prometheus takes the unit from the name anyway.
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
        registry.register_with_unit(
            "source_read",
            "Bytes of source media read",
            Unit::Bytes,
            bytes_read.clone(),
        );
        registry.register_with_unit(
            "output_written",
            "Bytes of output committed to storage",
            Unit::Bytes,
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

    /// Creates every labelled series of `task` at zero (each outcome, retries, dead
    /// letters, the duration histogram), so a scrape before its first job already shows
    /// them: a series born at its first increment hides that increment from `rate()`.
    /// Returns them, so a job's metrics are an atomic add each.
    pub fn track_task(&self, task: &str) -> TaskSeries {
        let [completed, retried, dead, requeued, cancelled] = OUTCOMES.map(|outcome| {
            self.jobs
                .get_or_create(&Self::labels(task, outcome))
                .clone()
        });
        let task = Self::task(task);
        TaskSeries {
            completed,
            retried,
            dead,
            requeued,
            cancelled,
            job_seconds: self.job_seconds.get_or_create(&task).clone(),
            retries: self.retries.get_or_create(&task).clone(),
            dead_letters: self.dead_letters.get_or_create(&task).clone(),
        }
    }

    /// The metrics exposition in `format`.
    pub fn render(&self, format: MetricsFormat) -> String {
        let mut out = String::new();
        encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        match format {
            MetricsFormat::OpenMetrics => out,
            MetricsFormat::Classic => openmetrics_to_classic(&out),
        }
    }

    /// The answer to `GET path` with this `Accept`: status, content type, body.
    fn answer(&self, path: &str, accept: Option<&str>) -> (StatusCode, &'static str, String) {
        match path {
            "/healthz" => (StatusCode::OK, "text/plain", "ok\n".to_owned()),
            "/readyz" if self.is_ready() => (StatusCode::OK, "text/plain", "ready\n".to_owned()),
            "/readyz" => (
                StatusCode::SERVICE_UNAVAILABLE,
                "text/plain",
                "not ready\n".to_owned(),
            ),
            "/metrics" => {
                let format = MetricsFormat::negotiate(accept);
                (StatusCode::OK, format.content_type(), self.render(format))
            }
            _ => (
                StatusCode::NOT_FOUND,
                "text/plain",
                "try /healthz, /readyz or /metrics\n".to_owned(),
            ),
        }
    }

    fn respond(&self, request: &Request<Incoming>) -> Response<Full<Bytes>> {
        let accept = request.headers().get(ACCEPT).and_then(|v| v.to_str().ok());
        let (status, content_type, body) = match *request.method() {
            Method::GET | Method::HEAD => self.answer(request.uri().path(), accept),
            _ => (
                StatusCode::METHOD_NOT_ALLOWED,
                "text/plain",
                "only GET and HEAD\n".to_owned(),
            ),
        };
        let mut response = Response::new(Full::new(Bytes::from(body)));
        *response.status_mut() = status;
        let headers = response.headers_mut();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
        // The body of /metrics depends on Accept: caches must not mix the two.
        headers.insert(VARY, HeaderValue::from_static("accept"));
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

/// The classic text format (0.0.4) of prometheus-client's OpenMetrics text, which is all
/// that crate encodes. For what this registry holds (counters, gauges, histograms, no
/// exemplars) the two differ only in descriptors: OpenMetrics names a counter's family
/// without `_total` and its samples with it, the classic format names both with it
/// (its parser would otherwise see an empty family and an untyped `_total` series), and
/// `# UNIT` and `# EOF` exist only in OpenMetrics. Sample lines are the same.
fn openmetrics_to_classic(openmetrics: &str) -> String {
    let counters: HashSet<&str> = openmetrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE ")?.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(openmetrics.len() + 16 * counters.len());
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let descriptor = ["# HELP ", "# TYPE "]
            .into_iter()
            .find_map(|kind| Some((kind, line.strip_prefix(kind)?)));
        match descriptor {
            Some((kind, rest)) => {
                let name = rest.split(' ').next().unwrap_or_default();
                let tail = &rest[name.len()..];
                let tail = if kind == "# TYPE " && tail == " unknown" {
                    " untyped"
                } else {
                    tail
                };
                let total = if counters.contains(name) {
                    "_total"
                } else {
                    ""
                };
                out.push_str(&format!("{kind}{name}{total}{tail}\n"));
            }
            None => {
                out.push_str(line);
                out.push('\n');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What Prometheus 2.x sends by default.
    const PROMETHEUS_ACCEPT: &str = "application/openmetrics-text;version=1.0.0,\
        application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";

    #[test]
    fn the_format_follows_the_accept_header() {
        use MetricsFormat::{Classic, OpenMetrics};
        let cases = [
            (None, Classic),
            (Some("*/*"), Classic),
            (Some("text/plain"), Classic),
            (Some("text/plain;version=0.0.4"), Classic),
            (Some(PROMETHEUS_ACCEPT), OpenMetrics),
            (Some("application/openmetrics-text"), OpenMetrics),
            (
                Some("Application/OpenMetrics-Text; version=1.0.0"),
                OpenMetrics,
            ),
            (
                Some("application/openmetrics-text;q=0.2,text/plain;q=0.9"),
                Classic,
            ),
            (Some("application/openmetrics-text;q=0,*/*"), Classic),
            (
                Some("text/plain;q=0.3,application/openmetrics-text;q=0.3"),
                OpenMetrics,
            ),
            (Some("application/json"), Classic),
        ];
        for (accept, expected) in cases {
            assert_eq!(MetricsFormat::negotiate(accept), expected, "{accept:?}");
        }
    }

    #[test]
    fn every_series_is_exposed_at_zero_once_its_task_is_tracked() {
        let health = Health::new();
        health.track_task("thumbnail");
        let text = health.render(MetricsFormat::OpenMetrics);
        for outcome in OUTCOMES {
            let line =
                format!("vidpipe_jobs_total{{task=\"thumbnail\",outcome=\"{outcome}\"}} 0\n");
            assert!(text.contains(&line), "{line} missing from:\n{text}");
        }
        for line in [
            "vidpipe_retries_total{task=\"thumbnail\"} 0\n",
            "vidpipe_dead_letters_total{task=\"thumbnail\"} 0\n",
            "vidpipe_job_duration_seconds_count{task=\"thumbnail\"} 0\n",
            "vidpipe_source_read_bytes_total 0\n",
            "vidpipe_output_written_bytes_total 0\n",
            "vidpipe_jobs_in_flight 0\n",
        ] {
            assert!(text.contains(line), "{line} missing from:\n{text}");
        }
    }

    #[test]
    fn classic_text_names_counter_families_with_total_and_drops_openmetrics_lines() {
        let health = Health::new();
        health.track_task("transcode");
        health.bytes_read.inc_by(42);
        let openmetrics = health.render(MetricsFormat::OpenMetrics);
        assert!(
            openmetrics.contains("# TYPE vidpipe_jobs counter\n"),
            "{openmetrics}"
        );
        assert!(openmetrics.contains("# UNIT vidpipe_source_read_bytes bytes\n"));
        assert!(openmetrics.ends_with("# EOF\n"));

        let classic = health.render(MetricsFormat::Classic);
        for line in [
            "# HELP vidpipe_jobs_total Finished deliveries by task and outcome.\n",
            "# TYPE vidpipe_jobs_total counter\n",
            "# TYPE vidpipe_source_read_bytes_total counter\n",
            "vidpipe_source_read_bytes_total 42\n",
            "# TYPE vidpipe_job_duration_seconds histogram\n",
            "# TYPE vidpipe_jobs_in_flight gauge\n",
        ] {
            assert!(classic.contains(line), "{line} missing from:\n{classic}");
        }
        assert!(
            !classic.contains("# UNIT") && !classic.contains("# EOF"),
            "{classic}"
        );
        // Samples are untouched: only descriptor lines differ.
        let samples = |t: &str| -> Vec<String> {
            t.lines()
                .filter(|l| !l.starts_with('#'))
                .map(str::to_owned)
                .collect()
        };
        assert_eq!(samples(&openmetrics), samples(&classic));
    }
}
